"""metaopt: learned optimizers in JAX, meta-trained over task distributions."""

from metaopt import features
from metaopt import mup
from metaopt._version import __version__

__all__ = [
    "__version__",
    "features",
    "mup",
]
