"""metaopt: learned optimizers in JAX, meta-trained over task distributions."""

from metaopt import checkpoint
from metaopt import features
from metaopt import lopt
from metaopt import mup
from metaopt.checkpoint import load
from metaopt.checkpoint import pretrained
from metaopt.lopt import LearnedOptimizer
from metaopt.lopt import LOConfig
from metaopt._version import __version__

__all__ = [
    "LOConfig",
    "LearnedOptimizer",
    "__version__",
    "checkpoint",
    "features",
    "load",
    "lopt",
    "mup",
    "pretrained",
]
