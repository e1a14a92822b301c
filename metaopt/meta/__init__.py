"""Meta-training: truncated unrolls, PES/ES/TBPTT estimators, outer loop, sharding."""

from metaopt.meta.config import MetaConfig
from metaopt.meta.config import PRESETS
from metaopt.meta.config import load_config
from metaopt.meta.estimators import ESTIMATORS
from metaopt.meta.estimators import Estimate
from metaopt.meta.estimators import pes
from metaopt.meta.estimators import tbptt
from metaopt.meta.estimators import truncated_es
from metaopt.meta.inner import InnerProblem
from metaopt.meta.inner import lo_problem
from metaopt.meta.outer import MetaState
from metaopt.meta.outer import MetaTrainer
from metaopt.meta.population import Population
from metaopt.meta.population import TruncationSchedule
from metaopt.meta.population import init_population
from metaopt.meta.unroll import UnrollSpec

__all__ = [
    "ESTIMATORS",
    "Estimate",
    "InnerProblem",
    "MetaConfig",
    "MetaState",
    "MetaTrainer",
    "PRESETS",
    "Population",
    "TruncationSchedule",
    "UnrollSpec",
    "init_population",
    "load_config",
    "lo_problem",
    "pes",
    "tbptt",
    "truncated_es",
]
