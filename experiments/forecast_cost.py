"""The cache-dit section's forecast-cost rows alone (issue 28, must hold 3): on ``digits-dit``,
the per-call CPU cost of forecast reuse (orders 1 and 2) against ``READ`` plus the time of
moving the extrapolation's bytes, in one process (``bench.sections.cache_dit.forecast_cost``).
Valid only on a quiet machine: run it with nothing else on the cores.

    python -m experiments.forecast_cost --reps 9 --out FILE
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.sections import cache_dit as cd
from bench.sections.common import git_commit


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9, help="interleaved runs of each reuse mode")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cost = cd.forecast_cost(cd.Bench(cd.Protocol(per_class=1)), cd.CostPlan(reps=args.reps))
    doc = {"command": "python -m experiments.forecast_cost " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": git_commit(), **cost}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
