"""The `make bench` sections hand bench_sdo's part functions a namespace of their own: every
attribute those parts read must be in it (FULL=1 runs the LoRA part, which no quick run reaches)."""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_sdo  # noqa: E402
from sections import sdo as sdo_section  # noqa: E402


def test_full_sdo_settings_run_the_finetune_part(one_thread):
    args = sdo_section.settings(full=True)
    args.steps, args.batch, args.ft_iters, args.eval_every = 2, 2, 1, 1
    args.methods = ["full", "per-sample+deepcache:2"]
    out = bench_sdo.part_finetune(args)
    assert [r["method"] for r in out["runs"]] == ["full", "per-sample+deepcache:2"]
    assert out["runs"][1]["chain_macs_kept"] < 1.0 and set(out["best"]) == {"full", "per-sample+deepcache:2"}


def test_adapter_merge_part_times_both_states(one_thread):
    args = sdo_section.settings(full=False)
    args.steps, args.batch, args.rounds, args.methods = 2, 2, 1, ["full", "per-sample"]
    rows = bench_sdo.part_adapter_merge(args)["rows"]
    assert rows["per-sample merged"]["iterations"] == rows["per-sample apart"]["iterations"] == 5
    assert rows["per-sample speedup"] > 0 and not any(k.startswith("full") for k in rows)
