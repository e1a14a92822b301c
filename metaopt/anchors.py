"""The untuned anchors: the best one-line defaults a user runs without tuning anything.

Muon (Jordan et al, "Muon: An optimizer for hidden layers in neural networks", 2024) as
``optax.contrib.muon`` ships it -- Newton-Schulz orthogonalized Nesterov momentum on every
2-D parameter, Nesterov Adam on the rest -- at one fixed peak learning rate with a
linear warmup over the first 5% of the steps and a cosine decay to zero at ``num_steps``:

.. math::
  \\eta_c = \\eta_\\text{peak}\\, m(c), \\quad m(c) = c / W \\;(c < W), \\quad
  m(c) = \\tfrac12 (1 + \\cos(\\pi (c - W) / (N - W))) \\;(W \\le c \\le N),

with ``W = max(1, round(0.05 N))``. Beside it
AdamW (Loshchilov & Hutter, arXiv:1711.05101) at its default 1e-3 with the same schedule.
These are the bar the learned optimizer is measured against (``evaluate.py``'s default
untuned set) and the prior it starts from (:func:`learned_prior`).

The peak learning rate was chosen once, on ``validation`` + ``validation-user`` only, by
the rule written down before its scores were read (``benchmarks/ablations/release_030.md``);
the scores are in ``benchmarks/ablations/anchor_lr.json``.
"""

from __future__ import annotations

import optax
import optax.contrib


# Chosen on validation + validation-user (benchmarks/ablations/anchor_lr.json, rule in
# release_030.md): the geometric mean over the 11 tasks of the final loss relative to
# the best of 14 settings per task (2 seeds) was 2.52 for optax's 2-D split at 10^-1.4,
# then 3.33 (2-D, 10^-1.6), 3.42 (2-D, 10^-1.2), 3.77 (role split, 10^-1.8); 10^-1.0
# diverged. The role split (metaopt.optimizers.muon, best at 10^-1.8) was the better
# on 7 of the 11 tasks, but 28x, 35x and 424x the best loss on the conv digits, the
# digits MLP and the full-batch regression, where the 2-D split is within 1.3x, 3.1x, 13x.
MUON_LR = 0.03981
ADAMW_LR = 1e-3
WARMUP_FRACTION = 0.05
# Which tensors Muon orthogonalizes: "all_2d" (optax.contrib.muon's default) or "hidden"
# (muP roles, metaopt.optimizers.muon); chosen with MUON_LR (above).
MUON_MATRICES = "all_2d"


def warmup_cosine(peak: float, num_steps: int, warmup_fraction: float = WARMUP_FRACTION
                  ) -> optax.Schedule:
  """``count -> peak * m(count)``: the anchors' schedule (module docstring), also the
  ``warmup_cosine`` schedule of every tuned baseline (:mod:`metaopt.eval.sweep`)."""
  warmup = max(1, int(round(warmup_fraction * num_steps)))
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, num_steps, 0.0)


def muon(num_steps: int, learning_rate: float = MUON_LR) -> optax.GradientTransformation:
  """Muon at its default: ``optax.contrib.muon`` with the anchors' schedule."""
  return optax.contrib.muon(learning_rate=warmup_cosine(learning_rate, num_steps))


def adamw(num_steps: int, learning_rate: float = ADAMW_LR) -> optax.GradientTransformation:
  """AdamW at its default learning rate with the anchors' schedule."""
  return optax.adamw(learning_rate=warmup_cosine(learning_rate, num_steps))


def learned_prior(learning_rate: float = MUON_LR, *, mup: bool = False):
  """The learned optimizer that *is* :func:`muon` (``mup=False``: to float rounding).

  ``LearnedOptimizer.from_classical("muon")`` with the anchor's learning rate, its split
  (``LOConfig.muon_matrices``) and its schedule (``horizon_decay="warmup_cosine"``), so
  ``lo.as_optax(num_steps=N)`` gives :func:`muon` ``(N)``'s updates. ``mup=True`` also
  scales hidden updates by ``base_fan_in / fan_in`` (muP): the variant weighed against
  it for the prior. Needs ``num_steps`` for the schedule (without it: no decay).
  """
  from metaopt.lopt import LearnedOptimizer  # pylint: disable=g-import-not-at-top
  lo = LearnedOptimizer.from_classical("muon", mup=mup, learning_rate=learning_rate)
  lo = lo.with_config(muon_matrices=MUON_MATRICES, horizon_decay="warmup_cosine",
                      warmup_fraction=WARMUP_FRACTION)
  return lo
