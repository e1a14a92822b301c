"""Writes the learned optimizer that equals the Muon anchor (``metaopt.anchors``) as an
artifact: the 0.3.0 prior (``--mup``: its muP variant, weighed against it).

  python benchmarks/ablations/build_prior.py runs/prior_030 [--mup] [--lr 0.03]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run from a clone

from metaopt import anchors  # pylint: disable=wrong-import-position
from metaopt import checkpoint  # pylint: disable=wrong-import-position


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("out")
  p.add_argument("--mup", action="store_true", help="hidden updates also scaled by muP")
  p.add_argument("--lr", type=float, default=anchors.MUON_LR, help="peak learning rate")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  lo = anchors.learned_prior(args.lr, mup=args.mup)
  path = checkpoint.save(lo, args.out, overwrite=args.overwrite, meta_training={
      "method": "none: the Muon anchor in closed form (metaopt.anchors.learned_prior)",
      "anchor": {"optimizer": "optax.contrib.muon", "peak_learning_rate": args.lr,
                 "schedule": "warmup_cosine", "warmup_fraction": anchors.WARMUP_FRACTION,
                 "muon_matrices": anchors.MUON_MATRICES, "mup": args.mup}})
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
