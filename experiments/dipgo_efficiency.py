"""DiP-GO runtime measurements: full model vs. schedules, wall-clock against the MAC-ideal,
and the quality of every hand-made schedule; the `dipgo` section's code
(bench.sections.dipgo) with every setting on the command line.

    python -m experiments.dipgo_efficiency [--part efficiency|quality|all] [--quick]
        [--models zoo dit-xl-2 sd-1.5] [--reps N] [--out bench/results/dipgo.json]

``make bench`` runs the zoo part of the efficiency rows (FULL: every model and the quality
rows). Timing runs should hold the machine: wrap in ``flock /tmp/sk_heavy.lock`` on shared boxes.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import diffusers
import torch

from bench.sections.dipgo import diffusers_cache_support, efficiency, quality

ROOT = Path(__file__).resolve().parents[1]


def environment():
    return dict(torch=torch.__version__, diffusers=diffusers.__version__, python=platform.python_version(),
                machine=platform.machine(), threads=torch.get_num_threads(),
                device="cuda" if torch.cuda.is_available() else "cpu",
                diffusers_cache_hooks=diffusers_cache_support())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["efficiency", "quality", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="zoo models only, 2 reps, few samples")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dipgo.json"))
    p.add_argument("--models", nargs="+", default=["zoo", "dit-xl-2", "sd-1.5"],
                   choices=["zoo", "dit-xl-2", "sd-1.5"], help="efficiency: which models")
    p.add_argument("--reps", type=int, default=None,
                   help="efficiency: interleaved runs per provider (default 5; more on a noisy machine)")
    a = p.parse_args(argv)
    doc = {"environment": environment(), "quick": a.quick}
    print(json.dumps(doc["environment"]["diffusers_cache_hooks"]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def sink(rows, key="efficiency"):
        doc[key] = rows
        out.write_text(json.dumps(doc, indent=1))

    if a.part in ("efficiency", "all"):
        sink(efficiency(a.quick, sink, tuple(a.models), a.reps))
    if a.part in ("quality", "all"):
        sink(quality(a.quick), "quality")
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
