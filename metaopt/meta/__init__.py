"""Meta-training: truncated unrolls, PES/ES/TBPTT estimators, outer loop, sharding.

``meta_train(config, out, tasks=[...])`` runs one meta-training end to end (the
``meta_train.py`` CLI); ``tasks`` may hold your own ``tasks.Task`` objects
(``tasks.from_functions``).
"""

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
from metaopt.meta.run import RunResult
from metaopt.meta.run import meta_train
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
    "RunResult",
    "TruncationSchedule",
    "UnrollSpec",
    "init_population",
    "load_config",
    "lo_problem",
    "meta_train",
    "pes",
    "tbptt",
    "truncated_es",
]
