"""Lowerings of the statistics pass's row sums, measured on the real pass (run by hand).

The statistics pass (``_statistics_pass``: ~16 feature terms, each summed per row of
the ``[rows, 128]`` flat buffer by one variadic ``lax.reduce``) is jitted with
``metaopt.lopt._engine.row_sums`` swapped for each alternative, on the inputs of
``benchmarks/update_passes.py``'s ``Setup`` (three real steps); all are timed in
interleaved rounds (per round the minimum of ``REP`` calls; medians over ``ROUNDS``).
Alternatives: ``stack_sum``/``stack_mid_sum`` (terms stacked, one ``jnp.sum``),
``separate`` (one ``jnp.sum`` per term), ``dot`` (stacked terms times a ones vector),
``lanes*`` (rows folded elementwise by slices to 16/8/1 lanes, then reduced),
``mid*`` (rows viewed as ``[rows, 128 / w, w]``, a variadic reduce over the middle axis,
then over ``w``), ``fold*`` (folded to ``w`` lanes, then ``mid``).

Usage: python benchmarks/row_sums_lowerings.py SIZES [VARIANTS]
  SIZES: comma-separated: 1e5 (step_cost's MLP tree), f4 (4 x (256x256 + 256), all
  flat), t6 (the 6-layer Flax transformer); VARIANTS: comma-separated names.
"""
import os, sys, warnings, time
# Runnable from a clone without `pip install -e .`: the repository root goes first on
# the import path, so the script imports this checkout's metaopt and tasks.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax, jax.numpy as jnp, numpy as np
from metaopt.lopt import _engine as E
import update_passes as P
from step_cost import mlp_params, timings, transformer_lm

ORIG = E.row_sums

def stack_sum(arrays):  # (a) one stacked [k, R, 128], jnp.sum over 128
  return tuple(jnp.sum(jnp.stack(arrays), axis=-1))

def stack_mid_sum(arrays):  # (a') [R, k, 128]
  return tuple(jnp.sum(jnp.stack(arrays, axis=-2), axis=-1).T)

def separate(arrays):
  return tuple(jnp.sum(a, axis=-1) for a in arrays)

def dot(arrays):  # (b) matmul with ones
  s = jnp.stack(arrays)
  return tuple(jax.lax.dot_general(s, jnp.ones([s.shape[-1]], s.dtype), (((2,), (0,)), ((), ())),
                                    precision=jax.lax.Precision.HIGHEST))

def _halve(a, lanes):
  while a.shape[-1] > lanes:
    w = a.shape[-1]; h = w // 2; lo = w - h
    hi = a[..., lo:]
    if lo != h:
      hi = jnp.pad(hi, [(0, 0)] * (a.ndim - 1) + [(0, 1)])
    a = a[..., :lo] + hi
  if a.shape[-1] < lanes:
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, lanes - a.shape[-1])])
  return a

def lanes16_concat(arrays):
  c = jnp.concatenate([_halve(a, 16) for a in arrays], axis=-1)
  c = c.reshape(c.shape[:-1] + (len(arrays), 16))
  return tuple(jnp.moveaxis(_halve(c, 1)[..., 0], -1, 0))

def lanes8_concat(arrays):
  c = jnp.concatenate([_halve(a, 8) for a in arrays], axis=-1)
  c = c.reshape(c.shape[:-1] + (len(arrays), 8))
  return tuple(jnp.moveaxis(jnp.sum(c, -1), -1, 0))

def lanes8_variadic(arrays):  # (d) elementwise halving to 8 lanes, then variadic reduce
  return ORIG([_halve(a, 8) for a in arrays])

def lanes8_sum(arrays):
  return tuple(jnp.sum(_halve(a, 8), axis=-1) for a in arrays)

def lanes8_stack(arrays):
  return tuple(jnp.sum(jnp.stack([_halve(a, 8) for a in arrays]), axis=-1))

def lanes16_variadic(arrays):
  return ORIG([_halve(a, 16) for a in arrays])

def lanes1(arrays):
  return tuple(_halve(a, 1)[..., 0] for a in arrays)

VARIANTS = dict(current=ORIG, stack_sum=stack_sum, stack_mid_sum=stack_mid_sum,
                separate=separate, dot=dot, lanes8_variadic=lanes8_variadic,
                lanes8_sum=lanes8_sum, lanes8_stack=lanes8_stack,
                lanes16_variadic=lanes16_variadic, lanes1=lanes1, lanes16_concat=lanes16_concat, lanes8_concat=lanes8_concat)

def main(size, repeats=int(os.environ.get("REP", 20)), rounds=int(os.environ.get("ROUNDS", 15)), only=None):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if isinstance(size, str) and size[0] == "f":
      tree = {f"w{i}": jnp.full((256, 256), 0.01) for i in range(int(size[1:]))}
      tree.update({f"b{i}": jnp.full((256,), 0.01) for i in range(int(size[1:]))})
    elif isinstance(size, str):
      tree = transformer_lm(int(size[1:]))[0]
    else:
      tree = mlp_params(int(size))
    s = P.Setup(tree)
  progs, ref = {}, None
  for name, fn in VARIANTS.items():
    if only and name not in only and name != "current":
      continue
    E.row_sums = fn
    t0 = time.perf_counter()
    c = jax.jit(s.statistics).lower(*s.stat_args).compile()
    ct = time.perf_counter() - t0
    out = np.asarray(c(*s.stat_args))
    if ref is None:
      ref = out
    err = float(np.max(np.abs(out - ref) / (np.abs(ref) + 1e-30)))
    progs[name] = dict(c=c, t=[], ct=ct, err=err)
  E.row_sums = ORIG
  for _ in range(rounds):
    for p in progs.values():
      p["t"].append(np.min(timings(p["c"], s.stat_args, repeats)))
  base = np.median(progs["current"]["t"])
  print(f"\n## size {size}, load {os.getloadavg()}")
  print("| variant | ms | x current | compile s | max rel diff |\n|---|---|---|---|---|")
  for n, p in progs.items():
    m = np.median(p["t"])
    print(f"| {n} | {m*1e3:.3f} | {m/base:.2f} | {p['ct']:.2f} | {p['err']:.1e} |", flush=True)


def _vreduce(arrays, axis):
  zeros = tuple(jnp.zeros([], a.dtype) for a in arrays)
  add = lambda acc, x: tuple(u + w for u, w in zip(acc, x))
  return jax.lax.reduce(tuple(arrays), zeros, add, (axis,))

def mid(lanes):
  def f(arrays):
    w = arrays[0].shape[-1]
    if w % lanes:
      return ORIG(arrays)
    parts = _vreduce([a.reshape(a.shape[:-1] + (w // lanes, lanes)) for a in arrays], arrays[0].ndim - 1)
    return ORIG(list(parts))
  return f

VARIANTS.update(mid8=mid(8), mid16=mid(16), mid32=mid(32), mid64=mid(64))


def fold_mid(width):
  def f(arrays):
    w = arrays[0].shape[-1]
    if w % width:
      return ORIG(arrays)
    parts = _vreduce([_halve(a, width).reshape(a.shape[:-1] + (2, width // 2)) for a in arrays], arrays[0].ndim - 1)
    return ORIG(list(parts))
  return f

VARIANTS.update(fold64=fold_mid(64), fold32=fold_mid(32), fold16=fold_mid(16))
if __name__ == "__main__":
  sizes = [x if x[0] in "tf" else float(x) for x in sys.argv[1].split(",")]
  only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
  for z in sizes:
    main(z, only=only)
