"""One list of optimizer names (metaopt.optimizers.OPTIMIZER_NAMES) and what must agree.

The evaluation derives its names from it; the learned optimizer's classical table and
candidate list are checked against it here, so adding an optimizer in one place and
forgetting another fails a test instead of a user.
"""

from __future__ import annotations

import inspect

import pytest

import metaopt.optimizers as mo
from metaopt.eval import baselines
from metaopt.lopt import CANDIDATE_NAMES
from metaopt.lopt import LOConfig
from metaopt.lopt import _classical

# Exported functions that are parts of optimizers, not optimizers.
BUILDING_BLOCKS = {"adamp_projection", "muon_fan_ins", "muon_fan_ins_2d", "muon_labels",
                   "proximal_decay_step",
                   "schedule_free_eval_params"}
# The LO's candidate for decoupled weight decay: a term every classical entry mixes in
# (its "wd" mapping), not an optimizer of its own.
DECAY_CANDIDATE = "weight_decay"
# Every candidate an LO can have: the switchable ones (LOConfig.muon) included.
ALL_CANDIDATES = LOConfig(muon=True).candidate_names


def _exported_factories() -> set[str]:
  return {name for name in mo.__all__
          if inspect.isfunction(getattr(mo, name)) and not name.startswith("scale_by_")
          and name not in BUILDING_BLOCKS}


def test_names_table_is_the_exported_factories():
  assert len(set(mo.OPTIMIZER_NAMES)) == len(mo.OPTIMIZER_NAMES), "a name is listed twice"
  listed, exported = set(mo.OPTIMIZER_NAMES), _exported_factories()
  assert listed == exported, (f"in OPTIMIZER_NAMES only: {sorted(listed - exported)}; "
                              f"exported only: {sorted(exported - listed)}")


def test_evaluation_names_come_from_the_table():
  assert set(baselines.METAOPT_NAMES) <= set(mo.OPTIMIZER_NAMES)
  takes_lr = [n for n in mo.OPTIMIZER_NAMES
              if next(iter(inspect.signature(getattr(mo, n)).parameters)) == "learning_rate"]
  assert baselines.METAOPT_NAMES == tuple(takes_lr)
  for name in baselines.METAOPT_NAMES:
    assert baselines.resolve(name) == (f"metaopt.optimizers.{name}", getattr(mo, name))
  named = (set(baselines.LR_CENTERS) | set(baselines.EVAL_PARAMS) |
           set(baselines.DEFAULT_TUNED) | set(baselines.DEFAULT_UNTUNED))
  assert named <= set(baselines.valid_names()), sorted(named - set(baselines.valid_names()))


@pytest.mark.parametrize("name", sorted(_classical.CLASSICAL))
def test_classical_table_maps_optimizers_of_the_table(name):
  assert name in mo.OPTIMIZER_NAMES
  candidate, mapping = _classical.CLASSICAL[name]
  assert candidate in ALL_CANDIDATES
  assert _classical.OTHER_CANDIDATE.get(name, candidate) in ALL_CANDIDATES
  parameters = inspect.signature(getattr(mo, name)).parameters
  # Hyperparameters the table does not map must default to None (from_classical skips
  # those), or from_classical(name) with defaults would fail.
  unmapped = {k: p.default for k, p in parameters.items() if k not in mapping}
  assert all(v is None for v in unmapped.values()), unmapped


def test_every_candidate_maps_to_an_optimizer():
  classical_candidates = ({candidate for candidate, _ in _classical.CLASSICAL.values()} |
                          set(_classical.OTHER_CANDIDATE.values()))
  assert set(ALL_CANDIDATES) - classical_candidates == {DECAY_CANDIDATE}
  assert set(CANDIDATE_NAMES) < set(ALL_CANDIDATES)
  assert all(mapping.get("weight_decay") in (("wd",), ("fixed", 0.0))
             for _, mapping in _classical.CLASSICAL.values())
