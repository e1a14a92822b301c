"""Closed-form theta for which the learned optimizer equals a classical optimizer.

Defaults are read from the signatures of :mod:`metaopt.optimizers` so the two never
drift; each hyperparameter maps to an LO config field, a mixing weight or the global
step size, or must keep a value the LO's state represents.

An optimizer that needs a switch (:mod:`metaopt.lopt._switches`) is declared by it
(``Switch.classical``, ``classical_mix``): Muon (Jordan et al, "Muon: An optimizer for
hidden layers in neural networks", 2024) by the ``muon`` switch, whose theta uses its
per-role gate:

  hidden:  -eta (s NS(mu_hat) + lambda x),   others:  -eta (r c_nadam + r lambda_A x),
  r = eta_A / eta.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

from metaopt.lopt._config import CANDIDATE_NAMES, SWITCHES, LOConfig

_NOT_GIVEN = inspect.Parameter.empty

# Per optimizer: candidate it selects, and what each hyperparameter maps to:
#   ("lr",)               -> global step size exp(log_lr)
#   ("wd",)               -> mixing weight of the decoupled weight-decay candidate
#   ("config", field)     -> an LOConfig field
#   ("decay", i)          -> momentum_decays[i]
#   ("fixed", value)      -> only this value is representable
_ADAM = {"learning_rate": ("lr",), "b1": ("decay", 0),
         "b2": ("config", "second_moment_decay"), "eps": ("config", "adam_eps"),
         "eps_root": ("fixed", 0.0), "weight_decay": ("wd",)}
_TAM = {"learning_rate": ("lr",), "beta": ("config", "tam_beta"),
        "gamma": ("config", "tam_gamma"), "eps": ("config", "tam_eps"),
        "weight_decay": ("wd",)}
CLASSICAL = {
    "sgdm": ("sgdm", {"learning_rate": ("lr",), "momentum": ("decay", 0),
                      "nesterov": ("fixed", False),
                      "weight_decay": ("wd",)}),
    "adamw": ("adam", _ADAM),
    "cautious_adamw": ("cautious_adam", _ADAM),
    "lion": ("lion", {"learning_rate": ("lr",), "b1": ("config", "lion_b1"),
                      "b2": ("decay", 1), "weight_decay": ("wd",)}),
    "tam": ("tam", _TAM),
    "adatam": ("adatam", {**_TAM, "eps": ("config", "tam_eps", "adatam_eps"),
                          "b2": ("config", "second_moment_decay")}),
    "ademamix": ("ademamix", {"learning_rate": ("lr",), "b1": ("decay", 0),
                              "b2": ("config", "second_moment_decay"),
                              "b3": ("decay", 2), "alpha": ("config", "ademamix_alpha"),
                              "eps": ("config", "adam_eps"), "weight_decay": ("wd",),
                              "t_alpha": ("fixed", None), "t_beta3": ("fixed", None)}),
    "momo_adam": ("momo_adam", {"learning_rate": ("config", "momo_alpha"),
                                "b1": ("decay", 0), "b2": ("config", "second_moment_decay"),
                                "eps": ("config", "adam_eps"),
                                "lower_bound": ("config", "momo_lower_bound"),
                                "weight_decay": ("fixed", 0.0),
                                "adapt_lower_bound": ("fixed", False)}),
    "grams": ("grams", {"learning_rate": ("lr",), "b1": ("decay", 0),
                        "b2": ("config", "second_moment_decay"),
                        "eps": ("config", "grams_eps"), "weight_decay": ("wd",)}),
    "laprop": ("laprop", {"learning_rate": ("lr",), "b1": ("config", "laprop_b1"),
                          "b2": ("config", "second_moment_decay"),
                          "eps": ("config", "laprop_eps"), "weight_decay": ("wd",)}),
}
# The optimizers a switch lets the LO equal (Muon, with the ``muon`` switch).
_SWITCH_OF = {name: s for s in SWITCHES for name in s.classical}
CLASSICAL.update({name: entry for s in SWITCHES for name, entry in s.classical.items()})
# The candidate of the tensors an optimizer does not give its own candidate (Muon's
# AdamW part): the mix of the non-hidden tensors.
OTHER_CANDIDATE = {name: c for s in SWITCHES for name, c in s.classical_other.items()}
_INT_FIELDS = {f.name for f in dataclasses.fields(LOConfig) if f.type in ("int", int)}


def classical_config_and_mix(name: str, hparams: dict):
  """Returns (LOConfig kwargs, mixing weights, log step size, the theta entries of the
  switch it needs (``{"hidden_mix": ...}`` for Muon; ``{}``)) equal to ``name``."""
  import metaopt.optimizers as optimizers  # pylint: disable=g-import-not-at-top
  if name not in CLASSICAL:
    raise ValueError(f"from_classical: unknown optimizer {name!r}; the LO subsumes "
                     f"{sorted(CLASSICAL)}.")
  candidate, mapping = CLASSICAL[name]
  signature = inspect.signature(getattr(optimizers, name))
  unknown = sorted(set(hparams) - set(signature.parameters))
  if unknown:
    raise ValueError(f"from_classical({name!r}): unknown hyperparameters {unknown}; "
                     f"{name} takes {list(signature.parameters)}.")
  values = {k: p.default for k, p in signature.parameters.items()}
  values.update(hparams)
  config, decays = {}, [0.9, 0.99, 0.9999]
  switch = _SWITCH_OF.get(name)
  names = CANDIDATE_NAMES + (() if switch is None else switch.candidates)
  mix = [0.0] * len(names)
  mix[names.index(candidate)] = 1.0
  log_lr, lr, parts = 0.0, 1.0, {"wd": 0.0, "adam_wd": 0.0, "adam_lr": None}
  for key, value in values.items():
    if key not in mapping:
      if key in hparams or value is not None:
        raise ValueError(f"from_classical({name!r}): hyperparameter {key}={value!r} "
                         "cannot be represented by the learned optimizer.")
      continue
    kind = mapping[key][0]
    if value is _NOT_GIVEN:
      raise ValueError(f"from_classical({name!r}) needs {key}= (it has no default).")
    if kind == "fixed":
      if value != mapping[key][1]:
        raise ValueError(f"from_classical({name!r}): {key}={value!r} cannot be "
                         f"represented; only {key}={mapping[key][1]!r} can.")
    elif callable(value):
      raise ValueError(f"from_classical({name!r}): {key} is a schedule; only constant "
                       "values can be represented (use as_optax(learning_rate=schedule) "
                       "for a schedule on the whole step).")
    elif kind == "lr":
      if not value > 0:
        raise ValueError(f"from_classical({name!r}): learning_rate={value!r}; expected > 0.")
      log_lr, lr = math.log(value), float(value)
    elif kind in ("wd", "adam_wd", "adam_lr"):
      parts[kind] = None if value is None else float(value)
      if kind == "wd":
        mix[names.index("weight_decay")] = float(value)
    elif kind == "decay":
      decays[mapping[key][1]] = float(value)
    else:
      for field in mapping[key][1:]:
        config[field] = int(value) if field in _INT_FIELDS else float(value)
  config["momentum_decays"] = tuple(decays)
  if switch is None:
    return config, mix, log_lr, {}
  config[switch.name] = True
  mix, entries = switch.classical_mix(names, parts, lr)
  return config, mix, log_lr, entries
