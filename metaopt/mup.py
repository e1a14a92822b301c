"""Maximal-update parametrization (muP): parameter roles and update scaling.

The one place muP lives: the tasks state the role of each of their parameters with
:class:`ParamRole`, ``mu_adamw`` and the learned optimizer read those roles to scale
hidden-layer updates by ``base_fan_in / fan_in``.

Roles (Yang et al, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
Hyperparameter Transfer", arXiv:2203.03466, 2022, Table 3/8; muLO: Therien et al,
"muLO: Compute-Efficient Meta-Generalization of Learned Optimizers",
arXiv:2406.00153, 2024):

* ``input``  -- weights mapping a finite input to a width dimension (first layer,
  embeddings): init N(0, 1/fan_in), update unscaled.
* ``hidden`` -- width-to-width weights: init N(0, 1/fan_in), update scaled by
  ``base_fan_in / fan_in``.
* ``output`` -- width-to-finite readout: zero init, logits multiplied by
  ``base_fan_in / fan_in`` in the forward pass, update unscaled.
* ``vector`` -- biases, norm scales, scalars: update unscaled.

Roles are given in one of three ways:

1. explicitly, as a pytree of :class:`ParamRole` (what our own tasks do);
2. as a label pytree of role names (like ``optax.multi_transform`` labels) plus a
   base width, via :func:`roles_from_labels`;
3. from a narrower base model's parameter shapes, via :func:`roles_from_base` (the muP
   rule: dimensions whose size differs are width dimensions).

For unlabeled trees, :func:`infer_roles` applies a documented heuristic and warns.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import optax

ROLE_KINDS = ("input", "hidden", "output", "vector")


@dataclasses.dataclass(frozen=True)
class ParamRole:
  """muP role of one parameter leaf.

  Attributes:
    kind: one of ``"input"``, ``"hidden"``, ``"output"``, ``"vector"``.
    fan_in: the leaf's fan-in in the model being trained (1 for vectors).
    base_fan_in: the fan-in of the same leaf in the base (tuning) model.
  """

  kind: str
  fan_in: int = 1
  base_fan_in: int = 1

  def __post_init__(self):
    if self.kind not in ROLE_KINDS:
      raise ValueError(
          f"ParamRole.kind={self.kind!r} is not a role; expected one of {ROLE_KINDS}."
      )
    for name in ("fan_in", "base_fan_in"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ParamRole.{name}={value!r}; expected a positive int.")

  @property
  def width_multiplier(self) -> float:
    """fan_in / base_fan_in: how much wider this leaf is than in the base model."""
    return self.fan_in / self.base_fan_in

  @property
  def update_scale(self) -> float:
    """Factor muP applies to this leaf's Adam-style update: base/fan_in for hidden."""
    return self.base_fan_in / self.fan_in if self.kind == "hidden" else 1.0

  @property
  def output_multiplier(self) -> float:
    """Factor on the readout in the forward pass: base/fan_in for output, else 1."""
    return self.base_fan_in / self.fan_in if self.kind == "output" else 1.0


def input_role(fan_in: int) -> ParamRole:
  return ParamRole("input", fan_in, fan_in)


def hidden_role(fan_in: int, base_fan_in: int) -> ParamRole:
  return ParamRole("hidden", fan_in, base_fan_in)


def output_role(fan_in: int, base_fan_in: int) -> ParamRole:
  return ParamRole("output", fan_in, base_fan_in)


def vector_role() -> ParamRole:
  return ParamRole("vector", 1, 1)


def is_role(x: Any) -> bool:
  return isinstance(x, ParamRole)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path)


def default_fan_in(shape: Sequence[int], path: str = "") -> int:
  """Fan-in of a weight under the Flax/Haiku layout conventions.

  Dense kernels are (in, out) and conv kernels (*spatial, in, out): fan_in is the
  product of all axes but the last. 3-D attention kernels are special: query/key/value
  projections are (in, heads, head_dim), fan_in = in; the output projection is
  (heads, head_dim, out), fan_in = heads * head_dim; it is recognised by ``out`` in
  its path.
  """
  shape = tuple(shape)
  if len(shape) < 2:
    return 1
  if len(shape) == 3 and _looks_like_attention(path):
    return int(shape[0] * shape[1]) if _parent_name(path) == "out" else int(shape[0])
  return int(math.prod(shape[:-1]))


def _parent_name(path: str) -> str:
  """Name of the module holding a leaf: "out" for "['params']['attn']['out']['kernel']"."""
  keys = re.findall(r"\[['\"]?([^'\"\]]+)['\"]?\]", path)
  return keys[-2].lower() if len(keys) >= 2 else ""


def _looks_like_attention(path: str) -> bool:
  return bool(re.search(r"attn|attention|query|key|value|q_proj|k_proj|v_proj|qkv", path,
                        re.I))


def check_roles(params, roles) -> None:
  """Raises ValueError unless ``roles`` is a ParamRole tree matching ``params``."""
  p_paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  try:
    r_leaves = jax.tree_util.tree_flatten_with_path(roles, is_leaf=is_role)[0]
  except Exception as e:  # pragma: no cover - defensive
    raise ValueError(f"roles is not a pytree: {e}") from e
  r_paths = [_path_str(p) for p, _ in r_leaves]
  if p_paths != r_paths:
    missing = sorted(set(p_paths) - set(r_paths))
    extra = sorted(set(r_paths) - set(p_paths))
    raise ValueError(
        "muP roles do not match the parameter tree: "
        f"parameters without a role: {missing[:5]}; roles without a parameter: "
        f"{extra[:5]}.")
  for path, role in r_leaves:
    if not is_role(role):
      raise ValueError(
          f"roles{_path_str(path)} is {role!r}; expected a metaopt.mup.ParamRole.")


def roles_from_labels(params, labels, base_width_multiplier: float | None = None,
                      *, base_fan_in: Any = None):
  """Builds roles from a label pytree of role names.

  Args:
    params: the parameter tree (arrays or ShapeDtypeStructs).
    labels: a tree with the structure of ``params`` holding ``"input"``,
      ``"hidden"``, ``"output"`` or ``"vector"`` (or a callable params -> labels,
      like ``optax.multi_transform``).
    base_width_multiplier: width of this model divided by the base model's width;
      ``base_fan_in = fan_in / base_width_multiplier`` for hidden and output leaves.
      ``None`` means this *is* the base model (no scaling).
    base_fan_in: alternatively, a tree (or a single int) of base fan-ins.

  Returns:
    A pytree of :class:`ParamRole` with the structure of ``params``.
  """
  if callable(labels):
    labels = labels(params)
  flat_p, treedef = jax.tree_util.tree_flatten_with_path(params)
  flat_l = treedef.flatten_up_to(labels) if not isinstance(labels, str) else [labels] * len(
      flat_p)
  if base_fan_in is None or isinstance(base_fan_in, int):
    flat_b = [base_fan_in] * len(flat_p)
  else:
    flat_b = treedef.flatten_up_to(base_fan_in)
  roles = []
  for (path, leaf), label, base in zip(flat_p, flat_l, flat_b):
    name = _path_str(path)
    if label not in ROLE_KINDS:
      raise ValueError(f"label at {name} is {label!r}; expected one of {ROLE_KINDS}.")
    if label == "vector":
      roles.append(vector_role())
      continue
    fan_in = default_fan_in(jnp.shape(leaf), name)
    if label == "input":
      roles.append(input_role(fan_in))
      continue
    if base is None:
      base = fan_in if base_width_multiplier is None else max(
          1, int(round(fan_in / base_width_multiplier)))
    roles.append(ParamRole(label, fan_in, int(base)))
  return jax.tree_util.tree_unflatten(treedef, roles)


def roles_from_base(params, base_params):
  """Derives roles the muP way from a narrower base model with the same structure.

  Dimensions whose size differs between ``params`` and ``base_params`` are width
  dimensions. A leaf whose fan-in and fan-out axes both change is ``hidden``; one whose
  fan-in alone changes is ``output``; one whose fan-out alone changes is ``input`` if it
  is a matrix, else ``vector``; unchanged leaves are ``input`` (matrices) or ``vector``.
  """
  flat_p, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    flat_b = treedef.flatten_up_to(base_params)
  except (ValueError, TypeError) as e:
    raise ValueError(f"base_params does not have the structure of params: {e}") from e
  roles = []
  for (path, leaf), base in zip(flat_p, flat_b):
    name = _path_str(path)
    shape, bshape = tuple(jnp.shape(leaf)), tuple(jnp.shape(base))
    if len(shape) != len(bshape):
      raise ValueError(
          f"params{name} has shape {shape} but the base model's has {bshape}; "
          "expected the same rank.")
    if len(shape) < 2:
      roles.append(vector_role())
      continue
    fan_in, base_fan = default_fan_in(shape, name), default_fan_in(bshape, name)
    in_changes = fan_in != base_fan
    out_changes = shape[-1] != bshape[-1]
    if len(shape) == 3 and _looks_like_attention(name):
      out_changes = shape[1:] != bshape[1:] if fan_in == shape[0] else shape[-1] != bshape[-1]
    if in_changes and out_changes:
      roles.append(ParamRole("hidden", fan_in, base_fan))
    elif in_changes:
      roles.append(ParamRole("output", fan_in, base_fan))
    else:
      roles.append(input_role(fan_in))
  return jax.tree_util.tree_unflatten(treedef, roles)


def sp_roles(params):
  """Standard parametrization: every leaf unscaled (``vector`` or ``input``)."""
  return jax.tree.map(
      lambda x: input_role(default_fan_in(jnp.shape(x))) if jnp.ndim(x) >= 2 else
      vector_role(), params)


def update_scales(roles):
  """Tree of floats: the muP factor on each leaf's update (base/fan_in on hidden)."""
  return jax.tree.map(lambda r: r.update_scale, roles, is_leaf=is_role)


class ScaleByMupState(NamedTuple):
  """scale_by_mup is stateless."""


RolesOrFn = Union[Any, Callable[[Any], Any]]


def scale_by_mup(roles: RolesOrFn) -> optax.GradientTransformation:
  """Multiplies hidden-layer updates by ``base_fan_in / fan_in``.

  .. math:: u_\\ell \\leftarrow (b_\\ell / n_\\ell)\\, u_\\ell \\quad \\text{for hidden } \\ell

  Args:
    roles: a :class:`ParamRole` tree matching the updates, or a callable
      ``params -> roles``.

  References:
    Yang et al, "Tensor Programs V", arXiv:2203.03466, 2022.
  """

  def init_fn(params):
    del params
    return ScaleByMupState()

  def update_fn(updates, state, params=None):
    r = roles(params if params is not None else updates) if callable(roles) else roles
    scales = update_scales(r)
    updates = jax.tree.map(lambda u, s: u if s == 1.0 else u * jnp.asarray(s, u.dtype),
                           updates, scales)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------
# Fallback for unlabeled trees.


def _natural_key(name: str):
  """Sort key that orders ``Dense_10`` after ``Dense_9`` (numbers compared as ints)."""
  return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok.lower())
          for tok in re.split(r"(\d+)", str(name))]


def _module_order(params) -> dict[str, tuple]:
  """Rank of every leaf in the order its module was (most likely) created.

  Flax and Haiku build parameter dicts in call order, so a dict's insertion order is
  the layer order -- unless the dict went through something that sorts keys (a
  FrozenDict round trip, a restored checkpoint). A level whose keys are exactly in
  lexicographic order is therefore re-sorted naturally (``Dense_10`` after
  ``Dense_9``); any other level keeps its insertion order.
  """
  ranks: dict[str, tuple] = {}

  def walk(node, path, rank):
    if isinstance(node, Mapping):
      keys = list(node.keys())
      if keys == sorted(keys, key=str):
        keys = sorted(keys, key=_natural_key)
      for i, k in enumerate(keys):
        walk(node[k], path + (jax.tree_util.DictKey(k),), rank + (i,))
    elif isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
      for i, child in enumerate(node):
        walk(child, path + (jax.tree_util.SequenceKey(i),), rank + (i,))
    else:
      for sub_path, _ in jax.tree_util.tree_flatten_with_path(node)[0]:
        ranks[_path_str(path + tuple(sub_path))] = rank + (
            tuple(_natural_key(_path_str(sub_path))),)

  walk(params, (), ())
  return ranks


_EMBED_RE = re.compile(r"embed|wte|wpe|token|position", re.I)


class RoleInferenceWarning(UserWarning):
  """The muP role fallback had to guess; pass labels or a base model to be sure."""


def infer_roles(params, base_fan_in: int = 64, *, warn: bool = True):
  """Guesses muP roles for an unlabeled Flax/Haiku parameter tree (documented fallback).

  The heuristic, applied to leaves in module order (the dicts' insertion order, which
  Flax and Haiku make the call order; levels whose keys come lexicographically sorted
  are natural-sorted instead, so ``Dense_10`` follows ``Dense_9``):

  * leaves with fewer than 2 dims (biases, norm scales, scalars) are ``vector``;
  * leaves whose path names an embedding (``embed``, ``wte``, ``wpe``, ``token``,
    ``position``) are ``input`` (muP treats embeddings like input weights);
  * the first remaining weight (dense, conv or 3-D attention kernel) is ``input``
    unless the model has an embedding (then the embedding is its input layer), the
    last is ``output``, every other one is ``hidden``;
  * fan-ins follow :func:`default_fan_in` (product of all axes but the last; 3-D
    attention kernels: ``in`` for query/key/value, ``heads * head_dim`` for ``out``);
  * hidden and output leaves get ``base_fan_in`` (the width the optimizer was tuned
    or meta-trained at); muP extrapolates both ways, so a hidden layer narrower than
    the base gets an update factor above 1.

  A :class:`RoleInferenceWarning` is raised when the guess is doubtful: fewer than two
  weight matrices, a readout wider than its input in a model without an embedding
  (not a typical classifier head),
  or a 3-D kernel that does not look like attention.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [_path_str(p) for p, _ in flat]
  shapes = [tuple(jnp.shape(leaf)) for _, leaf in flat]
  roles: list[ParamRole | None] = [None] * len(flat)
  doubts = []
  weights = []
  for i, (name, shape) in enumerate(zip(names, shapes)):
    if len(shape) < 2:
      roles[i] = vector_role()
    elif _EMBED_RE.search(name):
      roles[i] = input_role(default_fan_in(shape, name))
    else:
      weights.append(i)
      if len(shape) == 3 and not _looks_like_attention(name):
        doubts.append(f"{name} is 3-D but does not look like an attention kernel")
  order = _module_order(params)
  weights.sort(key=lambda i: order.get(names[i], (float("inf"),)))
  has_embedding = any(r is not None and r.kind == "input" for r in roles)
  for rank, i in enumerate(weights):
    fan_in = default_fan_in(shapes[i], names[i])
    if rank == 0 and len(weights) > 1 and not has_embedding:
      roles[i] = input_role(fan_in)
    elif rank == len(weights) - 1:
      roles[i] = ParamRole("output", fan_in, base_fan_in)
      if shapes[i][-1] > fan_in and not has_embedding:
        doubts.append(f"the last weight {names[i]} {shapes[i]} widens; is it the readout?")
    else:
      roles[i] = ParamRole("hidden", fan_in, base_fan_in)
  if len(weights) < 2:
    doubts.append(f"found {len(weights)} weight matrices; cannot tell input from output")
  if doubts and warn:
    warnings.warn(
        "metaopt.mup.infer_roles guessed muP roles and is unsure: " + "; ".join(doubts) +
        ". Pass roles explicitly (labels=... or base_params=...) to silence this.",
        RoleInferenceWarning, stacklevel=2)
  return jax.tree_util.tree_unflatten(treedef, roles)
