"""Classical momentum optimizers as optax transforms, built from metaopt.features.

Each factory returns an ``optax.GradientTransformation`` (``...ExtraArgs`` when the
method needs the loss through ``update(..., value=loss)``). Learning rates accept a
float or an optax schedule; concrete out-of-range hyperparameters raise ValueError.
"""

# Public optimizers, one import per line (kept sorted by module).

from metaopt.optimizers._adam import adamw
from metaopt.optimizers._adam import lion
from metaopt.optimizers._adam import mu_adamw
from metaopt.optimizers._adam import scale_by_adam
from metaopt.optimizers._adam import scale_by_lion
from metaopt.optimizers._adam import ScaleByAdamState
from metaopt.optimizers._adam import ScaleByLionState
from metaopt.optimizers._ademamix import ademamix
from metaopt.optimizers._ademamix import scale_by_ademamix
from metaopt.optimizers._ademamix import ScaleByAdemamixState
from metaopt.optimizers._momentum import nesterov
from metaopt.optimizers._momentum import scale_by_momentum
from metaopt.optimizers._momentum import ScaleByMomentumState
from metaopt.optimizers._momentum import sgdm
from metaopt.optimizers._polyak import alr_smag
from metaopt.optimizers._polyak import AlrSmagState
from metaopt.optimizers._polyak import momo
from metaopt.optimizers._polyak import momo_adam
from metaopt.optimizers._polyak import MomoAdamState
from metaopt.optimizers._polyak import MomoState
from metaopt.optimizers._schedule_free import schedule_free_adamw
from metaopt.optimizers._schedule_free import schedule_free_eval_params

__all__ = [
    "AlrSmagState",
    "MomoAdamState",
    "MomoState",
    "ScaleByAdamState",
    "ScaleByAdemamixState",
    "ScaleByLionState",
    "ScaleByMomentumState",
    "ademamix",
    "adamw",
    "alr_smag",
    "lion",
    "momo",
    "momo_adam",
    "mu_adamw",
    "nesterov",
    "scale_by_adam",
    "scale_by_ademamix",
    "scale_by_lion",
    "scale_by_momentum",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "sgdm",
]
