"""Named task suites: lists of configs with step budgets and estimated costs.

* ``smoke``: 2 tiny tasks, < 100 steps, for fast tests.
* ``meta_train_default``: the small, fast tasks default meta-training samples (MLPs of
  width <= 128 on digits and generated data, logistic regression, a tiny character LM,
  quadratics).
* ``heldout``: the same families wider and deeper, plus conv nets, a Haiku MLP, a
  bigger LM, other data and longer horizons; sized so that the default evaluation of a
  learned optimizer (3 seeds; 3 tuned baselines x 7 learning rates x 2 schedules on one
  seed, their 3 finalists on the other two; the untuned baselines: the single-seed runs
  per task :func:`metaopt.eval.harness.default_eval_runs` counts) fits in 20 minutes on
  a 2-core CPU (:func:`metaopt.eval.harness.estimate_eval_seconds` prices the AdamW
  runs; each step 0.05-2.6 ms), leaving room for the learned optimizer's overhead and
  compiles.
* ``validation``: 5 tasks that are in neither ``meta_train_default`` nor ``heldout``
  (MLPs of width 96-256 on other data, a conv net and an LM of other sizes), 600 steps:
  what meta-training checkpoints are selected on, so ``heldout`` stays a test set.
* ``heldout-full``: ``heldout`` 8x wider, 2x deeper, with 10x longer horizons.
* ``heldout-user``: 6 models written the way a user writes them
  (:mod:`tasks.models.user`: flax.linen and Haiku, the frameworks' default
  initializations, roles inferred by :func:`metaopt.mup.infer_roles` as a drop-in user's
  would be), of families unlike the meta-training ones: a deep ELU autoencoder, a pre-LN
  transformer LM with ``nn.SelfAttention`` and learned positions, an LSTM, a strided
  conv net with pooling, a Haiku residual MLP with LayerNorm, a full-batch Haiku
  regression; batches 8-512, 500-1500 steps, about ``heldout``'s evaluation cost. Never
  used for meta-training or for selecting checkpoints: a test set only.
* ``validation-user``: one model per user-shaped family (``sp_*``, below), each with a
  field value its family never samples: what ``user_shaped`` meta-training selects
  checkpoints on beside ``validation``.
* ``widths``: one muP MLP on digits at widths 64..8192 (:func:`widths_suite` builds it
  for any widths; use ``mup=False`` for the SP twin).

:func:`tfds_suite` builds MLP and conv tasks on MNIST, Fashion-MNIST and CIFAR-10 from
a prepared TFDS ``data_dir``; :func:`get_family` names :class:`TaskFamily` distributions
(``mlp``, ``conv``, ``transformer_lm``, ``logistic``, ``quadratic``, and the user-shaped
``sp_transformer_lm``, ``sp_recurrent``, ``sp_autoencoder``, ``sp_resmlp``,
``sp_convnet``, ``sp_regression``: standard-initialization flax.linen models whose roles
are inferred, as a user's are) for sampling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from tasks import base
from tasks import cost
from tasks import registry
from tasks.family import TaskFamily
from tasks.data import DigitsData
from tasks.data import GaussianMixtureData
from tasks.data import TeacherStudentData
from tasks.data import TFDSImageData
from tasks.models.conv import ConvConfig
from tasks.models.logistic import LogisticConfig
from tasks.models.mlp import MLPConfig
from tasks.models.quadratic import QuadraticConfig
from tasks.models.sp_autoencoder import SPAutoencoderConfig
from tasks.models.sp_convnet import SPConvNetConfig
from tasks.models.sp_recurrent import SPRecurrentConfig
from tasks.models.sp_regression import SPRegressionConfig
from tasks.models.sp_resmlp import SPResMLPConfig
from tasks.models.sp_transformer import SPTransformerLMConfig
from tasks.models.transformer import TransformerLMConfig
from tasks.models.user import UserModelConfig



@dataclasses.dataclass(frozen=True)
class SuiteEntry:
  """A task config, its step budget and estimated seconds for one AdamW run of it."""

  config: Any
  num_steps: int
  est_cost_s: float

  @property
  def name(self) -> str:
    return self.config.name

  def build(self) -> base.Task:
    return registry.build(self.config, self.num_steps)


def entry(config: Any, num_steps: int) -> SuiteEntry:
  """A SuiteEntry whose cost is ``num_steps * cost.estimate_step_seconds(config)``."""
  return SuiteEntry(config, num_steps,
                    float(f"{num_steps * cost.estimate_step_seconds(config):.3g}"))


def _smoke() -> list[SuiteEntry]:
  return [
      entry(MLPConfig(width=16, depth=1, batch_size=32), 50),
      entry(QuadraticConfig(dim=8, condition_number=10.0), 50),
  ]


def _meta_train_default() -> list[SuiteEntry]:
  return [
      entry(MLPConfig(width=32, depth=2, activation="relu", batch_size=64), 300),
      entry(MLPConfig(width=128, depth=1, activation="gelu", batch_size=128,
                      base_width=128), 300),
      entry(MLPConfig(GaussianMixtureData(num_classes=8, dim=32, seed=1), width=64,
                      depth=2, activation="tanh", batch_size=64), 300),
      entry(MLPConfig(TeacherStudentData(), width=64, depth=2, activation="silu",
                      batch_size=64), 300),
      entry(LogisticConfig(DigitsData(), batch_size=128), 300),
      entry(TransformerLMConfig(width=32, depth=1, heads=2, context=16, batch_size=16),
            300),
      entry(QuadraticConfig(dim=16, condition_number=100.0, rotate=False), 300),
      entry(QuadraticConfig(dim=64, condition_number=1000.0, rotate=True), 300),
  ]


def _heldout() -> list[SuiteEntry]:
  gmm = GaussianMixtureData(num_classes=16, dim=128, separation=2.5, seed=7)
  teacher = TeacherStudentData(input_dim=64, output_dim=8, teacher_width=128, seed=3)
  return [
      entry(MLPConfig(DigitsData(), width=256, depth=3, activation="relu", batch_size=64),
            800),
      entry(MLPConfig(gmm, width=256, depth=2, activation="gelu", batch_size=64,
                      framework="haiku"), 800),
      entry(MLPConfig(teacher, width=512, depth=2, activation="relu", batch_size=32), 600),
      entry(ConvConfig(DigitsData(), width=16, depth=3, batch_size=32), 1000),
      entry(TransformerLMConfig(width=64, depth=2, heads=4, context=16, batch_size=8,
                                base_width=32), 600),
      entry(LogisticConfig(gmm, batch_size=128), 1000),
      entry(QuadraticConfig(dim=256, condition_number=1e4, rotate=True, noise_std=0.05),
            2000),
  ]


def _heldout_user() -> list[SuiteEntry]:
  """User-written SP models (test set only: never meta-trained on, never selected on)."""
  return [
      entry(UserModelConfig("autoencoder", width=128, depth=3, batch_size=128), 800),
      entry(UserModelConfig("transformer_lm", width=64, depth=2, heads=4, context=16,
                            batch_size=8), 500),
      entry(UserModelConfig("lstm", width=64, batch_size=32), 600),
      entry(UserModelConfig("cnn", width=64, batch_size=32), 800),
      entry(UserModelConfig("resmlp", width=96, depth=2, batch_size=32), 800),
      entry(UserModelConfig("regression", width=64, depth=3, batch_size=512), 1500),
  ]


def _validation() -> list[SuiteEntry]:
  gmm = GaussianMixtureData(num_classes=10, dim=48, seed=11)
  teacher = TeacherStudentData(input_dim=32, output_dim=4, teacher_width=64, seed=5)
  return [
      entry(MLPConfig(gmm, width=256, depth=2, activation="silu", batch_size=64), 600),
      entry(MLPConfig(teacher, width=192, depth=3, activation="gelu", batch_size=32), 600),
      entry(MLPConfig(DigitsData(), width=96, depth=2, activation="tanh", batch_size=32),
            600),
      entry(ConvConfig(DigitsData(), width=24, depth=2, batch_size=32), 600),
      entry(TransformerLMConfig(width=48, depth=1, heads=2, context=16, batch_size=8),
            600),
  ]


def _validation_user() -> list[SuiteEntry]:
  """One user-shaped model per user-shaped family, each outside its family's support.

  Every entry has a field value no family samples (a width, length, data seed or
  dimension off the grid), so selection never scores a configuration meta-training
  trained on; none is a ``heldout-user`` model.
  """
  gmm = GaussianMixtureData(num_classes=10, dim=40, seed=31)
  return [
      entry(SPTransformerLMConfig(width=48, depth=2, heads=4, context=32, batch_size=16,
                                  norm="rmsnorm", vocab_size=48, seed=7), 600),
      entry(SPRecurrentConfig("gru", "adding", width=48, length=30, batch_size=32), 600),
      entry(SPAutoencoderConfig(width=96, depth=2, activation="gelu", layer_norm=True,
                                batch_size=64, input_dim=24, latent_dim=3, seed=7), 600),
      entry(SPResMLPConfig(gmm, width=96, depth=6, expansion=2, norm="rmsnorm",
                           activation="silu", batch_size=32), 600),
      entry(SPConvNetConfig("gratings", width=12, stages=2, downsample="stride",
                            batch_size=32, seed=5), 600),
      entry(SPRegressionConfig(width=96, depth=3, activation="silu", batch_size=300,
                               input_dim=3, num_train=300, seed=7), 600),
  ]


def scale_up(config: Any, width_factor: int = 8, depth_factor: int = 2) -> Any:
  """The same task ``width_factor`` x wider and ``depth_factor`` x deeper.

  Width-free tasks keep their size (logistic regression) or grow their dimension
  (quadratics); muP base widths are kept, so muP multipliers follow the width.
  """
  if isinstance(config, (MLPConfig, ConvConfig, TransformerLMConfig)):
    return dataclasses.replace(config, width=config.width * width_factor,
                               depth=config.depth * depth_factor)
  if isinstance(config, QuadraticConfig):
    return dataclasses.replace(config, dim=config.dim * width_factor)
  return config


def _heldout_full() -> list[SuiteEntry]:
  return [entry(scale_up(e.config), 10 * e.num_steps) for e in _heldout()]


DEFAULT_WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def widths_suite(widths: Sequence[int] = DEFAULT_WIDTHS, *, mup: bool = True,
                 base_width: int = 64, depth: int = 2, batch_size: int = 64,
                 num_steps: int = 1000) -> list[SuiteEntry]:
  """One MLP family on digits at the given widths (muP or SP)."""
  return [entry(MLPConfig(DigitsData(), width=w, depth=depth, batch_size=batch_size,
                          mup=mup, base_width=base_width), num_steps) for w in widths]


def tfds_suite(data_dir: str, *, image_size: int = 16, grayscale: bool = False,
               num_steps: int = 1000) -> list[SuiteEntry]:
  """MLP and conv tasks on MNIST, Fashion-MNIST and CIFAR-10 prepared in ``data_dir``."""
  entries = []
  for name in ("mnist", "fashion_mnist", "cifar10"):
    data = TFDSImageData(name, data_dir, image_size=image_size, grayscale=grayscale)
    entries.append(entry(MLPConfig(data, width=128, depth=2, batch_size=128), num_steps))
    entries.append(entry(ConvConfig(data, width=32, depth=3, batch_size=64), num_steps))
  return entries


SUITES: dict[str, Callable[[], list[SuiteEntry]]] = {
    "smoke": _smoke,
    "meta_train_default": _meta_train_default,
    "heldout": _heldout,
    "heldout-full": _heldout_full,
    "heldout-user": _heldout_user,
    "validation": _validation,
    "validation-user": _validation_user,
    "widths": widths_suite,
}


def get_suite(name: str) -> list[SuiteEntry]:
  """The named suite; raises ValueError listing valid names for an unknown one."""
  if name not in SUITES:
    raise ValueError(f"unknown suite {name!r}; expected one of {sorted(SUITES)}.")
  return SUITES[name]()


def _families() -> dict[str, TaskFamily]:
  data = (DigitsData(), GaussianMixtureData(num_classes=8, dim=32, seed=1),
          TeacherStudentData())
  return {
      "mlp": TaskFamily(MLPConfig(), {
          "data": data, "width": (16, 32, 64, 128), "depth": (1, 2, 3),
          "activation": ("relu", "gelu", "tanh", "silu"), "batch_size": (32, 64, 128)}),
      "conv": TaskFamily(ConvConfig(), {
          "width": (8, 16, 32), "depth": (1, 2, 3), "batch_size": (32, 64)}),
      "transformer_lm": TaskFamily(TransformerLMConfig(), {
          "width": (16, 32, 64), "depth": (1, 2), "heads": (1, 2, 4),
          "context": (8, 16, 32), "batch_size": (8, 16)}),
      "logistic": TaskFamily(LogisticConfig(), {
          "data": data[:2], "batch_size": (32, 128)}),
      "quadratic": TaskFamily(QuadraticConfig(), {
          "dim": (8, 16, 64), "condition_number": (10.0, 100.0, 1e3, 1e4),
          "rotate": (False, True), "noise_std": (0.0, 0.05, 0.1)}),
      **_user_shaped_families(),
  }


def _user_shaped_families() -> dict[str, TaskFamily]:
  """Standard-initialization models with inferred roles, shaped like what users bring.

  Each is a flax.linen model with the framework's default initializers whose roles
  :func:`metaopt.mup.infer_roles` guesses, as for a drop-in user of the muP LO; each
  differs in kind from the ``heldout-user`` models (other data, other architecture
  variants: see each model's module). Batch sizes span 16-512 across the families;
  horizons (100-3000) are the meta-training run's episode lengths
  (``MetaConfig.min_horizon`` / ``horizon``, drawn log-uniformly per episode).
  """
  seeds = (0, 1, 2, 3)
  acts = ("relu", "gelu", "tanh", "silu")
  norms = ("layernorm", "rmsnorm")
  return {
      # Pre-LN LMs on Markov-chain tokens: attention, embeddings, norms.
      "sp_transformer_lm": TaskFamily(SPTransformerLMConfig(), {
          "width": (32, 64, 128), "depth": (1, 2, 3), "heads": (2, 4),
          "context": (16, 32, 64), "batch_size": (16, 32, 64), "norm": norms,
          "mlp_ratio": (2, 4), "activation": ("gelu", "relu", "silu"),
          "attention_bias": (True, False), "vocab_size": (16, 32, 64),
          "markov_order": (1, 2), "seed": seeds}),
      # GRU/LSTM on long-memory regression and next-token prediction.
      "sp_recurrent": TaskFamily(SPRecurrentConfig(), {
          "cell": ("gru", "lstm"), "problem": ("adding", "language_model"),
          "width": (32, 64, 128), "depth": (1, 2), "length": (10, 20, 40),
          "batch_size": (16, 64, 256), "vocab_size": (16, 32), "markov_order": (1, 2),
          "seed": seeds}),
      # Bottleneck reconstruction of manifold data: deep chains of Dense layers.
      "sp_autoencoder": TaskFamily(SPAutoencoderConfig(), {
          "width": (64, 128, 256), "depth": (1, 2, 3), "activation": acts,
          "layer_norm": (False, True), "batch_size": (32, 128, 512),
          "input_dim": (16, 32, 64), "latent_dim": (2, 4, 8), "seed": seeds}),
      # Deep pre-norm residual MLPs (the residual stream grows under SP init).
      "sp_resmlp": TaskFamily(SPResMLPConfig(), {
          "data": (DigitsData(), GaussianMixtureData(num_classes=16, dim=48, seed=21),
                   TeacherStudentData(input_dim=16, output_dim=2, teacher_width=32,
                                      seed=9)),
          "width": (32, 64, 128), "depth": (2, 4, 8), "expansion": (1, 2, 4),
          "norm": norms, "activation": acts, "batch_size": (16, 64, 256)}),
      # Conv nets with stride / max / average pooling, global-pool or flatten heads.
      "sp_convnet": TaskFamily(SPConvNetConfig(), {
          "data": ("digits", "gratings"), "width": (8, 16, 32), "stages": (1, 2),
          "downsample": ("stride", "maxpool", "avgpool"), "layer_norm": (False, True),
          "head": ("global_pool", "flatten"), "batch_size": (16, 32, 128),
          "seed": (0, 1)}),
      # Small-data regression, mini-batch or full-batch (batch 512 >= every train set).
      "sp_regression": TaskFamily(SPRegressionConfig(), {
          "width": (32, 64, 128), "depth": (2, 3, 4), "activation": acts,
          "batch_size": (16, 64, 512), "input_dim": (2, 4, 8),
          "num_train": (128, 256, 512), "seed": seeds}),
  }


USER_SHAPED_FAMILY_NAMES = tuple(sorted(_user_shaped_families()))


def get_family(name: str) -> TaskFamily:
  """A named family to sample from: the muP families (the meta_train_default scale)
  and the user-shaped ``sp_*`` ones (:data:`USER_SHAPED_FAMILY_NAMES`)."""
  families = _families()
  if name not in families:
    raise ValueError(f"unknown family {name!r}; expected one of {sorted(families)}.")
  return families[name]


FAMILY_NAMES = tuple(sorted(_families()))
