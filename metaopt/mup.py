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
:func:`resolve_roles` is the one entry point that picks among them (the optimizers
and tasks call it).
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


def _is_masked(x: Any) -> bool:
  """Whether ``x`` is the placeholder ``optax.masked`` puts where a leaf is masked out."""
  return isinstance(x, optax.MaskedNode)


def _leaves_up_to(params, tree, what: str, is_leaf: Callable[[Any], bool] | None = None
                  ) -> list:
  """The entries of ``tree`` at the leaves of ``params``, in ``params``' flatten order.

  ``tree`` has the structure of ``params`` (labels, roles, a base model). Under
  ``optax.masked`` the params the inner transform sees hold an ``optax.MaskedNode`` in
  place of every masked-out leaf or subtree; ``tree`` may then hold anything there (the
  unmasked tree's entry, a ``MaskedNode``) or leave the dict entry out. Masked entries
  are dropped: the result lines up with ``jax.tree.leaves(params)``.
  """
  full = jax.tree_util.tree_structure(params, is_leaf=_is_masked)
  masked = [_is_masked(x) for x in jax.tree_util.tree_leaves(params, is_leaf=_is_masked)]
  try:
    return [x for x, m in zip(full.flatten_up_to(tree), masked) if not m]
  except (ValueError, TypeError):
    pass
  # Match by path: a dict entry left out where params are masked, or a FrozenDict
  # where params hold a dict.
  leaf_fn = lambda x: _is_masked(x) or (is_leaf is not None and is_leaf(x))
  by_path = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=leaf_fn)[0]}
  flat_p = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)[0]
  p_paths = [_path_str(p) for p, x in flat_p if not _is_masked(x)]
  masked_paths = [_path_str(p) for p, x in flat_p if _is_masked(x)]
  missing = [p for p in p_paths if p not in by_path]
  extra = sorted(p for p in set(by_path) - set(p_paths)
                 if not any(p.startswith(m) for m in masked_paths))
  if missing or extra:
    raise ValueError(
        f"{what} do not match the parameter tree: parameters without an entry: "
        f"{missing[:5]}; entries without a parameter: {extra[:5]}.")
  return [by_path[p] for p in p_paths]


def check_roles(params, roles):
  """Checks that ``roles`` is a :class:`ParamRole` tree matching ``params``.

  Under ``optax.masked`` (params holding ``optax.MaskedNode``) roles of masked-out
  leaves are ignored.

  Returns:
    ``roles`` with the structure of ``params`` (masked entries as in ``params``).

  Raises:
    ValueError: naming the leaves without a role, or a role that is not a ParamRole.
  """
  flat_p, treedef = jax.tree_util.tree_flatten_with_path(params)
  flat_r = _leaves_up_to(params, roles, "muP roles", is_leaf=is_role)
  for (path, _), role in zip(flat_p, flat_r):
    if not is_role(role):
      raise ValueError(
          f"roles{_path_str(path)} is {role!r}; expected a metaopt.mup.ParamRole.")
  return jax.tree_util.tree_unflatten(treedef, flat_r)


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
  flat_l = _leaves_up_to(params, labels, "labels") if not isinstance(labels, str) else [
      labels] * len(flat_p)
  if base_fan_in is None or isinstance(base_fan_in, int):
    flat_b = [base_fan_in] * len(flat_p)
  else:
    flat_b = _leaves_up_to(params, base_fan_in, "base_fan_in")
  fan_ins = [f for f, _ in _layer_fan_ins(flat_p)]
  roles = []
  for (path, leaf), label, base, fan_in in zip(flat_p, flat_l, flat_b, fan_ins):
    name = _path_str(path)
    if label not in ROLE_KINDS:
      raise ValueError(f"label at {name} is {label!r}; expected one of {ROLE_KINDS}.")
    if label == "vector" or not math.prod(jnp.shape(leaf)):  # zero-size: nothing to scale
      roles.append(vector_role())
      continue
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
    flat_b = _leaves_up_to(params, base_params, "base_params")
  except ValueError as e:
    raise ValueError(f"base_params does not have the structure of params: {e}") from e
  roles = []
  for (path, leaf), base in zip(flat_p, flat_b):
    name = _path_str(path)
    shape, bshape = tuple(jnp.shape(leaf)), tuple(jnp.shape(base))
    if len(shape) != len(bshape):
      raise ValueError(
          f"params{name} has shape {shape} but the base model's has {bshape}; "
          "expected the same rank.")
    if len(shape) < 2 or not math.prod(shape):  # zero-size: nothing to scale
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
      lambda x: input_role(default_fan_in(jnp.shape(x))) if (
          jnp.ndim(x) >= 2 and math.prod(jnp.shape(x))) else vector_role(), params)


def update_scales(roles):
  """Tree of floats: the muP factor on each leaf's update (base/fan_in on hidden)."""
  return jax.tree.map(lambda r: r.update_scale, roles, is_leaf=is_role)


class ScaleByMupState(NamedTuple):
  """scale_by_mup is stateless."""


RolesOrFn = Union[Any, Callable[[Any], Any]]
# The base fan-in role inference gives hidden and output leaves by default.
INFERRED_BASE_FAN_IN = 64


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
    scales = update_scales(check_roles(updates, r))
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


class RoleInferenceWarning(UserWarning):
  """The muP role fallback had to guess; pass labels or a base model to be sure."""


# Parameter and module names of the layers users write (flax.linen, Haiku).
_VECTOR_NAMES = frozenset({"bias", "b", "scale", "offset"})  # Dense/Conv/norm vectors
_TABLE_NAMES = frozenset({"embedding", "embeddings"})  # nn.Embed, hk.Embed
_TABLE_TOKENS = frozenset({"embed", "embedding", "embeddings", "embedder", "wte", "token",
                           "tokens", "tok", "cls"})
_POSITION_TOKENS = frozenset({"pos", "posemb", "position", "positions", "positional", "wpe"})
_KERNEL_NAMES = frozenset({"kernel", "w", "weight"})
_QKV = frozenset({"query", "key", "value"})
_GRU_GATES = frozenset({"ir", "iz", "in", "hr", "hz", "hn"})  # nn.GRUCell
_LSTM_GATES = frozenset({"ii", "if", "ig", "io", "hi", "hf", "hg", "ho"})  # nn.LSTMCell


def _path_keys(path) -> tuple[str, ...]:
  """Module path of a leaf as names: Haiku's ``"mlp/~/linear_0"`` splits into two."""
  keys = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      name = str(k.key)
    elif isinstance(k, jax.tree_util.GetAttrKey):
      name = k.name
    elif isinstance(k, jax.tree_util.SequenceKey):
      name = str(k.idx)
    else:
      name = str(getattr(k, "key", k))
    keys.extend(t for t in name.split("/") if t and t != "~")
  return tuple(keys)


def _tokens(name: str) -> set[str]:
  """``"pos_embed_0"`` -> {"pos", "embed"}: the words of a name."""
  return {t for t in re.split(r"[^a-z]+", name.lower()) if t}


def _layer_fan_ins(flat: Sequence[tuple[Any, Any]]) -> list[tuple[int, bool]]:
  """``(fan_in, read_from_bias)`` of every leaf of a flattened tree.

  A kernel of shape ``(*in_axes, *out_axes)`` with a sibling bias of shape ``out_axes``
  (Flax ``Dense``, ``DenseGeneral``, ``Conv``, attention projections; Haiku ``Linear``,
  ``Conv2D``) has fan_in ``prod(in_axes)``; without one, :func:`default_fan_in`.
  """
  shapes = {}
  for path, leaf in flat:
    keys = _path_keys(path)
    shapes[keys] = tuple(jnp.shape(leaf))
  out = []
  for path, leaf in flat:
    keys, shape = _path_keys(path), tuple(jnp.shape(leaf))
    bias = next((shapes[keys[:-1] + (b,)] for b in ("bias", "b")
                 if keys[-1:] != (b,) and keys[:-1] + (b,) in shapes), None)
    if (len(shape) >= 2 and bias and len(bias) < len(shape)
        and shape[len(shape) - len(bias):] == bias):
      out.append((int(math.prod(shape[:len(shape) - len(bias)])), True))
    else:
      out.append((default_fan_in(shape, _path_str(path)), False))
  return out


@dataclasses.dataclass
class _Leaf:
  """What :func:`infer_roles` knows about one leaf."""

  name: str  # keystr of the path
  keys: tuple[str, ...]
  shape: tuple[int, ...]
  fan_in: int
  from_bias: bool  # fan_in read from a sibling bias's shape
  kind: str = "weight"  # vector, table, position, recurrent or weight (ordered)
  group: tuple = ()  # weights read by one layer (q/k/v, a cell's input kernels)
  mixed: bool = False  # reads the input and the recurrent state (hk.LSTM)


def _classify(leaf: _Leaf, children: Mapping[tuple[str, ...], set[str]]) -> None:
  """Sets ``leaf.kind`` and ``leaf.group`` from its names and shape."""
  keys, shape = leaf.keys, leaf.shape
  name = keys[-1] if keys else ""
  module = keys[-2] if len(keys) >= 2 else ""
  module_path, parent_path = keys[:-1], keys[:-2]
  siblings = children.get(parent_path, set())
  leaf.group = (module_path, name)
  if len(shape) < 2 or name in _VECTOR_NAMES or not math.prod(shape):
    leaf.kind = "vector"  # biases (attention biases are (heads, head_dim)), norm scales,
    # zero-size leaves (no entries to scale: no fan-in)
  elif name in _TABLE_NAMES:
    leaf.kind = "table"  # nn.Embed / hk.Embed tables
  elif name not in _KERNEL_NAMES and _tokens(name) & _POSITION_TOKENS:
    leaf.kind = "position"  # self.param("pos", ..., (ctx, d)), "pos_embed", "wpe"
  elif name not in _KERNEL_NAMES and _tokens(name) & _TABLE_TOKENS:
    leaf.kind = "table"  # a raw token table, a learned CLS token
  elif _tokens(module) & {"embed", "embedding", "embeddings", "embedder", "wte"}:
    leaf.kind = "table"  # a Dense named like an embedding (patch_embed, ...)
  elif module in _GRU_GATES | _LSTM_GATES and (
      len(siblings & _GRU_GATES) >= 4 or len(siblings & _LSTM_GATES) >= 4):
    if module.startswith("h"):
      leaf.kind = "recurrent"  # nn.GRUCell / nn.LSTMCell hidden-to-hidden
    else:
      leaf.group = (parent_path, "cell_input")  # every input gate reads the cell input
  elif name == "w_h":
    leaf.kind = "recurrent"  # hk.GRU
  elif name == "w_i":
    leaf.group = (module_path, "cell_input")
  elif module == "linear" and re.fullmatch(r"lstm(_\d+)?", keys[-3] if len(keys) >= 3 else ""):
    leaf.mixed = True  # hk.LSTM: one (input + hidden, 4 * hidden) matrix
  elif module in _QKV and len(siblings & _QKV) >= 2:
    leaf.group = (parent_path, "qkv")  # one attention layer reads its input thrice


def infer_roles(params, base_fan_in: int = INFERRED_BASE_FAN_IN, *, warn: bool = True):
  """Guesses muP roles for an unlabeled Flax/Haiku parameter tree (documented fallback).

  Rules, by parameter name, module name and shape (what ``flax.linen`` and Haiku name
  their parameters):

  ========================================================  ==========  ===================
  leaf                                                      role        fan_in
  ========================================================  ==========  ===================
  fewer than 2 dims; ``bias``/``b``/``scale``/``offset`` of  vector      1
  any shape (Dense, LayerNorm, RMSNorm, attention q/k/v
  biases ``(heads, head_dim)``, DenseGeneral biases)
  ``embedding`` (nn.Embed), ``embeddings`` (hk.Embed), a    input       rows (vocabulary)
  raw parameter named like a token table (``cls_token``),
  a Dense in a module named ``*embed*``/``wte``
  a raw parameter named like a position table (``pos``,     input       rows (context)
  ``pos_embed``, ``wpe``, ``position_embeddings``)
  recurrent kernels: nn.GRUCell/nn.LSTMCell ``h*`` gates,   hidden      hidden size
  hk.GRU ``w_h``
  query/key/value kernels (nn.SelfAttention,                ordered     ``d`` (model width)
  nn.MultiHeadDotProductAttention ``(d, heads, head_dim)``,
  hk.MultiHeadAttention ``(d, heads * key_size)``)
  attention output kernel (``out`` ``(heads, head_dim, d)``  ordered     ``heads * head_dim``
  / hk ``linear``)
  Dense, DenseGeneral, Conv, hk.Linear, hk.Conv2D kernels;  ordered     in-axes product
  GRU/LSTM input gates (``i*``, hk ``w_i``); hk.LSTM's
  ``linear`` (``(in + hidden, 4 hidden)``, always hidden)
  ========================================================  ==========  ===================

  Fan-ins of kernels read the sibling bias: a kernel ``(*in_axes, *out_axes)`` beside a
  bias ``out_axes`` has fan_in ``prod(in_axes)`` (so DenseGeneral and attention
  projections come out right); without a bias, :func:`default_fan_in`.

  "Ordered" weights are grouped into layers (an attention layer's q/k/v kernels are one,
  a recurrent cell's input gates are one, every other kernel is its own) and sorted in
  module order: the dicts' insertion order, which Flax and Haiku make the call order
  (levels whose keys come lexicographically sorted, as after ``jax.jit(model.init)``,
  are natural-sorted instead, so ``Dense_10`` follows ``Dense_9``). The first layer is
  ``input`` (it reads the raw input) unless the model has a token embedding (then the
  embedding is its input layer), the last is ``output``, every other one is
  ``hidden``. Hidden and output leaves get ``base_fan_in`` (the width the optimizer was
  tuned or meta-trained at); muP extrapolates both ways, so a hidden layer narrower than
  the base gets an update factor above 1.

  Masked-out leaves (``optax.MaskedNode``, under ``optax.masked``) stay masked.

  One :class:`RoleInferenceWarning`, naming the leaf paths, is raised when the guess is
  doubtful: fewer than two weight layers; a readout wider than its input in a model
  without an embedding (not a typical classifier head); a last weight mapping back to
  the embedding width (a readout tied to the embedding: labelled hidden); a model ending
  in an attention or recurrent layer; an hk.LSTM reading the raw input (its matrix mixes
  input and state: labelled hidden); a 3-D kernel that is neither attention, conv nor a
  kernel with a matching bias.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  fan_ins = _layer_fan_ins(flat)
  leaves = [_Leaf(_path_str(p), _path_keys(p), tuple(jnp.shape(x)), f, from_bias)
            for (p, x), (f, from_bias) in zip(flat, fan_ins)]
  children: dict[tuple[str, ...], set[str]] = {}
  for leaf in leaves:
    for i in range(len(leaf.keys) - 1):
      children.setdefault(leaf.keys[:i], set()).add(leaf.keys[i])
  for leaf in leaves:
    _classify(leaf, children)

  doubts = []
  roles: list[ParamRole | None] = [None] * len(leaves)
  groups: dict[tuple, list[int]] = {}
  for i, leaf in enumerate(leaves):
    if leaf.kind == "vector":
      roles[i] = vector_role()
    elif leaf.kind in ("table", "position"):
      roles[i] = input_role(leaf.fan_in)
    elif leaf.kind == "recurrent":
      roles[i] = ParamRole("hidden", leaf.fan_in, base_fan_in)
    else:
      groups.setdefault(leaf.group, []).append(i)
      if (len(leaf.shape) == 3 and not leaf.from_bias and leaf.group[-1] != "qkv" and "conv" not in " ".join(leaf.keys).lower()
          and not _looks_like_attention(leaf.name)):
        doubts.append(f"{leaf.name} is 3-D but does not look like an attention kernel")
  order = _module_order(params)
  rank = lambda i: order.get(leaves[i].name, (float("inf"),))
  layers = sorted(groups.values(), key=lambda members: min(rank(i) for i in members))
  tables = [l for l in leaves if l.kind == "table"]
  for n, members in enumerate(layers):
    first, last = n == 0 and len(layers) > 1 and not tables, n == len(layers) - 1
    names = ", ".join(leaves[i].name for i in members)
    kind = "input" if first else "output" if last else "hidden"
    if kind == "input" and any(leaves[i].mixed for i in members):
      kind = "hidden"
      doubts.append(f"{names} reads the raw input and the recurrent state (hk.LSTM); "
                    "labelled hidden")
    if kind == "output" and len(members) > 1:
      kind = "hidden"
      doubts.append(f"the model ends in {names} (attention or recurrent, no readout); "
                    "labelled hidden")
    elif kind == "output":
      leaf = leaves[members[0]]
      if not tables and leaf.shape[-1] > leaf.fan_in:
        doubts.append(f"the last weight {leaf.name} {leaf.shape} widens; is it the readout?")
      elif tables and leaf.shape[-1] == tables[0].shape[-1] != tables[0].shape[0]:
        kind = "hidden"
        doubts.append(f"the last weight {leaf.name} {leaf.shape} maps to the embedding "
                      "width (a readout tied to the embedding?); labelled hidden")
    for i in members:
      roles[i] = (input_role(leaves[i].fan_in) if kind == "input" else
                  ParamRole(kind, leaves[i].fan_in, base_fan_in))
  if len(layers) < 2:
    doubts.append(f"found {len(layers)} weight matrices; cannot tell input from output")
  if doubts and warn:
    warnings.warn(
        "metaopt.mup.infer_roles guessed muP roles and is unsure: " + "; ".join(doubts) +
        ". Pass roles explicitly (labels=... or base_params=...) to silence this.",
        RoleInferenceWarning, stacklevel=2)
  return jax.tree_util.tree_unflatten(treedef, roles)


# ----------------------------------------------------------------------------------
# The one entry point the optimizers and tasks use.


def _holds_labels(roles) -> bool:
  return isinstance(roles, str) or any(
      isinstance(r, str) for r in jax.tree.leaves(roles, is_leaf=is_role))


def resolve_roles(params, roles: RolesOrFn | None = None, *, labels: Any = None,
                  base_params: Any = None, base_fan_in: int | None = None,
                  warn: bool = True):
  """The muP roles of ``params`` from whichever description of them is given.

  The first of these that is not None decides (callers that forbid passing two say so
  themselves):

  1. ``roles``: a :class:`ParamRole` tree, or a callable ``params -> roles``. A tree of
     role names (``"hidden"``, ...), or a single name, is read as ``labels``. Checked
     by :func:`check_roles` (masked leaves dropped).
  2. ``labels``: role names per leaf (a tree, one name or a callable), by
     :func:`roles_from_labels` with ``base_fan_in``.
  3. ``base_params``: a narrower base model's params, by :func:`roles_from_base`.
  4. none of them: :func:`infer_roles` with ``base_fan_in`` (default
     ``INFERRED_BASE_FAN_IN``), warning when unsure if ``warn``.

  Args:
    params: the parameter tree (arrays or ShapeDtypeStructs; may hold
      ``optax.MaskedNode``).
    roles: see 1.
    labels: see 2.
    base_params: see 3.
    base_fan_in: the base fan-in of hidden and output leaves that labels or inference
      give a role; None: labels take each leaf's own fan-in (the model is its own
      base), inference ``INFERRED_BASE_FAN_IN``.
    warn: let :func:`infer_roles` warn (:class:`RoleInferenceWarning`).

  Returns:
    A :class:`ParamRole` tree with the structure of ``params``.
  """
  if callable(roles) and not is_role(roles):
    roles = roles(params)
  if roles is not None and _holds_labels(roles):
    roles, labels = None, roles
  if roles is not None:
    return check_roles(params, roles)
  if labels is not None:
    return roles_from_labels(params, labels, base_fan_in=base_fan_in)
  if base_params is not None:
    return roles_from_base(params, base_params)
  return infer_roles(params, INFERRED_BASE_FAN_IN if base_fan_in is None else base_fan_in,
                     warn=warn)
