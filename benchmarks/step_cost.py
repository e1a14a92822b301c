"""Step cost of the learned optimizer vs optax.adam (run by hand; numbers go in the README).

Measures, side by side in one process:
1. wall time of one jitted optimizer update on MLP parameter trees of 1e4..1e7 params;
2. the whole training step (forward, backward, update) on a small transformer LM at
   batch 32 (the `tasks` character LM when available);
3. optimizer-state bytes per parameter;
4. ``--transformers``: compile time, step time and XLA temp memory of the jitted train
   step of pre-LN Flax transformer LMs (d=256, batch 16 x 64 tokens) with 2, 6 and 24
   layers (26, 102 and 390 leaves), the released LO vs ``optax.adamw``.
5. ``--muon``: on the same transformer LMs, ``metaopt.optimizers.muon`` vs the LO with
   the orthogonalized candidate on (``LOConfig(muon=True)``; target: the LO's step at
   most 1.5x Muon's) and off (the released LO, whose numbers the switch must not
   change), beside ``optax.adamw``: whole train step and the update alone, timed in
   interleaved rounds (each optimizer once per round, ``--rounds`` rounds of
   ``--repeats`` calls; medians), for shared, noisy machines.
6. ``--step-size``: the LO update alone on the MLP trees of ``--sizes`` with the
   step-size features off and on (``LOConfig.step_size_features``; the same random
   LO, the new rows nonzero), in interleaved rounds as in 5. (only it runs).

Usage: python benchmarks/step_cost.py [--sizes 1e4 1e5 1e6 1e7] [--repeats 20]
       [--transformers 2 6 24] [--muon 2 6] [--rounds 5] [--step-size]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Runnable from a clone without `pip install -e .`: the repository root goes first on
# the import path, so the script imports this checkout's metaopt and tasks.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metaopt


def mlp_params(num_params: int):
  """A 3-layer MLP tree with about ``num_params`` parameters (square hidden layers)."""
  width = int(np.sqrt(num_params / 3))
  shapes = {"l0": {"w": (width, width), "b": (width,)},
            "l1": {"w": (width, width), "b": (width,)},
            "l2": {"w": (width, width), "b": (width,)}}
  return jax.tree.map(lambda s: jnp.ones(s, jnp.float32) * 0.01, shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def timings(fn, args, repeats: int) -> list[float]:
  """Seconds of each of ``repeats`` calls ``fn(*args)`` (results awaited)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def time_fn(fn, *args, repeats: int) -> float:
  """Median seconds of a call, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  return float(np.median(timings(fn, args, repeats)))


def update_cost(opt, params, repeats):
  state = opt.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p, value=jnp.float32(1.0)))
  seconds = time_fn(step, grads, state, params, repeats=repeats)
  state_bytes = sum(l.nbytes for l in jax.tree.leaves(state))
  return seconds, state_bytes


def lo_optimizer():
  lo = metaopt.LearnedOptimizer.random(jax.random.key(0), output_scale=0.05)
  return lo.as_optax(num_steps=1000, sp=True)


def lm_step_cost(opt, repeats):
  import tasks  # pylint: disable=g-import-not-at-top
  entries = [e for e in tasks.get_suite("meta_train_default")
             if type(e.config).__name__ == "TransformerLMConfig"]
  task = entries[0].build()
  params = task.init(jax.random.key(0))
  state = opt.init(params)

  @jax.jit
  def train_step(params, state, key):
    batch = task.sample_batch(key)
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    updates, state = opt.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  return time_fn(train_step, params, state, jax.random.key(1), repeats=repeats), task.name


def transformer_lm(layers: int, d: int = 256, vocab: int = 64, ctx: int = 64):
  """A pre-LN Flax transformer LM as a user writes it (nn.SelfAttention, learned pos)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = nn.SelfAttention(num_heads=4, qkv_features=d)(
          nn.LayerNorm()(x), mask=nn.make_causal_mask(x[..., 0]))
      x = x + h
      h = nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(nn.LayerNorm()(x))))
      return x + h

  class LM(nn.Module):

    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(vocab, d)(tokens) + self.param("pos", nn.initializers.normal(0.02),
                                                  (ctx, d))
      for _ in range(layers):
        x = Block()(x)
      return nn.Dense(vocab)(nn.LayerNorm()(x))

  model = LM()
  tokens = jax.random.randint(jax.random.key(1), (16, ctx), 0, vocab)
  params = model.init(jax.random.key(0), tokens)

  def loss(p, tok):
    logits = model.apply(p, tok)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]).mean()

  return params, tokens, loss


def train_step_cost(opt, params, tokens, loss, repeats):
  """(compile seconds, step seconds, XLA temp MiB) of the jitted train step."""
  state = opt.init(params)

  def step(p, s, tok):
    value, grads = jax.value_and_grad(loss)(p, tok)
    updates, s = opt.update(grads, s, p, value=value)
    return optax.apply_updates(p, updates), s, value

  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(params, state, tokens).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = mem.temp_size_in_bytes / 2**20 if mem is not None else float("nan")
  return compile_s, time_fn(compiled, params, state, tokens, repeats=repeats), temp


def print_header(before: str, *columns: str) -> None:
  """A Markdown table's header and separator rows."""
  print(f"{before}| {' | '.join(columns)} |")
  print("|" + "---|" * len(columns))


def transformer_table(layer_counts, repeats):
  import warnings  # pylint: disable=g-import-not-at-top
  print_header("\n", "layers", "leaves", "params", "compile adamw", "compile LO", "ratio",
               "step adamw", "step LO", "ratio", "temp adamw", "temp LO")
  for layers in layer_counts:
    params, tokens, loss = transformer_lm(layers)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      lo = metaopt.pretrained().as_optax(num_steps=1000)
      lo.init(params)  # role inference once, outside the timing
    # Interleaved: AdamW, LO, AdamW again; the AdamW numbers are the mean of both.
    a1 = train_step_cost(optax.adamw(1e-3), params, tokens, loss, repeats)
    b = train_step_cost(lo, params, tokens, loss, repeats)
    a2 = train_step_cost(optax.adamw(1e-3), params, tokens, loss, repeats)
    a = [(x + y) / 2 for x, y in zip(a1, a2)]
    n = sum(p.size for p in jax.tree.leaves(params))
    print(f"| {layers} | {len(jax.tree.leaves(params))} | {n:.2e} | {a[0]:.1f} s | "
          f"{b[0]:.1f} s | {b[0] / a[0]:.1f}x | {a[1] * 1e3:.0f} ms | {b[1] * 1e3:.0f} ms | "
          f"{b[1] / a[1]:.2f}x | {a[2]:.0f} MiB | {b[2]:.0f} MiB |", flush=True)


def muon_table(layer_counts, repeats, rounds):
  """Muon vs the LO with the orthogonalized candidate on/off, interleaved (see 5.)."""
  import warnings  # pylint: disable=g-import-not-at-top
  print(f"\nload before (uptime): {os.getloadavg()}")
  print_header("\n", "layers", "leaves", "params", "what", "adamw", "muon", "LO muon off",
               "LO muon on", "on / muon", "off / adamw")
  for layers in layer_counts:
    params, tokens, loss = transformer_lm(layers)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      lo_on = metaopt.LearnedOptimizer.random(
          jax.random.key(0), metaopt.LOConfig(muon=True, horizon_decay="linear"),
          output_scale=0.05)
      opts = {"adamw": optax.adamw(1e-3), "muon": metaopt.optimizers.muon(0.02),
              "off": metaopt.pretrained().as_optax(num_steps=1000),
              "on": lo_on.as_optax(num_steps=1000)}
      states = {k: o.init(params) for k, o in opts.items()}
    grads = jax.grad(loss)(params, tokens)
    programs = {}
    for k, opt in opts.items():
      def step(p, s, tok, opt=opt):
        value, g = jax.value_and_grad(loss)(p, tok)
        updates, s = opt.update(g, s, p, value=value)
        return optax.apply_updates(p, updates), s, value
      update = lambda g, s, p, opt=opt: opt.update(g, s, p, value=jnp.float32(1.0))
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        programs[k] = (jax.jit(step).lower(params, states[k], tokens).compile(),
                       jax.jit(update).lower(grads, states[k], params).compile())
    times = {(k, w): [] for k in opts for w in ("step", "update")}
    for _ in range(rounds):  # interleaved: every optimizer once per round
      for k, (step_fn, update_fn) in programs.items():
        times[k, "step"].append(np.median(timings(step_fn, (params, states[k], tokens),
                                                   repeats)))
        times[k, "update"].append(np.median(timings(update_fn, (grads, states[k], params),
                                                     repeats)))
    n = sum(p.size for p in jax.tree.leaves(params))
    for what in ("step", "update"):
      ms = {k: float(np.median(times[k, what])) * 1e3 for k in opts}
      # Ratios: the median of the per-round ratios (both timed within one round).
      ratio = lambda a, b: float(np.median(np.divide(times[a, what], times[b, what])))
      print(f"| {layers} | {len(jax.tree.leaves(params))} | {n:.2e} | {what} | "
            f"{ms['adamw']:.2f} ms | {ms['muon']:.2f} ms | {ms['off']:.2f} ms | "
            f"{ms['on']:.2f} ms | {ratio('on', 'muon'):.2f}x | "
            f"{ratio('off', 'adamw'):.2f}x |", flush=True)
  print(f"\nload after (uptime): {os.getloadavg()}")


def step_size_table(sizes, repeats, rounds):
  """The LO update with the step-size features off vs on, interleaved (see 6.)."""
  print(f"\nload before (uptime): {os.getloadavg()}")
  print_header("\n", "params", "LO update off", "LO update on", "on / off")
  off = metaopt.LearnedOptimizer.random(jax.random.key(0), output_scale=0.05)
  on = off.extended(step_size_features=True)
  rows = np.arange(off.config.num_features, on.config.num_features)  # the new rows
  on = on.with_theta({**on.theta, "w1": on.theta["w1"].at[rows].set(0.3)})
  for size in sizes:
    params = mlp_params(int(size))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    programs = {}
    for k, lo in (("off", off), ("on", on)):
      opt = lo.as_optax(num_steps=1000, sp=True)
      state = opt.init(params)
      update = jax.jit(lambda g, s, p, opt=opt: opt.update(g, s, p, value=jnp.float32(1.0)))
      programs[k] = (update.lower(grads, state, params).compile(), state)
    times = {k: [] for k in programs}
    for _ in range(rounds):  # interleaved: each once per round
      for k, (fn, state) in programs.items():
        jax.block_until_ready(fn(grads, state, params))
        times[k].append(np.median(timings(fn, (grads, state, params), repeats)))
    n = sum(p.size for p in jax.tree.leaves(params))
    ratio = float(np.median(np.divide(times["on"], times["off"])))
    print(f"| {n:.2e} | {np.median(times['off']) * 1e3:.2f} ms | "
          f"{np.median(times['on']) * 1e3:.2f} ms | {ratio:.3f}x |", flush=True)
  print(f"\nload after (uptime): {os.getloadavg()}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--transformers", type=int, nargs="*", default=[],
                      help="layer counts of the Flax transformer compile/step table")
  parser.add_argument("--muon", type=int, nargs="*", default=None,
                      help="layer counts of the Muon vs LO(muon on/off) table (only it runs)")
  parser.add_argument("--rounds", type=int, default=5,
                      help="interleaved timing rounds of the --muon and --step-size "
                      "tables")
  parser.add_argument("--step-size", action="store_true",
                      help="the LO update with the step-size features off vs on, at "
                      "--sizes (only it runs)")
  args = parser.parse_args()
  if args.step_size:
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    step_size_table(args.sizes, args.repeats, args.rounds)
    return
  if args.muon is not None:
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    muon_table(args.muon or [2], args.repeats, args.rounds)
    return
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
  print_header("", "params", "adam update", "LO update", "ratio", "adam state B/param",
               "LO state B/param")
  for size in args.sizes:
    params = mlp_params(int(size))
    n = sum(p.size for p in jax.tree.leaves(params))
    adam_s, adam_b = update_cost(optax.adam(1e-3), params, args.repeats)
    lo_s, lo_b = update_cost(lo_optimizer(), params, args.repeats)
    print(f"| {n:.2e} | {adam_s * 1e3:.3f} ms | {lo_s * 1e3:.3f} ms | {lo_s / adam_s:.1f}x "
          f"| {adam_b / n:.1f} | {lo_b / n:.1f} |")
  try:
    adam_s, name = lm_step_cost(optax.adam(1e-3), args.repeats)
    lo_s, _ = lm_step_cost(lo_optimizer(), args.repeats)
    print(f"\nwhole training step on {name} (batch from the task): adam {adam_s * 1e3:.2f} ms, "
          f"LO {lo_s * 1e3:.2f} ms, ratio {lo_s / adam_s:.2f}x")
  except (ImportError, IndexError) as e:
    print(f"(transformer LM step skipped: {e})")
  if args.transformers:
    transformer_table(args.transformers, max(3, args.repeats // 4))


if __name__ == "__main__":
  main()
