"""TaskFamily: a distribution over configs of one kind of task."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax

from tasks import base
from tasks import registry


@dataclasses.dataclass(frozen=True)
class TaskFamily:
  """Samples configs by drawing each varied field uniformly from its choices.

  Example::

    family = TaskFamily(MLPConfig(), {"width": (32, 64, 128), "depth": (1, 2, 3)})
    task = family.build(family.sample(jax.random.key(0)))

  Attributes:
    base: the config whose other fields every sample keeps.
    choices: field name -> options (any values the field accepts, data configs too).
  """

  base: Any
  choices: Mapping[str, Sequence[Any]]

  def __post_init__(self):
    names = {f.name for f in dataclasses.fields(self.base)}
    unknown = sorted(set(self.choices) - names)
    if unknown:
      raise ValueError(f"{type(self.base).__name__} has no fields {unknown}; "
                       f"expected some of {sorted(names)}.")
    empty = [k for k, v in self.choices.items() if not len(v)]
    if empty:
      raise ValueError(f"TaskFamily choices {empty} are empty.")

  def sample(self, key: jax.Array) -> Any:
    """A config; deterministic in ``key`` (host-side, not jittable)."""
    updates = {}
    for i, name in enumerate(sorted(self.choices)):
      options = self.choices[name]
      j = int(jax.random.randint(jax.random.fold_in(key, i), (), 0, len(options)))
      updates[name] = options[j]
    return dataclasses.replace(self.base, **updates)

  def build(self, config: Any, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
    return registry.build(config, num_steps)
