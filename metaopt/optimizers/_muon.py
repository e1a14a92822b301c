"""Muon: Nesterov momentum orthogonalized by Newton-Schulz on hidden matrices, AdamW elsewhere.

Jordan et al, "Muon: An optimizer for hidden layers in neural networks", 2024 (blog,
https://kellerjordan.github.io/posts/muon/). Numerically this follows
``optax.contrib.muon`` (optax 0.2.8) where both are configured alike: the same Nesterov
form, Frobenius pre-normalization with ``eps``, quintic coefficients, shape scaling,
``adaptive`` and ``consistent_rms`` options, and Nesterov AdamW (``nesterov`` switches
both parts, ``eps`` is shared) on the other leaves. What differs, on purpose:

* **Which leaves are orthogonalized.** optax: every 2-D leaf (or those its
  ``muon_weight_dimension_numbers`` name). Here: the leaves whose muP role
  (:mod:`metaopt.mup`) is ``hidden`` and that have at least 2 dims. Input layers and
  embeddings (``input``), the readout (``output``) and vectors go to AdamW, as Jordan
  et al recommend. Roles come from ``roles=``, from ``labels=`` (role names, via
  :func:`metaopt.mup.roles_from_labels`) or, for unlabeled trees, from
  :func:`metaopt.mup.infer_roles` (which warns at ``init`` when it is unsure), as
  :func:`metaopt.mup.resolve_roles` orders them.
* **Tensors with more than 2 dims** are one matrix ``[fan_in, size / fan_in]`` with the
  fan-in of :func:`metaopt.mup.default_fan_in`: conv kernels ``[*spatial, in, out]``
  become ``[prod(spatial) * in, out]``; 3-D attention kernels ``[in, heads, head_dim]``
  become ``[in, heads * head_dim]`` and output projections ``[heads, head_dim, out]``
  become ``[heads * head_dim, out]``. (optax does the same given
  ``MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)`` for a conv kernel.)
* **bfloat16**: the Newton-Schulz iteration runs in float32 and is cast back (optax
  iterates in bfloat16).

* **``mask``** selects the decayed leaves of both parts (optax's ``weight_decay_mask``
  acts on the Muon part only; the two agree when ``adam_weight_decay`` is 0, the
  default).

optax's ``preconditioning`` variants other than ``"frobenius"`` and its ``"dion"``
preset name are not provided.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaopt import features
from metaopt import mup
from metaopt.optimizers import _adam
from metaopt.optimizers import _factory
from metaopt.optimizers import _validation

Tree = Any

MUON, ADAM = "muon", "adam"


def _check_ns(ns_coeffs, ns_steps) -> None:
  table = jnp.asarray(ns_coeffs)
  if table.ndim not in (1, 2) or table.shape[-1] != 3:
    raise ValueError(f"ns_coeffs must have shape (3,) or (n, 3); got {table.shape}.")
  _validation.check_range(1.0, ns_steps=ns_steps)


def _paths_and_leaves(tree):
  return [(jax.tree_util.keystr(p), leaf)
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


class ScaleByMuonState(NamedTuple):
  """State of :func:`scale_by_muon`: step count and the momentum EMA."""

  count: jax.Array  # shape=(), dtype=int32.
  mu: Tree


def scale_by_muon(ns_coeffs=features.NEWTON_SCHULZ_COEFFS, ns_steps: int = 5,
                  beta: float = 0.95, eps: float = 1e-8, mu_dtype=None, *,
                  nesterov: bool = True, adaptive: bool = False, consistent_rms=None
                  ) -> optax.GradientTransformation:
  r"""Muon's direction for every leaf (each must have at least 2 dims).

  .. math::
    \mu_t &= \beta \mu_{t-1} + (1 - \beta) g_t, \qquad
    \hat\mu_t = \frac{\beta \mu_t}{1 - \beta^{t+1}} + \frac{(1 - \beta) g_t}{1 - \beta^t}
    \;\; (\text{or } \mu_t / (1 - \beta^t) \text{ without Nesterov}), \\
    u_t &= s\, \mathrm{NS}(\hat\mu_t), \qquad
    s = \sqrt{\max(1, n_\text{out} / n_\text{in})},

  with :math:`\mathrm{NS}` the quintic Newton-Schulz iteration
  :func:`metaopt.features.newton_schulz_orthogonalize` on the leaf's
  ``[fan_in, fan_out]`` view (:func:`metaopt.mup.default_fan_in`: all but the last
  axis are fan-in for conv kernels) and :math:`s` from
  :func:`metaopt.features.muon_shape_scale`. ``adaptive`` multiplies
  :math:`\mathrm{NS}(\hat\mu_t)` by :math:`\langle \hat\mu_t, \mathrm{NS}(\hat\mu_t)
  \rangle` first (the dual norm of Bernstein et al, arXiv:2409.20325).

  Args:
    ns_coeffs: quintic coefficients ``(a, b, c)``, or an ``(n, 3)`` table of
      per-iteration coefficients.
    ns_steps: Newton-Schulz iterations for constant coefficients.
    beta: :math:`\beta`, decay of the momentum EMA.
    eps: added to the Frobenius norm before the iteration.
    mu_dtype: dtype of the momentum (None: the parameters').
    nesterov: use the Nesterov look-ahead :math:`\hat\mu_t` (as optax, the default).
    adaptive: scale by the dual norm :math:`\langle \hat\mu_t, \mathrm{NS}(\hat\mu_t)
      \rangle`.
    consistent_rms: if given, scale by ``sqrt(max(fan_in, fan_out)) * consistent_rms``
      instead (Liu et al, arXiv:2502.16982; 0.2 matches AdamW's update RMS).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByMuonState`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_muon()
    >>> u, state = tx.update({"w": jnp.ones((4, 3))}, tx.init({"w": jnp.zeros((4, 3))}))

  References:
    Jordan et al, "Muon: An optimizer for hidden layers in neural networks", blog, 2024
  """
  _validation.check_betas(beta=beta)
  _validation.check_positive(eps=eps)
  if consistent_rms is not None:
    _validation.check_positive(consistent_rms=consistent_rms)
  _check_ns(ns_coeffs, ns_steps)

  def init_fn(params):
    for name, leaf in _paths_and_leaves(params):
      if jnp.ndim(leaf) < 2:
        raise ValueError(f"scale_by_muon: params{name} has shape {jnp.shape(leaf)}; "
                         "Muon orthogonalizes tensors of rank >= 2 only.")
    return ScaleByMuonState(jnp.zeros([], jnp.int32),
                            optax.tree.zeros_like(params, dtype=mu_dtype))

  def direction(name, m_hat):
    return features.muon_direction(m_hat, mup.default_fan_in(jnp.shape(m_hat), name),
                                   ns_steps, ns_coeffs, eps, consistent_rms,
                                   adaptive=adaptive)

  def update_fn(updates, state, params=None):
    del params
    mu = features.update_ema(updates=updates, moments=state.mu, decay=beta)
    count = optax.safe_increment(state.count)
    if nesterov:
      m_hat = features.nesterov_momentum(mu, updates, beta, count)
    else:
      m_hat = features.bias_correction(mu, beta, count)
    flat, treedef = jax.tree_util.tree_flatten_with_path(m_hat)
    out = [direction(jax.tree_util.keystr(p), m).astype(g.dtype)
           for (p, m), g in zip(flat, jax.tree.leaves(updates))]
    mu = optax.tree.cast(mu, mu_dtype) if mu_dtype is not None else (
        optax.tree.cast_like(mu, state.mu))
    return jax.tree.unflatten(treedef, out), ScaleByMuonState(count, mu)

  return optax.GradientTransformation(init_fn, update_fn)


def muon_labels(params, roles=None, labels=None, *, warn: bool = False) -> Tree:
  """``"muon"`` or ``"adam"`` per leaf: which part of :func:`muon` updates it.

  A leaf is ``"muon"`` when its muP role is ``hidden`` and it has at least 2 dims.

  Args:
    params: the parameter tree (arrays or ShapeDtypeStructs).
    roles: a :class:`metaopt.mup.ParamRole` tree or a callable ``params -> roles``.
    labels: alternatively, a tree (or callable) of role names for
      :func:`metaopt.mup.roles_from_labels`.
    warn: let :func:`metaopt.mup.infer_roles` warn when it guesses (no roles given).

  Returns:
    A tree of strings with the structure of ``params``.
  """
  r = mup.resolve_roles(params, roles, labels=labels, warn=warn)
  return jax.tree.map(lambda leaf, role: MUON if role.kind == "hidden" and
                      jnp.ndim(leaf) >= 2 else ADAM, params, r, is_leaf=mup.is_role)


def muon_fan_ins(params, roles=None, labels=None, *, warn: bool = False) -> Tree:
  """Per leaf, the fan-in of the ``[fan_in, size / fan_in]`` matrix Muon orthogonalizes
  (:func:`metaopt.mup.default_fan_in` of its path), or 0 for the AdamW leaves.

  The leaves are those :func:`muon_labels` selects (same arguments); the learned
  optimizer's orthogonalized candidate reads this tree (``LOConfig.muon``).
  """
  which = muon_labels(params, roles, labels, warn=warn)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree.unflatten(treedef, [
      mup.default_fan_in(jnp.shape(leaf), jax.tree_util.keystr(path)) if label == MUON
      else 0 for (path, leaf), label in zip(flat, treedef.flatten_up_to(which))])


def muon_fan_ins_2d(params) -> Tree:
  """Per leaf, the fan-in (rows) of every 2-D leaf and 0 for every other: the leaves
  ``optax.contrib.muon`` orthogonalizes by default (``muon_weight_dimension_numbers``
  unset), as the learned optimizer's ``LOConfig(muon_matrices="all_2d")`` reads them."""
  return jax.tree.map(lambda leaf: jnp.shape(leaf)[0] if jnp.ndim(leaf) == 2 else 0,
                      params)


def muon(learning_rate: optax.ScalarOrSchedule,
         ns_coeffs=features.NEWTON_SCHULZ_COEFFS, ns_steps: int = 5,
         beta: float = 0.95, eps: float = 1e-8,
         weight_decay: optax.ScalarOrSchedule = 0.0, *, mu_dtype=None,
         roles: mup.RolesOrFn | None = None, labels: Any = None,
         nesterov: bool = True, adaptive: bool = False,
         adam_b1: float = 0.9, adam_b2: float = 0.999, adam_eps_root: float = 0.0,
         adam_weight_decay: optax.ScalarOrSchedule = 0.0,
         adam_learning_rate: optax.ScalarOrSchedule | None = None,
         consistent_rms=None, mask: _factory.Mask = None
         ) -> optax.GradientTransformationExtraArgs:
  r"""Muon on hidden matrices (by muP role), AdamW on every other leaf.

  .. math::
    \theta_t = \theta_{t-1} - \eta_t \left(s\, \mathrm{NS}_5(\hat\mu_t) + \lambda
      \theta_{t-1}\right) \quad \text{(hidden matrices)}, \qquad
    \theta_t = \theta_{t-1} - \eta^A_t \left(\frac{\hat m_t}{\sqrt{\hat v_t +
      \bar\epsilon} + \epsilon} + \lambda^A \theta_{t-1}\right) \quad \text{(the rest)},

  with :math:`\hat\mu_t` the Nesterov momentum (decay :math:`\beta` = ``beta``) and
  :math:`\mathrm{NS}_5`, :math:`s = \sqrt{\max(1, n_\text{out}/n_\text{in})}` as in
  :func:`scale_by_muon`; conv kernels ``[*spatial, in, out]`` are orthogonalized as one
  ``[prod(spatial) * in, out]`` matrix. :math:`\eta` = ``learning_rate``,
  :math:`\lambda` = ``weight_decay``, :math:`\eta^A` = ``adam_learning_rate`` (default
  :math:`\eta`), :math:`\lambda^A` = ``adam_weight_decay`` (both decays only on the
  leaves ``mask`` selects); :math:`\hat m_t, \hat v_t`
  are Adam's moments (``adam_b1``, ``adam_b2``), Nesterov too when ``nesterov``, as in
  optax. Weight decay is decoupled and multiplied by the learning rate, as in optax.
  "Hidden" means muP role ``hidden`` (:func:`muon_labels`): embeddings, the input
  layer, the readout and vectors go to AdamW. Equals ``optax.contrib.muon`` given the
  same split (``muon_weight_dimension_numbers``) and float32/float64 parameters.

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule (Jordan et al use 0.02).
    ns_coeffs: quintic Newton-Schulz coefficients ``(a, b, c)`` or an ``(n, 3)`` table.
    ns_steps: Newton-Schulz iterations for constant coefficients (a Python int is
      unrolled; under ``optax.inject_hyperparams`` it is traced and loops unless given
      in ``static_args``).
    beta: momentum decay.
    eps: added to the Frobenius norm before Newton-Schulz and to Adam's denominator.
    weight_decay: decoupled weight decay of the Muon leaves.
    mu_dtype: dtype of both first moments (None: the parameters').
    roles: a :class:`metaopt.mup.ParamRole` tree or a callable ``params -> roles``.
    labels: alternatively, role names (``"hidden"``, ``"input"``, ...) per leaf, or a
      callable returning them. Without either, :func:`metaopt.mup.infer_roles` guesses.
    nesterov: Nesterov momentum in both parts (optax's default).
    adaptive: scale Muon's direction by the dual norm (see :func:`scale_by_muon`).
    adam_b1: Adam's first-moment decay.
    adam_b2: Adam's second-moment decay.
    adam_eps_root: added inside Adam's square root.
    adam_weight_decay: decoupled weight decay of the AdamW leaves.
    adam_learning_rate: learning rate of the AdamW leaves (None: ``learning_rate``).
    consistent_rms: if given, Muon's scale is ``sqrt(max(fan_in, fan_out)) *
      consistent_rms`` (Liu et al; 0.2 makes the update RMS AdamW-like).
    mask: the leaves to decay (both parts), as ``optax.masked`` reads it: a tree of
      bools (or a prefix of one) or a callable ``params -> such a tree``; None: all.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp
    >>> from metaopt import mup
    >>> params = {"w": jnp.ones((8, 8)), "b": jnp.zeros(8)}
    >>> opt = muon(0.02, roles={"w": mup.hidden_role(8, 8), "b": mup.vector_role()})
    >>> u, state = opt.update(params, opt.init(params), params)

  References:
    Jordan et al, "Muon: An optimizer for hidden layers in neural networks", blog, 2024

    Liu et al, "Muon is Scalable for LLM Training", arXiv:2502.16982, 2025
  """
  _validation.check_nonnegative(learning_rate=learning_rate)
  if adam_learning_rate is not None:
    _validation.check_nonnegative(adam_learning_rate=adam_learning_rate)
  _validation.check_nonnegative(adam_weight_decay=adam_weight_decay)
  _validation.check_betas(adam_b1=adam_b1, adam_b2=adam_b2)
  _validation.check_nonnegative(adam_eps_root=adam_eps_root)
  if roles is not None and labels is not None:
    raise ValueError("muon: pass roles= or labels=, not both.")
  # Each part sees the whole tree with optax.MaskedNode on the other part's leaves, so
  # ``mask`` (a tree or a callable of the params, as in optax.masked) reads alike in both.
  muon_part = _factory.decayed_descent(
      scale_by_muon(ns_coeffs, ns_steps, beta, eps, mu_dtype, nesterov=nesterov,
                    adaptive=adaptive, consistent_rms=consistent_rms),
      learning_rate, weight_decay, mask)
  adam_part = _factory.decayed_descent(
      _adam.scale_by_adam(adam_b1, adam_b2, eps, adam_eps_root, mu_dtype,
                          nesterov=nesterov),
      learning_rate if adam_learning_rate is None else adam_learning_rate,
      adam_weight_decay, mask)
  return optax.chain(
      _factory.checked_roles(roles, labels),
      optax.partition({MUON: muon_part, ADAM: adam_part},
                      lambda tree: muon_labels(tree, roles, labels)),
  )
