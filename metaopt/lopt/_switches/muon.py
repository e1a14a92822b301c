"""The ``muon`` switch: Muon's orthogonalized momentum as a candidate and a feature.

Jordan et al, "Muon: An optimizer for hidden layers in neural networks", 2024. With
``LOConfig.muon`` the candidates :data:`MUON_CANDIDATES` -- Muon's direction
``s NS(mu_hat)`` on the matrices it orthogonalizes (none on other tensors) and the
Nesterov Adam Muon applies to every other tensor -- join the mix, the orthogonalized
momentum joins the MLP's per-parameter features (:data:`MUON_FEATURES`), and on those
matrices the mix is ``theta["mix"] + theta["hidden_mix"]`` (the per-role gate that
lets the LO equal Muon, which applies AdamW to everything else). Those matrices keep
their own buffers in the flat layout (Newton-Schulz needs each matrix) and run as
programs of their own; with a Muon decay none of ``momentum_decays`` has, the state
keeps a fourth momentum (``LOState.momenta[3]``; scalar placeholders elsewhere).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from metaopt import features as F
from metaopt import optimizers
from metaopt.lopt import _engine
from metaopt.lopt._switches._base import ConfigField, Switch, SwitchStep
from metaopt.optimizers import _validation

# Which tensors get Muon's orthogonalized candidate (``LOConfig.muon_matrices``).
MUON_MATRICES = ("hidden", "all_2d")
MUON_CANDIDATES = ("muon", "nadam")
MUON_FEATURES = ("muon",)

DOC = """\
    muon: the orthogonalized-momentum switch (off by default; artifacts without it
      read as off; :mod:`metaopt.lopt._switches.muon`). On: the candidates
      ``MUON_CANDIDATES`` -- Muon's direction ``s NS(mu_hat)`` on hidden matrices (zero
      on other tensors) and Nesterov Adam -- and the feature ``MUON_FEATURES`` join the
      mix and the MLP, and on hidden matrices the mix is ``theta["mix"] +
      theta["hidden_mix"]``. Hidden matrices are those
      :func:`metaopt.optimizers.muon_labels` selects by muP role.
    muon_beta: Muon's momentum decay. The LO reuses the momentum EMA of
      ``momentum_decays`` with this decay, or keeps one more buffer (hidden matrices
      only) when none has it.
    muon_ns_steps: Newton-Schulz iterations.
    muon_eps: added to the Frobenius norm before Newton-Schulz.
    muon_matrices: which tensors get the orthogonalized candidate: ``"hidden"``, the
      hidden matrices by muP role (:func:`metaopt.optimizers.muon_labels`; conv and
      3-D attention kernels as matrices), or ``"all_2d"``, every 2-D tensor and no
      other (``optax.contrib.muon``'s default: embeddings and readouts included, conv
      kernels not), which needs no roles.
"""


def _validate(config) -> None:
  if not isinstance(config.muon_matrices, str) or config.muon_matrices not in MUON_MATRICES:
    raise ValueError(f"muon_matrices={config.muon_matrices!r}; expected one of "
                     f"{MUON_MATRICES}.")
  _validation.check_betas(muon_beta=config.muon_beta)
  _validation.check_positive(muon_eps=config.muon_eps)


def muon_momentum(config) -> int | None:
  """Index of the momentum EMA Muon reads: that of ``momentum_decays`` equal to
  ``muon_beta``, else 3 (a buffer of its own); None with the switch off."""
  if not config.muon:
    return None
  return config.momentum_decays.index(config.muon_beta) if (
      config.muon_beta in config.momentum_decays) else 3


def muon_fan_ins(config, params, roles):
  """Per leaf, the fan-in of the matrix the Muon candidate orthogonalizes (0: none), by
  ``config.muon_matrices``: hidden matrices by muP ``roles``
  (:func:`metaopt.optimizers.muon_fan_ins`) or every 2-D leaf (roles unused); None with
  the switch off."""
  if not config.muon:
    return None
  if config.muon_matrices == "all_2d":
    return optimizers.muon_fan_ins_2d(params)
  return optimizers.muon_fan_ins(params, roles)


def check_muon_fan_in(params, muon_fan_in):
  """``muon_fan_in`` checked against ``params``' shapes, as a tree of ints."""
  if muon_fan_in is None:
    raise ValueError("LOConfig.muon needs muon_fan_in=: per leaf the fan-in of the 2-D "
                     "view Muon orthogonalizes, 0 elsewhere (metaopt.optimizers."
                     "muon_fan_ins(params, roles)).")
  leaves = jax.tree.structure(params).flatten_up_to(muon_fan_in)
  for shape, f in zip((jnp.shape(p) for p in jax.tree.leaves(params)), leaves):
    if f and (len(shape) < 2 or math.prod(shape) % f):
      raise ValueError(f"muon_fan_in={f} does not give a 2-D view of a tensor of shape "
                       f"{shape}.")
  return jax.tree.unflatten(jax.tree.structure(params), [int(f) for f in leaves])


def muon_tensors(config, fan_in) -> set[int]:
  """Indices (tree order) of the tensors Muon orthogonalizes: they keep their own
  buffers in the flat layout (Newton-Schulz needs each matrix)."""
  del config
  return {i for i, f in enumerate(jax.tree.leaves(fan_in)) if f}


def _init_state(config, init, fan_in, state):
  """A fourth momentum where Muon has a decay of its own (per tensor in both layouts;
  scalar placeholders on the tensors it does not orthogonalize)."""
  if muon_momentum(config) != 3:
    return state
  own = jax.tree.map(lambda z, f: z if f else jnp.zeros([], z.dtype), init.zeros(), fan_in)
  return state._replace(momenta=state.momenta + (own,))


def muon_candidate(config, count, fan_in: int, with_ema: bool, mu, g):
  """Muon's momentum, direction and the direction's sum of squares for one hidden
  matrix W (Jordan et al 2024), viewed as ``[fan_in, size / fan_in]`` (a conv kernel
  as one matrix)::

    c_muon = s NS_5(mu_hat),  mu_t = beta mu_{t-1} + (1 - beta) g_t,
    mu_hat = beta mu_t / (1 - beta^(t+1)) + (1 - beta) g_t / (1 - beta^t),
    s = sqrt(max(1, fan_out / fan_in)),

  NS_5 the quintic Newton-Schulz iteration
  (:func:`metaopt.features.newton_schulz_orthogonalize`). ``mu`` is this step's
  momentum EMA of decay beta, or with ``with_ema`` the previous one of Muon's own
  buffer, advanced here."""
  if with_ema:
    mu = F.update_ema(updates=g, moments=mu, decay=config.muon_beta)
  m_hat = F.nesterov_momentum(mu, g, config.muon_beta, count)
  direction = _engine.on_whole_matrix(lambda m: F.muon_direction(
      m, fan_in, config.muon_ns_steps, F.NEWTON_SCHULZ_COEFFS, config.muon_eps), m_hat)
  return mu, direction, jnp.sum(jnp.square(direction))


def _advance(config, step, state, fan_in, moments, cross) -> SwitchStep:
  """Muon's direction and its sum of squares on each matrix it orthogonalizes (per
  matrix: Newton-Schulz matmuls), and Muon's own momentum where it has one."""
  del cross
  count, fan_in = step.count, step.leaves(fan_in)
  own = muon_momentum(config) == 3
  mu = step.leaves(state.momenta[3]) if own else [  # moments: (m_fast, m_mid, m_slow, v)
      moments[step.blocks.block_of(i)][muon_momentum(config)] if f else None
      for i, f in enumerate(fan_in)]
  directions = [None] * len(step.g)
  sum_sq, new_mu = [jnp.zeros([], step.scalar_dtype)] * len(step.g), list(mu)
  for f in sorted({f for f in fan_in if f}):  # one program per (fan-in, key)
    idx = [i for i, fi in enumerate(fan_in) if fi == f]
    muon = lambda m_i, g_i, f=f: muon_candidate(config, count, f, own, m_i, g_i)
    for i, (m_i, d_i, sq_i) in zip(idx, _engine.map_grouped(
        muon, [step.blocks.keys[i] for i in idx], [(mu[i], step.g[i]) for i in idx])):
      new_mu[i], directions[i], sum_sq[i] = m_i, d_i, sq_i
  sum_sq = jnp.stack([a.astype(step.scalar_dtype) for a in sum_sq])[:, None]
  update_state = lambda new: new
  if own:
    own_momenta = jax.tree.unflatten(step.treedef, step.keep(
        new_mu, step.leaves(state.momenta[3])))
    update_state = lambda new: new._replace(momenta=new.momenta + (own_momenta,))
  return SwitchStep(tensor_inputs=directions, sum_sq=sum_sq, update_state=update_state)


def _leaf_candidates(config, ctx, inp, inverse_denominator):
  """Muon's direction (None off its matrices) and Nesterov Adam
  ``m_hat_nesterov / (sqrt(v_hat) + eps)``."""
  b_fast = config.momentum_decays[0]
  nadam = (F.nesterov_momentum(inp.m_fast, inp.g, b_fast, ctx.count) *
           inverse_denominator(config.adam_eps))
  return inp.extra.get("muon"), nadam


def _leaf_features(config, theta, inp, mix):
  """On a matrix Muon orthogonalizes: its direction as a feature, and the hidden mix."""
  del config
  direction = inp.extra.get("muon")
  if direction is None:
    return [], mix
  return [("muon", direction)], mix + theta["hidden_mix"]


# Muon's hyperparameters as the LO represents them (metaopt.lopt._classical's mapping).
_MUON = {"learning_rate": ("lr",), "ns_coeffs": ("fixed", F.NEWTON_SCHULZ_COEFFS),
         "ns_steps": ("config", "muon_ns_steps"), "beta": ("config", "muon_beta"),
         "eps": ("config", "muon_eps", "adam_eps"), "weight_decay": ("wd",),
         "nesterov": ("fixed", True), "adaptive": ("fixed", False),
         "adam_b1": ("decay", 0), "adam_b2": ("config", "second_moment_decay"),
         "adam_eps_root": ("fixed", 0.0), "adam_weight_decay": ("adam_wd",),
         "adam_learning_rate": ("adam_lr",)}


def _muon_mix(names, parts: dict, lr: float):
  """(mix, {"hidden_mix": ...}) of Muon: Nesterov AdamW on ``mix``, Muon on
  ``mix + hidden_mix`` (the AdamW part's learning rate and decay relative to Muon's)."""
  adam_lr = parts["adam_lr"]
  ratio = 1.0 if adam_lr is None else adam_lr / lr
  mix, hidden = [0.0] * len(names), [0.0] * len(names)
  mix[names.index("nadam")] = ratio
  mix[names.index("weight_decay")] = ratio * parts["adam_wd"]
  hidden[names.index("muon")] = 1.0
  hidden[names.index("weight_decay")] = parts["wd"]
  return mix, {"hidden_mix": [h - m for h, m in zip(hidden, mix)]}


SWITCH = Switch(
    name="muon", doc=DOC,
    fields=(ConfigField("muon_beta", "float", 0.95), ConfigField("muon_ns_steps", "int", 5),
            ConfigField("muon_eps", "float", 1e-8),
            ConfigField("muon_matrices", "str", "hidden")),
    config_properties={"muon_momentum": muon_momentum},
    elementwise_features=MUON_FEATURES, candidates=MUON_CANDIDATES,
    classical={"muon": ("muon", _MUON)}, classical_mix=_muon_mix,
    classical_other={"muon": "nadam"},
    validate=_validate,
    theta_shapes=lambda config, num_candidates: {"hidden_mix": (num_candidates,)},
    prepare=lambda config, params, statics: check_muon_fan_in(params,
                                                              statics.get("muon_fan_in")),
    apart=muon_tensors, init_state=_init_state, advance=_advance,
    leaf_candidates=_leaf_candidates, leaf_features=_leaf_features,
    statics_from_roles=lambda config, params, roles: {
        "muon_fan_in": muon_fan_ins(config, params, roles)},
    needs_roles=lambda config: config.muon_matrices == "hidden",
)
