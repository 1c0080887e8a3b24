"""Ops section: the four fused ops against the eager composite and torch.compile of it
(bench/bench_<op>.py through pytest-benchmark; the rows of its JSON become ratios here).

On a CPU the quick run keeps the rows that back the claims: real UNet/DiT activation sizes,
fp32 and bf16, forward and forward+backward, providers eager / compile / ours. On a GPU it
also keeps the copy of the same bytes and the large size: the roofline (GB/s against a
copy measured in the same run). FULL runs every row.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict

import torch

from .common import ROOT

OP_FILES = ["bench/bench_cache_residual.py", "bench/bench_gated_blend.py", "bench/bench_gated_residual.py",
            "bench/bench_guided_step.py"]
# pytest -k terms (substrings of the test ids): the 512-element call-overhead rows and the
# large bandwidth rows (CPU: 4x..., GPU: 16x...) are left to FULL on a CPU.
_TINY = ["2x4x8x8", "2x16x16"]
_LARGE = ["1280x64x64", "4x4096x1152", "16x4096x1152"]
CPU_SELECTION = " and ".join(f"not {t}" for t in _TINY + _LARGE + ["copy", "cuda", "triton"])
GPU_SELECTION = " and ".join(f"not {t}" for t in _TINY)


def selection(full: bool) -> str | None:
    if full:
        return None
    return GPU_SELECTION if torch.cuda.is_available() else CPU_SELECTION


def percentile(data, q):
    data = sorted(data)
    if not data:
        return float("nan")
    k = (len(data) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def load_rows(paths) -> list[dict]:
    """The rows of pytest-benchmark JSON files (the bench_<op>.py cases), one call each: the
    median and p20-p80 over rounds of the time per call."""
    rows = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        for bench in doc["benchmarks"]:
            info = bench.get("extra_info", {})
            if "op" not in info:
                continue
            data = bench["stats"].get("data") or [bench["stats"]["median"]]
            data = [t / info.get("calls_per_round", 1) for t in data]  # round -> one call
            rows.append(dict(info, median_s=statistics.median(data), p20_s=percentile(data, 0.2),
                             p80_s=percentile(data, 0.8), rounds=len(data)))
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """Every ratio compares rows of the SAME run (same op, mode, size, dtype): speedup over the
    eager composite and over torch.compile, and achieved bandwidth as a share of a copy of the
    same bytes. Absolute numbers from shared machines are noisy; ratios much less so."""
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["mode"], r["size"], r["dtype"])][r["provider"]] = r
    for r in rows:
        same = groups[(r["op"], r["mode"], r["size"], r["dtype"])]
        r["gb_per_s"] = r["bytes"] / r["median_s"] / 1e9
        for base in ("eager", "compile"):
            r[f"speedup_vs_{base}"] = same[base]["median_s"] / r["median_s"] if base in same else None
        r["pct_of_copy"] = 100 * same["copy"]["median_s"] / r["median_s"] if "copy" in same else None
    return rows


def run(out_dir, full: bool = False, pytest_args: tuple[str, ...] = ()) -> dict:
    raw = out_dir / "ops-pytest-benchmark.json"
    cmd = [sys.executable, "-m", "pytest", *OP_FILES, "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={raw}", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
    chosen = selection(full)
    if chosen:
        cmd += ["-k", chosen]
    cmd += list(pytest_args)  # BENCH_ARGS: a later -k replaces ours
    print(" ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ)).returncode
    rows = add_ratios(load_rows([raw])) if raw.is_file() else []
    if rc not in (0, 5) or not rows:  # 5: nothing selected
        raise RuntimeError(f"the op benchmarks failed (pytest exit {rc}, {len(rows)} rows)")
    return {"device": "cuda" if torch.cuda.is_available() else "cpu", "selection": describe(full),
            "pytest_k": chosen, "pytest_args": list(pytest_args), "raw": raw.name, "rows": rows}


def describe(full: bool) -> str:
    if full:
        return "every row (all sizes, dtypes, modes and providers)"
    if torch.cuda.is_available():
        return "all but the 512-element call-overhead size (`make bench FULL=1` adds it)"
    return ("real UNet/DiT activation sizes, fp32 and bf16, forward and forward+backward, eager / compile / ours "
            "(`make bench FULL=1` adds the 512-element call-overhead size, the largest size and a copy of the "
            "same bytes)")
