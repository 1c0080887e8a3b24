"""Records a GPU run of the test suite: `python -m shortcut_kernels.gpu_record JUNIT_XML...`.

`make test` runs it after pytest (with --junitxml); `make gpu` (bench/gpu_lease.sh) after the
GPU tests, with every JUnit file of the run. Without a CUDA GPU it records
nothing. With one it writes shortcut_kernels/gpu_validation.json: date, GPU, versions and
the result; `passed` needs every test to pass and the GPU tests to have run. Until such a
record is committed, `auto` keeps CUDA tensors on the torch reference
(backends.gpu_unvalidated_reason).
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .backends import GPU_RECORD


def summarise(*junit_xmls: str | Path) -> dict:
    """Test counts from pytest JUnit XML files; `gpu_passed`: passed tests with a GPU
    parameter (ids ending in -gpu, or marked by name)."""
    counts = dict(passed=0, failed=0, skipped=0, gpu_passed=0)
    cases = []
    for junit in junit_xmls:
        try:
            cases += ET.parse(junit).getroot().iter("testcase")
        except (OSError, ET.ParseError):  # a stage that wrote no results did not pass
            counts["failed"] += 1
            counts.setdefault("unreadable", []).append(str(junit))
    for case in cases:
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "failed"}.get(outcome, outcome)
        counts[key] += 1
        if key == "passed" and "gpu" in case.get("name", ""):
            counts["gpu_passed"] += 1
    return counts


def record(junit_xml: str | Path | list, path: Path = GPU_RECORD, selection: str | None = None) -> dict | None:
    """``selection``: what ran, when not the whole suite (e.g. the GPU tests of a lease)."""
    import torch

    if not torch.cuda.is_available():
        print("gpu_record: no CUDA GPU here, nothing recorded")
        return None
    files = junit_xml if isinstance(junit_xml, (list, tuple)) else [junit_xml]
    counts = summarise(*files)
    passed = counts["failed"] == 0 and counts["gpu_passed"] > 0
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001  a missing or broken triton is part of the record
        triton_version = None
    entry = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "commit": commit,
        "tests": counts,
        "selection": selection or "the whole suite",
        "result": "passed" if passed else "failed",
    }
    path.write_text(json.dumps(entry, indent=2) + "\n")
    print(f"gpu_record: {entry['result']} on {entry['gpu']} ({counts}), written to {path}")
    return entry


if __name__ == "__main__":
    args = sys.argv[1:]
    selection = None
    if "--selection" in args:
        i = args.index("--selection")
        selection = args[i + 1]
        del args[i:i + 2]
    if not args:
        sys.exit(__doc__)
    record(args, selection=selection)
