"""Role inference on models written the way users write them (a zoo).

Each test builds a standard Flax or Haiku model, initializes it as a user would
(``model.init`` eagerly; recurrent cells outside any ``vmap``: a batched QR under vmap
can deadlock XLA:CPU on 2 cores in jax 0.10), and asserts the muP role and fan-in a
practitioner would assign to every leaf (Yang et al, "Tensor Programs V",
arXiv:2203.03466, 2022, Table 3): the layer reading the raw input and embedding /
positional tables are ``input``, width-to-width weights (attention projections,
recurrent kernels) ``hidden``, the readout ``output``, biases and norm parameters
(attention biases of shape ``(heads, head_dim)`` included) ``vector``.
"""

from __future__ import annotations

import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import metaopt
from metaopt import mup
from metaopt import optimizers

KEY = jax.random.key(0)
VOCAB, CTX, D, HEADS = 20, 8, 32, 4


def _roles(params, **kwargs) -> dict[str, tuple[str, int]]:
  """``{leaf path: (kind, fan_in)}`` of ``infer_roles``, failing on any warning."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", mup.RoleInferenceWarning)
    roles = mup.infer_roles(params, **kwargs)
  flat = jax.tree_util.tree_flatten_with_path(roles, is_leaf=mup.is_role)[0]
  return {jax.tree_util.keystr(p): (r.kind, r.fan_in) for p, r in flat}


def _sorted_like_jit(params):
  """The tree as ``jax.jit(model.init)`` returns it: every dict's keys sorted."""
  return jax.tree.map(lambda x: x, params)


def _dense(prefix: str, kind: str, fan_in: int) -> dict[str, tuple[str, int]]:
  return {f"{prefix}['kernel']": (kind, fan_in), f"{prefix}['bias']": ("vector", 1)}


def _norm(prefix: str, bias: bool = True) -> dict[str, tuple[str, int]]:
  out = {f"{prefix}['scale']": ("vector", 1)}
  if bias:
    out[f"{prefix}['bias']"] = ("vector", 1)
  return out


# ------------------------------------------------------------------------------ Flax


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    for width in (64, 64):
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(10)(x)


def test_flax_mlp():
  params = MLP().init(KEY, jnp.ones((1, 8)))
  expected = {**_dense("['params']['Dense_0']", "input", 8),
              **_dense("['params']['Dense_1']", "hidden", 64),
              **_dense("['params']['Dense_2']", "output", 64)}
  assert _roles(params) == expected
  assert _roles(_sorted_like_jit(params)) == expected


class CNN(nn.Module):
  """Strided conv net with pooling on 8x8 images, as in the Flax examples."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(32, (3, 3), use_bias=False)(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def test_flax_cnn_with_strides_and_pooling():
  params = CNN().init(KEY, jnp.ones((1, 8, 8, 1)))
  expected = {**_dense("['params']['Conv_0']", "input", 9 * 1),
              **_dense("['params']['Conv_1']", "hidden", 9 * 16),
              "['params']['Conv_2']['kernel']": ("hidden", 9 * 32),
              **_dense("['params']['Dense_0']", "hidden", 2 * 2 * 32),  # 8 -> 4 -> 2
              **_dense("['params']['Dense_1']", "output", 64)}
  assert _roles(params) == expected
  assert _roles(_sorted_like_jit(params)) == expected


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(ln(x)), x + mlp(ln(x))."""

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.SelfAttention(num_heads=HEADS)(nn.LayerNorm()(x), mask=mask)
    h = nn.gelu(nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x)))
    return x + nn.Dense(x.shape[-1])(h)


class TransformerLM(nn.Module):
  depth: int = 2

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (CTX, D))
    x = x + pos[:tokens.shape[-1]]
    for _ in range(self.depth):
      x = Block()(x)
    return nn.Dense(VOCAB)(nn.LayerNorm()(x))


def _flax_lm_expected(depth: int) -> dict[str, tuple[str, int]]:
  p = "['params']"
  expected = {f"{p}['Embed_0']['embedding']": ("input", VOCAB),
              f"{p}['pos']": ("input", CTX),
              **_norm(f"{p}['LayerNorm_0']"),
              **_dense(f"{p}['Dense_0']", "output", D)}
  for i in range(depth):
    b = f"{p}['Block_{i}']"
    for proj in ("query", "key", "value"):
      expected.update(_dense(f"{b}['SelfAttention_0']['{proj}']", "hidden", D))
    expected.update(_dense(f"{b}['SelfAttention_0']['out']", "hidden", D))
    expected.update({**_norm(f"{b}['LayerNorm_0']"), **_norm(f"{b}['LayerNorm_1']"),
                     **_dense(f"{b}['Dense_0']", "hidden", D),
                     **_dense(f"{b}['Dense_1']", "hidden", 4 * D)})
  return expected


def test_flax_pre_ln_transformer_lm():
  params = TransformerLM().init(KEY, jnp.zeros((1, CTX), jnp.int32))
  expected = _flax_lm_expected(2)
  assert _roles(params) == expected
  assert _roles(_sorted_like_jit(params)) == expected
  # The attention biases (heads, head_dim) are vectors: their updates are not scaled
  # by base_fan_in / heads (16x too large with heads=4 and base 64).
  roles = mup.infer_roles(params)
  q_bias = roles["params"]["Block_0"]["SelfAttention_0"]["query"]["bias"]
  assert params["params"]["Block_0"]["SelfAttention_0"]["query"]["bias"].shape == (
      HEADS, D // HEADS)
  assert q_bias.update_scale == 1.0
  out = roles["params"]["Block_0"]["SelfAttention_0"]["out"]["kernel"]
  assert out.update_scale == 64 / D


def test_flax_multi_head_attention_and_dense_general():
  class Encoder(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.DenseGeneral((HEADS, 8))(x)  # (B, T, 16) -> (B, T, 4, 8)
      x = nn.DenseGeneral(D, axis=(-2, -1))(x)  # -> (B, T, 32)
      x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=64)(
          nn.RMSNorm()(x), nn.RMSNorm()(x))
      return nn.Dense(3)(x.mean(axis=1))

  params = Encoder().init(KEY, jnp.ones((1, CTX, 16)))
  p, a = "['params']", "['params']['MultiHeadDotProductAttention_0']"
  expected = {f"{p}['DenseGeneral_0']['kernel']": ("input", 16),
              f"{p}['DenseGeneral_0']['bias']": ("vector", 1),
              f"{p}['DenseGeneral_1']['kernel']": ("hidden", HEADS * 8),
              f"{p}['DenseGeneral_1']['bias']": ("vector", 1),
              **_norm(f"{p}['RMSNorm_0']", bias=False),
              **_norm(f"{p}['RMSNorm_1']", bias=False),
              **_dense(f"{a}['out']", "hidden", 64),
              **_dense(f"{p}['Dense_0']", "output", D)}
  for proj in ("query", "key", "value"):
    expected.update(_dense(f"{a}['{proj}']", "hidden", D))
  assert _roles(params) == expected


class GRUClassifier(nn.Module):
  """Two stacked GRUs over a sequence of feature vectors, read out from the last step."""

  @nn.compact
  def __call__(self, x):
    x = nn.RNN(nn.GRUCell(48))(x)
    x = nn.RNN(nn.GRUCell(48))(x)
    return nn.Dense(10)(x[:, -1])


def _gru(prefix: str, in_kind: str, in_fan: int, hidden: int) -> dict:
  out = {}
  for gate in ("r", "z", "n"):
    out[f"{prefix}['i{gate}']['kernel']"] = (in_kind, in_fan)
    out[f"{prefix}['h{gate}']['kernel']"] = ("hidden", hidden)
  for bias in ("ir", "iz", "in", "hn"):
    out[f"{prefix}['{bias}']['bias']"] = ("vector", 1)
  return out


def test_flax_gru_via_nn_rnn():
  params = GRUClassifier().init(KEY, jnp.ones((1, 8, 8)))  # eager, outside any vmap
  expected = {**_gru("['params']['GRUCell_0']", "input", 8, 48),
              **_gru("['params']['GRUCell_1']", "hidden", 48, 48),
              **_dense("['params']['Dense_0']", "output", 48)}
  assert _roles(params) == expected


class LSTMLM(nn.Module):
  """Character LM: embedding, an LSTM cell scanned over time, a readout."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, 24)(tokens)
    cell = nn.scan(nn.LSTMCell, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1)(40)
    carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
    _, h = cell(carry, x)
    return nn.Dense(VOCAB)(h)


def test_flax_lstm_via_scan_after_an_embedding():
  params = LSTMLM().init(KEY, jnp.zeros((2, CTX), jnp.int32))
  cell = "['params']['ScanLSTMCell_0']"
  expected = {"['params']['Embed_0']['embedding']": ("input", VOCAB),
              **_dense("['params']['Dense_0']", "output", 40)}
  for gate in ("i", "f", "g", "o"):
    expected[f"{cell}['i{gate}']['kernel']"] = ("hidden", 24)  # reads the embedding
    expected.update(_dense(f"{cell}['h{gate}']", "hidden", 40))
  assert _roles(params) == expected


class ResidualMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(64)(x)
    for _ in range(2):
      x = x + nn.Dense(64)(nn.gelu(nn.Dense(128)(nn.LayerNorm()(x))))
    return nn.Dense(1)(nn.LayerNorm()(x))


def test_flax_residual_mlp_with_layer_norm():
  params = ResidualMLP().init(KEY, jnp.ones((1, 12)))
  p = "['params']"
  # Flax names modules as they are constructed: the outer Dense(64) of each block is
  # Dense_1/Dense_3, its inner Dense(128) Dense_2/Dense_4 (called first).
  expected = {**_dense(f"{p}['Dense_0']", "input", 12),
              **_dense(f"{p}['Dense_1']", "hidden", 128),
              **_dense(f"{p}['Dense_2']", "hidden", 64),
              **_dense(f"{p}['Dense_3']", "hidden", 128),
              **_dense(f"{p}['Dense_4']", "hidden", 64),
              **_dense(f"{p}['Dense_5']", "output", 64),
              **_norm(f"{p}['LayerNorm_0']"), **_norm(f"{p}['LayerNorm_1']"),
              **_norm(f"{p}['LayerNorm_2']")}
  assert _roles(params) == expected
  assert _roles(_sorted_like_jit(params)) == expected


# ----------------------------------------------------------------------------- Haiku


def _hk_dense(prefix: str, kind: str, fan_in: int) -> dict[str, tuple[str, int]]:
  return {f"['{prefix}']['w']": (kind, fan_in), f"['{prefix}']['b']": ("vector", 1)}


def test_haiku_mlp_and_conv():
  mlp = hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([64, 64, 1], activation=jax.nn.gelu)(x)))
  params = mlp.init(KEY, jnp.ones((1, 5)))
  assert _roles(params) == {**_hk_dense("mlp/~/linear_0", "input", 5),
                            **_hk_dense("mlp/~/linear_1", "hidden", 64),
                            **_hk_dense("mlp/~/linear_2", "output", 64)}

  def convnet(x):
    x = jax.nn.relu(hk.Conv2D(8, 3)(x))
    x = jax.nn.relu(hk.Conv2D(16, 3, stride=2)(x))
    return hk.Linear(10)(hk.Flatten()(x))

  params = hk.without_apply_rng(hk.transform(convnet)).init(KEY, jnp.ones((1, 8, 8, 3)))
  assert _roles(params) == {**_hk_dense("conv2_d", "input", 27),
                            **_hk_dense("conv2_d_1", "hidden", 72),
                            **_hk_dense("linear", "output", 4 * 4 * 16)}


def _haiku_lm(tokens):
  x = hk.Embed(VOCAB, D)(tokens)
  x = x + hk.get_parameter("pos_embs", (CTX, D), init=hk.initializers.TruncatedNormal(0.02))
  for i in range(2):
    h = hk.LayerNorm(-1, create_scale=True, create_offset=True, name=f"ln_{i}")(x)
    x = x + hk.MultiHeadAttention(num_heads=HEADS, key_size=D // HEADS,
                                  w_init=hk.initializers.VarianceScaling(1.0),
                                  name=f"mha_{i}")(h, h, h)
    x = x + hk.nets.MLP([4 * D, D], name=f"mlp_{i}")(x)
  return hk.Linear(VOCAB, name="head")(x)


def test_haiku_transformer_with_multi_head_attention():
  params = hk.without_apply_rng(hk.transform(_haiku_lm)).init(
      KEY, jnp.zeros((1, CTX), jnp.int32))
  expected = {"['embed']['embeddings']": ("input", VOCAB),
              "['~']['pos_embs']": ("input", CTX),
              **_hk_dense("head", "output", D)}
  for i in range(2):
    expected.update({f"['ln_{i}']['scale']": ("vector", 1),
                     f"['ln_{i}']['offset']": ("vector", 1),
                     **_hk_dense(f"mha_{i}/linear", "hidden", D),
                     **_hk_dense(f"mlp_{i}/~/linear_0", "hidden", D),
                     **_hk_dense(f"mlp_{i}/~/linear_1", "hidden", 4 * D)})
    for proj in ("query", "key", "value"):
      expected.update(_hk_dense(f"mha_{i}/{proj}", "hidden", D))
  assert _roles(params) == expected


def test_haiku_gru_on_raw_inputs():
  def forward(x):
    core = hk.GRU(32)
    h, _ = hk.dynamic_unroll(core, x, core.initial_state(x.shape[1]))
    return hk.Linear(4)(h[-1])

  params = hk.without_apply_rng(hk.transform(forward)).init(KEY, jnp.ones((6, 2, 5)))
  assert _roles(params) == {"['gru']['w_i']": ("input", 5), "['gru']['w_h']": ("hidden", 32),
                            "['gru']['b']": ("vector", 1),
                            **_hk_dense("linear", "output", 32)}


# ------------------------------------------------------------------- unsure: one warning


def test_unsure_cases_warn_once_naming_the_leaves():
  class TiedLM(nn.Module):

    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(VOCAB, D)
      x = embed(tokens)
      x = x + nn.Dense(D)(nn.gelu(nn.Dense(4 * D)(nn.LayerNorm()(x))))
      return embed.attend(x)

  params = TiedLM().init(KEY, jnp.zeros((1, CTX), jnp.int32))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    roles = mup.infer_roles(params)
  messages = [str(w.message) for w in caught if w.category is mup.RoleInferenceWarning]
  assert len(messages) == 1, messages
  # Dense(D) is constructed first, so Dense_0 is the (4D, D) projection called last.
  assert "['params']['Dense_0']['kernel']" in messages[0] and "tied" in messages[0]
  assert roles["params"]["Dense_0"]["kernel"].kind == "hidden"

  def lstm(x):
    core = hk.LSTM(16)
    h, _ = hk.dynamic_unroll(core, x, core.initial_state(x.shape[1]))
    return hk.Linear(4)(h[-1])

  params = hk.without_apply_rng(hk.transform(lstm)).init(KEY, jnp.ones((6, 2, 5)))
  with pytest.warns(mup.RoleInferenceWarning, match=r"\['lstm/linear'\]\['w'\]"):
    roles = mup.infer_roles(params)
  assert roles["lstm/linear"]["w"] == mup.ParamRole("hidden", 5 + 16, 64)


# ------------------------------------------------------------------------ optax.masked


def test_labels_and_roles_under_optax_masked_with_an_integer_leaf():
  params = {"dense": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros((8,))},
            "readout": {"kernel": jnp.ones((8, 3)), "bias": jnp.zeros((3,))},
            "step": jnp.zeros((), jnp.int32)}
  mask = jax.tree.map(lambda x: jnp.issubdtype(x.dtype, jnp.floating), params)
  labels = {"dense": {"kernel": "input", "bias": "vector"},
            "readout": {"kernel": "output", "bias": "vector"}, "step": "vector"}
  grads = {**jax.tree.map(jnp.ones_like, params), "step": jnp.zeros((), jnp.int32)}
  lo = metaopt.pretrained()
  reference = lo.as_optax(labels={k: v for k, v in labels.items() if k != "step"})
  ref_params = {k: v for k, v in params.items() if k != "step"}
  ref_updates, _ = jax.jit(reference.update)({k: grads[k] for k in ref_params},
                                             reference.init(ref_params), ref_params)
  roles = mup.roles_from_labels({k: v for k, v in params.items() if k != "step"},
                                {k: v for k, v in labels.items() if k != "step"})
  roles = {**roles, "step": mup.vector_role()}
  for kwargs in ({"labels": labels},  # the full tree's labels
                 {"labels": {k: v for k, v in labels.items() if k != "step"}},  # left out
                 {"roles": roles}, {}):
    opt = optax.masked(lo.as_optax(**kwargs), mask)
    state = opt.init(params)
    updates, state = jax.jit(opt.update)(grads, state, params)
    assert updates["step"].dtype == jnp.int32, kwargs
    for path in (("dense", "kernel"), ("readout", "bias")):
      np.testing.assert_allclose(updates[path[0]][path[1]], ref_updates[path[0]][path[1]],
                                 rtol=1e-6, err_msg=str(kwargs))
  # mu_adamw states its roles the same way.
  opt = optax.masked(optimizers.mu_adamw(1e-3, roles), mask)
  updates, _ = opt.update(grads, opt.init(params), params)
  assert bool(jnp.all(jnp.isfinite(updates["dense"]["kernel"])))
  # Labels missing an unmasked leaf still raise, naming it.
  with pytest.raises(ValueError, match="labels do not match"):
    optax.masked(lo.as_optax(labels={"dense": labels["dense"]}), mask).init(params)
