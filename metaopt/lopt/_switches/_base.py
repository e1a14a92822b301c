"""The interface of an optional feature (a switch) of the learned optimizer.

A switch is declared once, in a module of its own (:mod:`metaopt.lopt._switches.muon`,
:mod:`metaopt.lopt._switches.step_size`), as a :class:`Switch`: the ``LOConfig`` fields
it adds, the ``LOState`` fields it adds, the features and candidates it appends, the
theta entries it adds and the hooks the core calls at each stage of a step. The core
(:mod:`metaopt.lopt._state`, :mod:`metaopt.lopt._update`, :mod:`metaopt.lopt._rule`,
:mod:`metaopt.lopt._network`) iterates over ``config.switches_on`` and never names a
switch. Every hook has a default that does nothing, so a switch defines only the hooks
it needs. A new switch is its module plus one line in :data:`metaopt.lopt._switches.SWITCHES`.

What a hook is given:

* ``config``: the :class:`metaopt.lopt.LOConfig`.
* ``info``: what :attr:`Switch.prepare` made of the parameters and the static per-leaf
  inputs of ``init_state``/``update`` (``statics``: ``{"muon_fan_in": ...}``).
* ``init``: an :class:`InitContext` (buffers in the state's layout).
* ``step``: the core's view of one step (:class:`metaopt.lopt._update._Step`: ``g``,
  ``x``, ``count``, ``blocks``, ``keep``, ``leaves``, ``buffers``, ``bias_correction``,
  ``scalar_dtype``, ``with_loss``, ``treedef``).
* ``inp``: one block's :class:`metaopt.lopt._rule.LeafInputs`; a switch's own inputs
  are ``inp.extra[switch.name]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple


@dataclasses.dataclass(frozen=True)
class ConfigField:
  """One hyperparameter a switch adds to ``LOConfig`` (``type``: ``"float"``,
  ``"int"`` (a positive int) or ``"str"``; floats are checked finite by ``LOConfig``)."""

  name: str
  type: str
  default: Any


class InitContext(NamedTuple):
  """What ``init_state`` gives a switch's :attr:`Switch.init_state`."""

  params: Any  # the parameter tree (arrays, sharded arrays or ShapeDtypeStructs)
  new_buffer: Callable[[], Any]  # a zero parameter-shaped buffer in the state's layout
  copy_buffer: Callable[[], Any]  # a copy of the params in the state's layout
  zeros: Callable[[], Any]  # a zero tree shaped like the params (per tensor)
  scalar_dtype: Any  # the dtype of the state's scalars (loss EMAs)


class SwitchStep(NamedTuple):
  """What a switch computed in one step (:attr:`Switch.advance`), for the later stages."""

  # Per block: its inputs (LeafInputs.extra[name]) to both the statistics and the update
  # pass, or None.
  block_inputs: Any = None
  # Per tensor (None where absent): its inputs to the update pass only. Only tensors that
  # keep their own buffers (Switch.apart) may have one; they become programs of their own.
  tensor_inputs: Any = None
  # [num_tensors, len(elementwise_features)] sums of squares of its per-parameter
  # features (their RMS normalization), or None.
  sum_sq: Any = None
  # What its per-tensor features need besides the statistics (the loss trend).
  scalars: Any = None
  # The new state given the core's new state (its fields advanced, a skipped step's
  # selection applied).
  update_state: Callable[[Any], Any] = lambda state: state


def _nothing(*args, **kwargs):
  del args, kwargs


def _no_tensors(config, info) -> set:
  del config, info
  return set()


def _state_unchanged(config, init, info, state):
  del config, init, info
  return state


def _no_step(config, step, state, info, moments, cross) -> SwitchStep:
  del config, step, state, info, moments, cross
  return SwitchStep()


def _no_terms(config, inp) -> list:
  del config, inp
  return []


def _no_features(config, theta, inp, mix):
  del config, theta, inp
  return [], mix


@dataclasses.dataclass(frozen=True)
class Switch:
  """An optional feature of the LO, declared once (see the module docstring).

  The features and candidates it appends follow those of the switches registered
  before it, so the rows of an LO without it keep their places.
  """

  name: str  # the LOConfig bool that turns it on
  doc: str  # its LOConfig attributes, for LOConfig's docstring
  fields: tuple[ConfigField, ...] = ()  # its LOConfig hyperparameters
  # {name: config -> value}: read-only LOConfig properties derived from its fields.
  config_properties: dict = dataclasses.field(default_factory=dict)
  state_fields: tuple[str, ...] = ()  # its LOState fields (None with it off)
  elementwise_features: tuple[str, ...] = ()  # per parameter, RMS-normalized and clipped
  tensor_features: tuple[str, ...] = ()  # per tensor, through the MLP's hidden bias
  candidates: tuple[str, ...] = ()  # classical directions appended to the mix
  statistic_sums: int = 0  # how many per-tensor sums statistic_terms returns
  # Optimizers the LO equals with it on: {name: (candidate, hyperparameter mapping)}
  # (metaopt.lopt._classical), and (names, parts, lr) -> their (mix, {theta entry:
  # value}) from the parts of the hyperparameters (weight decays, learning rates).
  classical: dict = dataclasses.field(default_factory=dict)
  classical_mix: Callable | None = None
  # {optimizer: the candidate of the tensors it gives no candidate of its own}.
  classical_other: dict = dataclasses.field(default_factory=dict)
  # config -> None; raises ValueError for its fields' ranges.
  validate: Callable[[Any], None] = _nothing
  # (config, num_candidates) -> {theta entry: shape} it adds.
  theta_shapes: Callable[[Any, int], dict] = lambda config, num_candidates: {}
  # (config, params, statics) -> info: its static per-leaf inputs, checked.
  prepare: Callable[[Any, Any, dict], Any] = lambda config, params, statics: None
  # (config, info) -> indices of the tensors that keep their own buffers.
  apart: Callable[[Any, Any], set] = _no_tensors
  # (config, init, info, state) -> state with its buffers.
  init_state: Callable = _state_unchanged
  # (config, step, state, info, moments, cross) -> SwitchStep, after the cross-tensor
  # scalars (stage 2; ``moments``: stage 1's per block, ``cross``: stage 2's).
  advance: Callable = _no_step
  # (config, ctx, inp, inverse_denominator) -> its candidates (None: absent here).
  leaf_candidates: Callable = lambda config, ctx, inp, inverse_denominator: ()
  # (config, inp) -> the terms of its statistic_sums per-tensor sums.
  statistic_terms: Callable = _no_terms
  # (config, sums, sum_sq, switch_step) -> [num_tensors, len(tensor_features)]: from its
  # sums ([n, statistic_sums]) and every normalized feature's sums of squares ({name: [n]}).
  tensor_feature_values: Callable = lambda config, sums, sum_sq, switch_step: None
  # (config, theta, inp, mix) -> ([(feature name, raw value)] present on this block,
  # the mix this block uses).
  leaf_features: Callable = _no_features
  # (config, params, roles) -> {static input of init_state/update: value}.
  statics_from_roles: Callable = lambda config, params, roles: {}
  # config -> whether statics_from_roles reads the muP roles.
  needs_roles: Callable[[Any], bool] = lambda config: False

  @property
  def features(self) -> tuple[str, ...]:
    """Its MLP inputs, in the order of their rows of ``theta["w1"]``."""
    return self.elementwise_features + self.tensor_features
