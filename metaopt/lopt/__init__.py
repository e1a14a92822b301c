"""The learned optimizer: a muP per-parameter MLP over classical momentum features."""

from metaopt.lopt._classical import CLASSICAL
from metaopt.lopt._config import CANDIDATE_NAMES
from metaopt.lopt._config import FEATURE_NAMES
from metaopt.lopt._config import LOConfig
from metaopt.lopt._learned import LearnedOptimizer
from metaopt.lopt._switches.muon import muon_fan_ins
from metaopt.lopt._network import init_theta
from metaopt.lopt._network import theta_shapes
from metaopt.lopt._update import LOState
from metaopt.lopt._update import init_state
from metaopt.lopt._update import update

__all__ = [
    "CANDIDATE_NAMES",
    "CLASSICAL",
    "FEATURE_NAMES",
    "LOConfig",
    "LOState",
    "LearnedOptimizer",
    "init_state",
    "init_theta",
    "theta_shapes",
    "update",
]
