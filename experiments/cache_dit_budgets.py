"""The cache-dit section's comparison at all five budgets of issue 28 (20, 30, 40, 50, 60% of the
block compute) on the quick run's sample count and settings grid, with a learned schedule at
every budget: what ``make bench FULL=1`` measures on 200 samples and the full grid, at a size one
CPU core runs in about half an hour. The code is the section's (``bench.sections.cache_dit``).

    python -m experiments.cache_dit_budgets --per-class 3 --learn-seconds 120 --out FILE
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench.sections import cache_dit as cd
from bench.sections.common import git_commit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=3, help="held-out samples per digit (default %(default)s)")
    ap.add_argument("--learn-seconds", type=float, default=120.0, help="learning seconds per budget")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(cd.FULL_BUDGETS))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    torch.set_num_threads(1)
    budgets = tuple(args.budgets)
    pl = cd.Plan(budgets, args.per_class, budgets, args.learn_seconds,
                 [f"quick grid at every budget: {10 * args.per_class} samples, one learned schedule per budget "
                  f"({args.learn_seconds:.0f} s)"], cost=None)
    t0 = time.perf_counter()
    doc = cd.measure(cd.Bench(cd.Protocol(per_class=args.per_class)), pl, full=False)
    doc = {"command": "python -m experiments.cache_dit_budgets " + " ".join(sys.argv[1:] if argv is None else argv), "commit": git_commit(),
           "section": "cache-dit", "full": False, "wall_s": time.perf_counter() - t0, **doc}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
