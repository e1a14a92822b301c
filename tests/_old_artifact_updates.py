"""The updates the released artifacts give on a fixed small problem (shared by
tests/test_lopt_muon.py and the script that wrote tests/data/released_lo_updates.npz)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np

import metaopt

NUM_STEPS = 6


# The artifacts released before the orthogonalized-momentum switch, by the name their
# updates carry in tests/data/released_lo_updates.npz (written when 0.2.0 was "default").
BEFORE_MUON = {"v0.2.0": "default", "sp": "sp"}


def released_updates(name: str, key: str | None = None) -> dict:
  """{f"{key}/{step}/{path}": update} for NUM_STEPS steps of ``metaopt.pretrained(name)``
  (``key`` defaults to ``name``)."""
  lo = metaopt.pretrained(name)
  rng = np.random.default_rng(0)
  shapes = {"embed": (11, 8), "conv": (3, 3, 2, 8), "hidden": (8, 16), "bias": (16,),
            "head": (16, 5)}
  params = {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
            for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
           for _ in range(NUM_STEPS)]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = lo.as_optax(num_steps=20)
    state = opt.init(params)
  step = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value=v))
  out = {}
  for t in range(NUM_STEPS):
    updates, state = step(grads[t], state, params, jnp.float32(1.0 / (t + 1)))
    params = jax.tree.map(jnp.add, params, updates)
    for k, u in updates.items():
      out[f"{key or name}/{t}/{k}"] = np.asarray(u)
  return out


if __name__ == "__main__":
  import sys
  data = {}
  for artifact, key in BEFORE_MUON.items():
    data.update(released_updates(artifact, key))
  np.savez(sys.argv[1], **data)
  print(sorted(data)[:3], len(data))
