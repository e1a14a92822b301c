"""``LearnedOptimizer``: theta + config, usable as a drop-in optax optimizer."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaopt import mup as mup_lib
from metaopt.lopt import _network, _update
from metaopt.lopt._config import CANDIDATE_NAMES, SWITCHES, LOConfig
from metaopt.optimizers import _validation

Tree = Any


@dataclasses.dataclass(frozen=True)
class LearnedOptimizer:
  """A learned optimizer: static ``config`` plus meta-learned ``theta``.

  Use it like any optax optimizer::

    opt = metaopt.pretrained().as_optax(num_steps=1000)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, value=loss)  # value optional

  Attributes:
    config: the :class:`LOConfig` (state decays, MLP size, muP switch).
    theta: the meta-learned parameters (see :mod:`metaopt.lopt._network`).
    metadata: free-form JSON-able description (meta-training config, name, ...).
  """

  config: LOConfig
  theta: dict
  metadata: dict = dataclasses.field(default_factory=dict)

  # ------------------------------------------------------------------ construction
  @classmethod
  def random(cls, key: jax.Array, config: LOConfig | None = None, *,
             hidden_scale: float = 1.0, output_scale: float = 0.0) -> "LearnedOptimizer":
    """An LO with a random MLP (``output_scale`` > 0 also randomizes the last layer)."""
    config = config or LOConfig()
    k1, k2, k3 = jax.random.split(key, 3)
    theta = _network.init_theta(config, k1, hidden_scale=hidden_scale,
                                log_lr=math.log(1e-3))
    theta["mix"] = theta["mix"].at[CANDIDATE_NAMES.index("adam")].set(1.0)
    if output_scale:
      theta["w2"] = output_scale * jax.random.normal(k2, theta["w2"].shape)
      theta["b2"] = output_scale * jax.random.normal(k3, theta["b2"].shape)
    return cls(config, theta)

  @classmethod
  def from_classical(cls, name: str, mup: bool = False, *, key: jax.Array | None = None,
                     **hparams) -> "LearnedOptimizer":
    """An LO whose updates equal ``metaopt.optimizers.<name>(**hparams)``'s.

    Exact up to floating-point rounding with ``mup=False``; with ``mup=True`` it is
    the muP version (e.g. muAdamW), the warm start for meta-training. Hyperparameters
    the LO's state cannot represent raise ``ValueError`` naming them. ``"muon"`` turns
    the ``muon`` switch on; its roles are given to :meth:`as_optax` (``roles=``,
    ``labels=``, ``base_params=`` or inferred), as to ``metaopt.optimizers.muon``.
    """
    from metaopt.lopt._classical import classical_config_and_mix  # pylint: disable=g-import-not-at-top
    config_kwargs, mix, log_lr, switch_entries = classical_config_and_mix(name, hparams)
    config = LOConfig(mup=mup, **config_kwargs)
    key = jax.random.key(0) if key is None else key
    dtype = jnp.result_type(float)  # float64 when x64 is enabled: exact parity tests.
    theta = _network.init_theta(config, key)
    theta = jax.tree.map(lambda a: a.astype(dtype), theta)
    theta["log_lr"] = jnp.asarray(log_lr, dtype)
    theta["mix"] = jnp.asarray(mix, dtype)
    for entry, value in switch_entries.items():  # a switch's theta (Muon's hidden_mix)
      theta[entry] = jnp.asarray(value, dtype)
    return cls(config, theta, {"from_classical": name, "hparams": _jsonable(hparams)})

  def with_theta(self, theta: dict) -> "LearnedOptimizer":
    return dataclasses.replace(self, theta=theta)

  def with_config(self, **changes) -> "LearnedOptimizer":
    """The same theta under a changed config, e.g. ``with_config(horizon_decay="none")``.

    Only changes that keep theta's shapes are allowed (not ``hidden_size``).
    """
    config = dataclasses.replace(self.config, **changes)
    if _network.theta_shapes(config) != _network.theta_shapes(self.config):
      raise ValueError(f"with_config({changes}) changes theta's shapes; build a new LO "
                       "with LearnedOptimizer.random or from_classical instead.")
    return dataclasses.replace(self, config=config)

  def extended(self, **switches: bool) -> "LearnedOptimizer":
    """This LO with the named switches turned on and every weight they add zero.

    ``switches``: any of :data:`metaopt.lopt._switches.SWITCHES`' names as keywords
    (``extended(muon=True)``, ``extended(step_size_features=True)``).

    What it is for: warm-starting the meta-training of a switch
    (``MetaConfig.muon``, ``MetaConfig.step_size_features``) from an existing artifact.
    The new candidates (``mix``, ``hidden_mix``) and feature rows (``w1``) start at
    zero, so the extended LO gives this LO's updates (to float32 rounding: with
    ``muon`` the hidden matrices keep their own buffers, summed per tensor instead of
    in the flat buffer) until meta-training moves them. Existing rows keep their
    values, matched by name (:attr:`LOConfig.feature_names`, ``candidate_names``). A
    switch already on stays on (its weights unchanged); ``False`` changes nothing
    (turning a switch off would drop trained weights: build a new LO instead).
    Switch hyperparameters (``muon_beta``, ...) are then set with :meth:`with_config`.
    """
    unknown = sorted(set(switches) - {s.name for s in SWITCHES})
    if unknown:
      raise TypeError(f"extended() got unknown switches {unknown}; expected some of "
                      f"{[s.name for s in SWITCHES]}.")
    config = dataclasses.replace(self.config, **{
        name: getattr(self.config, name) or bool(on) for name, on in switches.items()})
    theta = dict(self.theta)

    def by_name(values, old_names, new_names):  # rows of values, by name (new: zeros)
      zero = jnp.zeros_like(values[0])
      return jnp.stack([values[old_names.index(n)] if n in old_names else zero
                        for n in new_names])

    theta["w1"] = by_name(theta["w1"], self.config.feature_names, config.feature_names)
    theta["mix"] = by_name(theta["mix"], self.config.candidate_names,
                           config.candidate_names)
    for entry, shape in _network.theta_shapes(config).items():  # a switch's: zeros
      if entry not in theta:
        theta[entry] = jnp.zeros_like(theta["mix"], shape=shape)
    shapes = {k: tuple(jnp.shape(v)) for k, v in theta.items()}
    assert shapes == _network.theta_shapes(config), shapes
    return dataclasses.replace(self, config=config, theta=theta)

  # ------------------------------------------------------------------ optax
  def as_optax(self, num_steps: int | None = None,
               learning_rate: float | Callable[[jax.Array], jax.Array] = 1.0, *,
               roles: Tree | None = None, labels: Tree | None = None,
               base_params: Tree | None = None, sp: bool = False
               ) -> optax.GradientTransformationExtraArgs:
    """This LO as an ``optax.GradientTransformationExtraArgs``.

    Args:
      num_steps: the training horizon in optimizer steps (not epochs), when known: it
        gives the fraction-of-training feature and, with ``horizon_decay="linear"``,
        the decay of every update to ``1/num_steps`` of its size at the last step.
        Past ``num_steps`` the multiplier stays at ``1/num_steps`` (training goes on,
        slowly; ``state.count > num_steps`` tells you the horizon was passed).
        ``None``: the LO works without it (and does not decay).
      learning_rate: a multiplier on the learned step (float or optax schedule).
      roles: explicit muP roles (a :class:`metaopt.mup.ParamRole` tree or a callable
        ``params -> roles``).
      labels: role names per leaf (``"input"/"hidden"/"output"/"vector"``).
      base_params: a narrower base model's params; roles follow the muP rule.
      sp: turn muP scaling off (standard parametrization).

    :func:`metaopt.mup.resolve_roles` reads them in that order; without any,
    :func:`metaopt.mup.infer_roles` guesses (and warns when unsure). With
    ``config.muon`` the roles also decide which tensors get the orthogonalized
    candidate (hidden matrices, as in :func:`metaopt.optimizers.muon`), with muP on
    or off.

    A step whose gradients or ``value`` hold a NaN or inf is skipped, as by
    ``optax.apply_if_finite``: the updates are zero, the state (and so the step count)
    is left bitwise unchanged and ``state.num_nonfinite`` counts the skipped steps.
    ``learning_rate`` and ``num_steps`` may be traced (``optax.inject_hyperparams``).
    """
    num_steps = _check_num_steps(num_steps)
    _validation.check_nonnegative(learning_rate=learning_rate)
    config, theta = self.config, self.theta
    read_roles = functools.partial(mup_lib.resolve_roles, roles=roles, labels=labels,
                                   base_params=base_params, base_fan_in=config.base_fan_in)
    use_mup = config.mup and not sp
    by_role = any(s.needs_roles(config) for s in config.switches_on)

    def init_fn(params):
      _check_float_leaves(params, "params")
      r = read_roles(params) if use_mup or by_role else None
      scales = mup_lib.update_scales(r) if use_mup else jax.tree.map(lambda _: 1.0, params)
      return _update.init_state(params, scales, config, **switch_statics(config, params, r))

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
      del extra_args
      _check_structure(updates, params, state)
      lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
      r = read_roles(params, warn=False) if by_role else None  # static; init warned
      # A step with non-finite gradients or loss is skipped and counted (_update.update).
      return _update.update(config, theta, updates, state, params, value=value,
                            num_steps=num_steps, learning_rate=lr, skip_nonfinite=True,
                            **switch_statics(config, params, r))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def switch_statics(config: LOConfig, params: Tree, roles: Tree | None) -> dict:
  """The static per-leaf inputs of ``init_state``/``update`` the switches turned on
  read off the params and muP ``roles`` (``muon_fan_in`` with ``muon``)."""
  return {k: v for s in config.switches_on
          for k, v in s.statics_from_roles(config, params, roles).items()}


def _check_num_steps(num_steps):
  """``num_steps`` as an int (or None); traced values (``inject_hyperparams``) pass."""
  if num_steps is None or isinstance(num_steps, jax.core.Tracer):
    return num_steps
  if isinstance(num_steps, bool) or not (
      isinstance(num_steps, (int, np.integer)) or
      (isinstance(num_steps, (np.ndarray, jax.Array)) and np.shape(num_steps) == () and
       jnp.issubdtype(jnp.result_type(num_steps), jnp.integer))) or num_steps <= 0:
    raise ValueError(f"num_steps={num_steps!r}; expected a positive int or None.")
  return int(num_steps)


def _jsonable(d: dict) -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, (bool, int, float, str)) or v is None:
      out[k] = v
    elif isinstance(v, (tuple, list)):
      out[k] = [float(a) for a in v]
    else:
      out[k] = repr(v)
  return out


def _check_float_leaves(tree, what: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{what}{jax.tree_util.keystr(path)} has dtype {dtype}; the learned "
                       "optimizer expects floating-point leaves (mask integer leaves "
                       "out with optax.masked).")


def _check_structure(grads, params, state) -> None:
  if params is None:
    raise ValueError("the learned optimizer needs the parameters: call "
                     "`opt.update(grads, state, params, value=loss)`.")
  ref = jax.tree.structure(state.mup_scale)  # one scalar per tensor, in both layouts.
  for what, tree in (("grads", grads), ("params", params)):
    if jax.tree.structure(tree) != ref:
      got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
      want = {jax.tree_util.keystr(p) for p, _ in
              jax.tree_util.tree_flatten_with_path(state.mup_scale)[0]}
      raise ValueError(
          f"{what} does not match the optimizer state's tree: leaves not in the state: "
          f"{sorted(got - want)[:5]}; state leaves missing: {sorted(want - got)[:5]}. "
          "Initialize the optimizer with the same parameter tree.")
    _check_float_leaves(tree, what)
    for (path, a), shape in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                _update.parameter_shapes(state)):
      if tuple(jnp.shape(a)) != tuple(shape):
        raise ValueError(f"{what}{jax.tree_util.keystr(path)} has shape {jnp.shape(a)} but "
                         f"the optimizer state expects {tuple(shape)}.")
