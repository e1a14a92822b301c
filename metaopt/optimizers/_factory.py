"""What the optimizer factories share: the roles check and their tail.

Most optimizers here are ``scale_by_<algo>(...)`` followed by the same two steps,

.. math::

  u \\leftarrow -\\eta_t\\,(u + \\lambda\\, m \\odot \\theta), \\qquad
  m = \\text{1 on the leaves } \\texttt{mask} \\text{ selects, else 0},

which :func:`decayed_descent` builds (``optax.add_decayed_weights(weight_decay, mask)``
then ``optax.scale_by_learning_rate(learning_rate)``, after checking both values).
Optimizers whose weight decay lives inside their own step (proximal, Polyak, AdamP's
projected decay) read the same ``mask`` through :func:`decayed_leaves`.

``mask`` follows ``optax.masked``: None (decay every leaf), a pytree of bools with the
structure of the parameters or a prefix of it (True: decayed), or a callable
``params -> such a pytree``. The bools must be concrete (Python or NumPy), not traced.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import optax

from metaopt import mup
from metaopt.optimizers import _validation

Tree = Any
Mask = Union[None, Tree, Callable[[Tree], Tree]]


def checked_roles(roles: mup.RolesOrFn | None, labels: Tree = None
                  ) -> optax.GradientTransformation:
  """Stateless; its ``init`` resolves the muP roles (:func:`metaopt.mup.resolve_roles`):
  explicit ``roles`` are checked against the parameters, inference warns when unsure."""

  def init_fn(params):
    mup.resolve_roles(params, roles, labels=labels, warn=True)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def decayed_descent(direction: optax.GradientTransformation,
                    learning_rate: optax.ScalarOrSchedule,
                    weight_decay: optax.ScalarOrSchedule = 0.0, mask: Mask = None
                    ) -> optax.GradientTransformationExtraArgs:
  """``direction``, plus decoupled weight decay on the masked leaves, times ``-learning_rate``.

  Args:
    direction: a direction-only transform (``scale_by_*``: no decay, no learning rate).
    learning_rate: step size, a float or an optax schedule (checked >= 0).
    weight_decay: decoupled weight decay, multiplied by the learning rate (checked >= 0).
    mask: which leaves are decayed, as in ``optax.masked`` (None: all of them).

  Returns:
    ``optax.chain(direction, optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate))``.
  """
  _validation.check_nonnegative(learning_rate=learning_rate, weight_decay=weight_decay)
  return optax.chain(
      direction,
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def decayed_leaves(mask: Mask, params: Tree) -> Tree:
  """A tree shaped like ``params`` of Python bools: True on the leaves ``mask`` decays.

  ``mask`` is read as ``optax.masked`` reads it (None selects every leaf; a prefix tree's
  bool applies to its whole subtree).
  """
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  mask_tree = mask(params) if callable(mask) else mask
  return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask_tree, params)


def masked_weight_decay(weight_decay, mask: Mask, params: Tree) -> Tree:
  """``weight_decay`` on the leaves ``mask`` decays and 0.0 on the others (a tree)."""
  return jax.tree.map(lambda on: weight_decay if on else 0.0, decayed_leaves(mask, params))
