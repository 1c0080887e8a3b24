"""Ops section: the four fused ops against the eager composite and torch.compile of it
(bench/bench_<op>.py through pytest-benchmark; bench/report.py turns the rows into ratios).

On a CPU the quick run keeps the rows that back the claims: real UNet/DiT activation sizes,
fp32 and bf16, forward and forward+backward, providers eager / compile / ours. On a GPU it
also keeps the copy of the same bytes and the large size: the roofline (GB/s against a
copy measured in the same run). FULL runs every row.
"""
from __future__ import annotations

import os
import subprocess
import sys

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


def run(out_dir, full: bool = False, pytest_args: tuple[str, ...] = ()) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from report import add_ratios, load_rows  # bench/report.py

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
