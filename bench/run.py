"""`make bench`: every claim of the library measured end to end in one run, beside its
baseline, then the report.

    python -m bench.run [--out DIR] [--full] [--sections ops dipgo ...] [-- PYTEST_ARGS for the ops]

(from the repository root: `bench` is a package).

Writes DIR (default bench/results/<UTC timestamp>/): environment.json, one JSON per section
(ops, dipgo, dipgo-learn, sdo, cache-dit, forecast-unet, gpu), report.md and the PNG plots
(`shortcut-kernels report DIR` rebuilds those two from the JSON). A section that fails
records its error in its JSON and the run goes on; the exit status is then 1.
Budgets are for the quick run on the 2-core CPU machine; the report shows each section's
wall time beside its budget.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from shortcut_kernels import report

from .sections import cache_dit, common, dipgo, dipgo_learn, forecast_unet, gpu, ops, sdo
from .sections.common import ROOT

# name: (runner(out_dir, full) -> dict, budget in seconds of the quick run on 2 CPU cores)
SECTIONS = {
    "ops": (ops.run, 150),
    "dipgo": (dipgo.run, 60),
    "dipgo-learn": (dipgo_learn.run, 300),
    "sdo": (sdo.run, 300),  # with the plain full baseline and best-of-N beside the curves
    "cache-dit": (cache_dit.run, 300),  # the cache-dit package beside our schedules on digits-dit
    "forecast-unet": (forecast_unet.run, 300),  # forecast reuse on digits-unet beside the DeepCache package
    "gpu": (gpu.run, gpu.BUDGET_S),  # GPU machines only (a CPU machine records a note)
}


def run_section(name: str, out_dir: Path, full: bool, pytest_args) -> bool:
    runner, budget = SECTIONS[name]
    limit = "FULL: no budget" if full else f"budget {budget} s" if budget else "no budget"
    print(f"\n=== {name} ({limit})", flush=True)
    t0 = time.perf_counter()
    try:
        doc = runner(out_dir, full, tuple(pytest_args)) if name == "ops" else runner(out_dir, full)
        ok = True
    except Exception:  # noqa: BLE001 - the other sections still run; the error goes in the JSON
        doc = {"error": traceback.format_exc()}
        print(doc["error"], file=sys.stderr, flush=True)
        ok = False
    wall = time.perf_counter() - t0
    doc = {"section": name, "full": full, "wall_s": wall, "budget_s": None if full else budget, **doc}
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str))
    print(f"=== {name}: {wall:.0f} s", flush=True)
    return ok


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="make bench: every claim measured in one run, then report.md and plots")
    p.add_argument("--out", default=None, help="output directory (default bench/results/<UTC timestamp>)")
    p.add_argument("--full", action="store_true", help="the long versions of every section")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing {out}", flush=True)
    (out / "environment.json").write_text(json.dumps(common.environment(a.full), indent=1))
    t0 = time.perf_counter()
    ok = [run_section(name, out, a.full, pytest_args) for name in a.sections]
    print(f"\nall sections: {time.perf_counter() - t0:.0f} s", flush=True)
    path = report.build(out)
    print(f"report: {path}", flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
