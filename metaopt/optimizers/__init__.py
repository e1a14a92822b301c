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
from metaopt.optimizers._adamp import adamp
from metaopt.optimizers._adamp import adamp_projection
from metaopt.optimizers._adamp import scale_by_adamp
from metaopt.optimizers._adamp import scale_by_sgdp
from metaopt.optimizers._adamp import ScaleByAdampState
from metaopt.optimizers._adamp import ScaleBySgdpState
from metaopt.optimizers._adamp import sgdp
from metaopt.optimizers._adan import adan
from metaopt.optimizers._adan import proximal_decay_step
from metaopt.optimizers._adan import ProximalDecayState
from metaopt.optimizers._adan import scale_by_adan
from metaopt.optimizers._adan import ScaleByAdanState
from metaopt.optimizers._ademamix import ademamix
from metaopt.optimizers._ademamix import scale_by_ademamix
from metaopt.optimizers._ademamix import ScaleByAdemamixState
from metaopt.optimizers._cautious import cautious
from metaopt.optimizers._cautious import cautious_adamw
from metaopt.optimizers._cautious import cautious_lion
from metaopt.optimizers._cautious import scale_by_cautious
from metaopt.optimizers._cautious import ScaleByCautiousState
from metaopt.optimizers._grams import grams
from metaopt.optimizers._grams import scale_by_grams
from metaopt.optimizers._laprop import laprop
from metaopt.optimizers._laprop import scale_by_laprop
from metaopt.optimizers._laprop import ScaleByLapropState
from metaopt.optimizers._mars import mars_adamw
from metaopt.optimizers._mars import scale_by_mars_adamw
from metaopt.optimizers._mars import ScaleByMarsAdamwState
from metaopt.optimizers._momentum import nesterov
from metaopt.optimizers._momentum import scale_by_momentum
from metaopt.optimizers._momentum import ScaleByMomentumState
from metaopt.optimizers._momentum import sgdm
from metaopt.optimizers._muon import muon
from metaopt.optimizers._muon import muon_fan_ins
from metaopt.optimizers._muon import muon_fan_ins_2d
from metaopt.optimizers._muon import muon_labels
from metaopt.optimizers._muon import scale_by_muon
from metaopt.optimizers._muon import ScaleByMuonState
from metaopt.optimizers._polyak import alr_smag
from metaopt.optimizers._polyak import AlrSmagState
from metaopt.optimizers._polyak import momo
from metaopt.optimizers._polyak import momo_adam
from metaopt.optimizers._polyak import MomoAdamState
from metaopt.optimizers._polyak import MomoState
from metaopt.optimizers._schedule_free import schedule_free_adamw
from metaopt.optimizers._schedule_free import schedule_free_eval_params
from metaopt.optimizers._tam import adatam
from metaopt.optimizers._tam import scale_by_adatam
from metaopt.optimizers._tam import scale_by_tam
from metaopt.optimizers._tam import ScaleByAdatamState
from metaopt.optimizers._tam import ScaleByTamState
from metaopt.optimizers._tam import tam

# The optimizers of the contract (docs: DESIGN.md), in its order: the one list of their
# names. metaopt.eval.baselines derives its names from it; tests check it against the
# exports here and against metaopt.lopt's CLASSICAL table and CANDIDATE_NAMES. Adding an
# optimizer: its module, the imports above, this tuple (and the property-test table).
OPTIMIZER_NAMES = (
    "sgdm",
    "nesterov",
    "adamw",
    "mu_adamw",
    "lion",
    "cautious",
    "cautious_adamw",
    "cautious_lion",
    "tam",
    "adatam",
    "ademamix",
    "momo",
    "momo_adam",
    "alr_smag",
    "grams",
    "laprop",
    "adan",
    "schedule_free_adamw",
    "mars_adamw",
    "adamp",
    "sgdp",
    "muon",
)

__all__ = [
    "AlrSmagState",
    "MomoAdamState",
    "MomoState",
    "OPTIMIZER_NAMES",
    "ProximalDecayState",
    "ScaleByAdamState",
    "ScaleByAdampState",
    "ScaleByAdanState",
    "ScaleByAdatamState",
    "ScaleByAdemamixState",
    "ScaleByCautiousState",
    "ScaleByLapropState",
    "ScaleByLionState",
    "ScaleByMarsAdamwState",
    "ScaleByMomentumState",
    "ScaleByMuonState",
    "ScaleBySgdpState",
    "ScaleByTamState",
    "adamp",
    "adamp_projection",
    "adan",
    "adatam",
    "ademamix",
    "adamw",
    "alr_smag",
    "cautious",
    "cautious_adamw",
    "cautious_lion",
    "grams",
    "laprop",
    "lion",
    "mars_adamw",
    "momo",
    "momo_adam",
    "mu_adamw",
    "muon",
    "muon_fan_ins",
    "muon_fan_ins_2d",
    "muon_labels",
    "nesterov",
    "proximal_decay_step",
    "scale_by_adam",
    "scale_by_adamp",
    "scale_by_adan",
    "scale_by_adatam",
    "scale_by_ademamix",
    "scale_by_cautious",
    "scale_by_grams",
    "scale_by_laprop",
    "scale_by_lion",
    "scale_by_mars_adamw",
    "scale_by_momentum",
    "scale_by_muon",
    "scale_by_sgdp",
    "scale_by_tam",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "sgdm",
    "sgdp",
    "tam",
]
