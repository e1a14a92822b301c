"""Classical momentum optimizers as optax transforms, built from metaopt.features.

Each factory returns an ``optax.GradientTransformation`` (``...ExtraArgs`` when the
method needs the loss through ``update(..., value=loss)``). Learning rates accept a
float or an optax schedule; concrete out-of-range hyperparameters raise ValueError.
"""

# Public optimizers, one import per line (kept sorted by module).

__all__ = [
]
