"""Config type -> builder, and configs to and from JSON.

``build(config)`` dispatches on the config's class through :data:`BUILDERS` (an explicit
dict, nothing registered by import side effects). Configs serialize to JSON with a type
tag (``"__type__"``) on every dataclass, nested data configs included; tuples come back
as tuples.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tasks import base
from tasks import data as data_lib
from tasks.models import conv
from tasks.models import logistic
from tasks.models import mlp
from tasks.models import mlp_haiku
from tasks.models import quadratic
from tasks.models import sp_autoencoder
from tasks.models import sp_convnet
from tasks.models import sp_recurrent
from tasks.models import sp_regression
from tasks.models import sp_resmlp
from tasks.models import sp_transformer
from tasks.models import transformer
from tasks.models import user


def _build_mlp(config: mlp.MLPConfig, num_steps: int) -> base.Task:
  builder = mlp_haiku.build if config.framework == "haiku" else mlp.build
  return builder(config, num_steps)


BUILDERS = {
    mlp.MLPConfig: _build_mlp,
    conv.ConvConfig: conv.build,
    transformer.TransformerLMConfig: transformer.build,
    logistic.LogisticConfig: logistic.build,
    quadratic.QuadraticConfig: quadratic.build,
    user.UserModelConfig: user.build,
    sp_transformer.SPTransformerLMConfig: sp_transformer.build,
    sp_recurrent.SPRecurrentConfig: sp_recurrent.build,
    sp_autoencoder.SPAutoencoderConfig: sp_autoencoder.build,
    sp_resmlp.SPResMLPConfig: sp_resmlp.build,
    sp_convnet.SPConvNetConfig: sp_convnet.build,
    sp_regression.SPRegressionConfig: sp_regression.build,
}

CONFIG_TYPES = {cls.__name__: cls for cls in (*BUILDERS, *data_lib.LOADERS)}

_TYPE_KEY = "__type__"


def build(config: Any, num_steps: int = base.DEFAULT_NUM_STEPS) -> base.Task:
  """Builds the Task a config describes."""
  try:
    builder = BUILDERS[type(config)]
  except KeyError:
    raise ValueError(f"{config!r} is not a task config; expected one of "
                     f"{[c.__name__ for c in BUILDERS]}.") from None
  return builder(config, num_steps)


def _to_tree(value: Any) -> Any:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    if type(value).__name__ not in CONFIG_TYPES:
      raise TypeError(f"{type(value).__name__} is not a known config type.")
    fields = {f.name: _to_tree(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return {_TYPE_KEY: type(value).__name__, **fields}
  if isinstance(value, (tuple, list)):
    return [_to_tree(v) for v in value]
  return value


def _from_tree(value: Any) -> Any:
  if isinstance(value, dict):
    fields = {k: _from_tree(v) for k, v in value.items() if k != _TYPE_KEY}
    name = value.get(_TYPE_KEY)
    if name not in CONFIG_TYPES:
      raise ValueError(f"unknown config type {name!r}; expected one of {sorted(CONFIG_TYPES)}.")
    return CONFIG_TYPES[name](**fields)
  if isinstance(value, list):
    return tuple(_from_tree(v) for v in value)
  return value


def config_to_json(config: Any) -> str:
  """A config (task or data) as a JSON string with type tags."""
  return json.dumps(_to_tree(config), sort_keys=True)


def config_from_json(s: str) -> Any:
  """Inverse of :func:`config_to_json`."""
  return _from_tree(json.loads(s))
