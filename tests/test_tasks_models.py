"""Task protocol, models, muP roles and fan-ins, configs, families and suites."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from metaopt import mup
from metaopt.eval import harness
from tasks import suites
from tasks.models import conv
from tasks.models import transformer

ALL_SUITE_ENTRIES = [e for name in ("smoke", "meta_train_default", "heldout",
                                    "heldout-full", "widths")
                     for e in tasks.get_suite(name)]
# Building a quadratic draws its rotation eagerly (a QR of dim x dim): skip the 2048-dim
# heldout-full one; heldout's quadratic covers the same code.
BUILDABLE_ENTRIES = [e for e in ALL_SUITE_ENTRIES
                     if not (isinstance(e.config, tasks.QuadraticConfig)
                             and e.config.dim > 256)]


def _roles_by_path(task):
  shapes = task.param_shapes()
  mup.check_roles(shapes, task.roles)  # every leaf has a role, and nothing else does
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  roles = jax.tree_util.tree_leaves(task.roles, is_leaf=mup.is_role)
  return {jax.tree_util.keystr(p): (s.shape, r) for (p, s), r in zip(leaves, roles)}


@pytest.mark.parametrize("entry", BUILDABLE_ENTRIES, ids=lambda e: e.name)
def test_roles_cover_every_leaf_and_fan_ins_follow_the_layout(entry):
  task = entry.build()
  assert task.num_steps == entry.num_steps
  for path, (shape, role) in _roles_by_path(task).items():
    if role.kind == "vector":
      assert len(shape) <= 2, path  # biases (attention biases are (heads, d_head))
      continue
    # Dense (in, out), conv (k, k, in, out), attention (d, H, dh) / (H, dh, d).
    assert role.fan_in == mup.default_fan_in(shape, path), path
    mup_on = getattr(entry.config, "mup", True)
    if not mup_on:
      assert role.base_fan_in == role.fan_in, path


def test_fan_ins_of_dense_conv_and_attention_weights():
  mlp = _roles_by_path(tasks.build(tasks.MLPConfig(width=96, depth=2, base_width=32)))
  assert mlp["['layer_0']['kernel']"][1] == mup.input_role(64)
  assert mlp["['layer_1']['kernel']"][1] == mup.hidden_role(96, 32)
  assert mlp["['readout']['kernel']"][1] == mup.output_role(96, 32)
  assert mlp["['readout']['bias']"][1] == mup.vector_role()

  conv = _roles_by_path(tasks.build(tasks.ConvConfig(width=24, depth=2, base_width=8)))
  assert conv["['conv_0']['kernel']"] == ((3, 3, 1, 24), mup.input_role(9))
  assert conv["['conv_1']['kernel']"] == ((3, 3, 24, 24), mup.hidden_role(216, 72))
  assert conv["['readout']['kernel']"][1] == mup.output_role(24, 8)

  lm = _roles_by_path(tasks.build(tasks.TransformerLMConfig(width=48, heads=3, context=8,
                                                            base_width=24)))
  attn = "['block_0']['attn']"
  assert lm[f"{attn}['query']['kernel']"] == ((48, 3, 16), mup.hidden_role(48, 24))
  assert lm[f"{attn}['value']['kernel']"] == ((48, 3, 16), mup.hidden_role(48, 24))
  assert lm[f"{attn}['out']['kernel']"] == ((3, 16, 48), mup.hidden_role(48, 24))
  assert lm[f"{attn}['query']['bias']"] == ((3, 16), mup.vector_role())
  assert lm["['block_0']['mlp_out']['kernel']"] == ((192, 48), mup.hidden_role(192, 96))
  assert lm["['embed']['embedding']"] == ((70, 48), mup.input_role(70))
  assert lm["['pos_embed']"] == ((8, 48), mup.input_role(8))
  assert lm["['readout']['kernel']"] == ((48, 70), mup.output_role(48, 24))


@pytest.mark.parametrize("make", [
    lambda w: tasks.MLPConfig(width=w, depth=3, base_width=16),
    lambda w: tasks.MLPConfig(width=w, depth=2, base_width=16, framework="haiku"),
    lambda w: tasks.ConvConfig(width=w, depth=3, base_width=16),
    lambda w: tasks.TransformerLMConfig(width=w, depth=2, heads=2, base_width=16),
], ids=["mlp", "mlp_haiku", "conv", "transformer"])
def test_explicit_roles_agree_with_roles_derived_from_the_base_model(make):
  wide, narrow = tasks.build(make(64)), tasks.build(make(16))
  derived = mup.roles_from_base(wide.param_shapes(), narrow.param_shapes())
  flat = jax.tree_util.tree_flatten_with_path(derived, is_leaf=mup.is_role)[0]
  stated = jax.tree_util.tree_leaves(wide.roles, is_leaf=mup.is_role)
  for (path, d), s in zip(flat, stated):
    if s.kind != "vector":  # the heuristic labels 2-D attention biases "input"
      assert d == s, jax.tree_util.keystr(path)


def test_mup_zero_readout_and_output_multiplier_vs_sp():
  mu = tasks.build(tasks.MLPConfig(width=128, base_width=64))
  sp = tasks.build(tasks.MLPConfig(width=128, base_width=64, mup=False))
  batch = mu.eval_batch()

  @jax.jit
  def run(key):
    p_mu, p_sp = mu.init(key), sp.init(key)
    return p_mu, p_sp, mu.activations(p_sp, batch)["logits"], sp.activations(p_sp, batch)[
        "logits"]

  p_mu, p_sp, logits_mu, logits_sp = run(jax.random.key(0))
  assert not np.any(p_mu["readout"]["kernel"]) and np.any(p_sp["readout"]["kernel"])
  np.testing.assert_array_equal(p_mu["layer_1"]["kernel"], p_sp["layer_1"]["kernel"])
  std = float(jnp.std(p_mu["layer_1"]["kernel"]))
  assert abs(std * np.sqrt(128) - 1) < 0.05  # N(0, 1/fan_in)
  np.testing.assert_allclose(logits_mu, 0.5 * logits_sp, rtol=1e-6)  # base/width = 0.5


def test_transformer_attention_scale_is_one_over_d_head_under_mup():
  cfg = tasks.TransformerLMConfig(width=32, heads=2, context=8)
  t_mu, t_sp = tasks.build(cfg), tasks.build(dataclasses.replace(cfg, mup=False))
  x = jax.random.normal(jax.random.key(0), (1, 4, 32))
  attn = transformer.CausalSelfAttention(2, 1 / 16)
  # Scaling the queries by sqrt(d_head) = 4 turns the muP scale 1/d_head into SP's.
  rng = np.random.default_rng(0)
  a = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.3,
                   jax.eval_shape(attn.init, jax.random.key(0), x))
  a4 = {"params": {**a["params"], "query": jax.tree.map(lambda w: 4 * w,
                                                          a["params"]["query"])}}

  @jax.jit
  def outputs(key):
    p = t_sp.init(key)  # nonzero readout
    b = t_sp.sample_batch(key)
    sp_attn = transformer.CausalSelfAttention(2, 1 / 4).apply(a, x)
    return t_mu.loss(p, b), t_sp.loss(p, b), attn.apply(a4, x), sp_attn

  loss_mu, loss_sp, attn_mu4, attn_sp = outputs(jax.random.key(0))
  # Same weights, base == width: the models differ only by the attention scale.
  assert not np.allclose(loss_mu, loss_sp)
  np.testing.assert_allclose(attn_mu4, attn_sp, rtol=1e-4, atol=1e-5)
  assert not np.allclose(attn_mu4, transformer.CausalSelfAttention(2, 1 / 16).apply(a, x))
  assert t_mu.roles["readout"]["kernel"].output_multiplier == 1.0


@pytest.mark.parametrize("shape,k,stride", [
    ((2, 8, 8, 3), 3, 1), ((2, 8, 8, 3), 3, 2), ((2, 7, 7, 4), 3, 2), ((1, 5, 6, 2), 5, 2),
    ((3, 2, 8, 8, 1), 3, 2)])
def test_im2col_conv_matches_lax_conv(shape, k, stride):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (k, k, shape[-1], 5))
  flat = x.reshape((-1, *shape[-3:]))
  ref = jax.lax.conv_general_dilated(flat, w, (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ref = ref.reshape((*shape[:-3], *ref.shape[1:]))
  np.testing.assert_allclose(conv.conv2d(x, w, stride), ref, rtol=1e-5, atol=1e-5)


def test_haiku_and_flax_mlps_compute_the_same_function():
  cfg = tasks.MLPConfig(tasks.GaussianMixtureData(num_classes=5, dim=12, num_train=64,
                                                  num_test=32),
                        width=48, depth=3, activation="gelu", base_width=16, mup=True)
  flax_task = tasks.build(cfg)
  haiku_task = tasks.build(dataclasses.replace(cfg, framework="haiku"))
  batch = flax_task.eval_batch()

  @jax.jit
  def both(key):
    p = jax.tree.map(lambda x: x + 0.1, flax_task.init(key))  # nonzero readout
    p_hk = {layer: {"w": v["kernel"], "b": v["bias"]} for layer, v in p.items()}
    return flax_task.activations(p, batch), haiku_task.activations(p_hk, batch), p_hk

  a, b, p_hk = both(jax.random.key(0))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)
  assert jax.tree.map(jnp.shape, haiku_task.param_shapes()) == jax.tree.map(jnp.shape, p_hk)


def test_sample_batch_rejects_unknown_splits():
  for config in (tasks.MLPConfig(), tasks.TransformerLMConfig(), tasks.QuadraticConfig()):
    with pytest.raises(ValueError, match="split"):
      tasks.build(config).sample_batch(jax.random.key(0), "validation")


@pytest.mark.parametrize("entry", ALL_SUITE_ENTRIES[:12], ids=lambda e: e.name)
def test_config_json_round_trip(entry):
  s = tasks.config_to_json(entry.config)
  json.loads(s)
  assert tasks.config_from_json(s) == entry.config
  assert str(entry.config)  # printable


def test_config_json_nested_data_and_errors():
  cfg = tasks.ConvConfig(tasks.TFDSImageData("cifar10", "/data", image_size=8,
                                             grayscale=True), width=8)
  s = tasks.config_to_json(cfg)
  assert json.loads(s)["data"]["__type__"] == "TFDSImageData"
  assert tasks.config_from_json(s) == cfg
  with pytest.raises(ValueError, match="unknown config type"):
    tasks.config_from_json('{"__type__": "Nope"}')
  with pytest.raises(ValueError, match="not a task config"):
    tasks.build(tasks.DigitsData())


def test_task_family_samples_valid_configs_deterministically():
  family = tasks.TaskFamily(tasks.MLPConfig(), {
      "width": (16, 32), "depth": (1, 2),
      "data": (tasks.DigitsData(), tasks.GaussianMixtureData(dim=8, num_train=64))})
  configs = [family.sample(jax.random.key(i)) for i in range(12)]
  assert configs == [family.sample(jax.random.key(i)) for i in range(12)]
  assert {c.width for c in configs} == {16, 32} and {c.depth for c in configs} == {1, 2}
  assert len({type(c.data) for c in configs}) == 2
  assert family.build(configs[0]).config == configs[0]
  with pytest.raises(ValueError, match="no fields"):
    tasks.TaskFamily(tasks.MLPConfig(), {"heads": (1,)})


@pytest.mark.parametrize("name", tasks.suites.FAMILY_NAMES)
def test_named_families_sample_buildable_configs(name):
  family = tasks.get_family(name)
  for i in range(3):
    config = family.sample(jax.random.key(i))
    assert tasks.config_from_json(tasks.config_to_json(config)) == config
    assert family.build(config, num_steps=10).num_steps == 10
  with pytest.raises(ValueError, match="transformer_lm"):
    tasks.get_family("nope")


def test_suites_contents():
  with pytest.raises(ValueError, match="heldout-full"):
    tasks.get_suite("nope")
  smoke = tasks.get_suite("smoke")
  assert len(smoke) == 2 and all(e.num_steps < 100 for e in smoke)
  default = tasks.get_suite("meta_train_default")
  assert all(getattr(e.config, "width", 0) <= 128 for e in default)
  families = {type(e.config) for e in default}
  assert {tasks.MLPConfig, tasks.TransformerLMConfig, tasks.QuadraticConfig} <= families
  heldout, full = tasks.get_suite("heldout"), tasks.get_suite("heldout-full")
  assert {tasks.ConvConfig, tasks.TransformerLMConfig} <= {type(e.config) for e in heldout}
  assert harness.estimate_eval_seconds(heldout) < 20 * 60
  for h, f in zip(heldout, full):
    assert f.num_steps == 10 * h.num_steps
    if isinstance(h.config, (tasks.MLPConfig, tasks.ConvConfig, tasks.TransformerLMConfig)):
      assert (f.config.width, f.config.depth) == (8 * h.config.width, 2 * h.config.depth)
  widths = tasks.get_suite("widths")
  assert [e.config.width for e in widths] == [64, 128, 256, 512, 1024, 2048, 4096, 8192]
  assert [e.config.width for e in tasks.widths_suite([32, 96], mup=False)] == [32, 96]
  assert all(e.est_cost_s > 0 for e in ALL_SUITE_ENTRIES)
  assert len({e.name for e in heldout}) == len(heldout)
  assert len(tasks.tfds_suite("/data")) == 6

