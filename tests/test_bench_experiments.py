"""The experiments (experiments/, run as ``python -m experiments.<name>``) on tiny settings: each
script's command line runs end to end and writes what its docs read."""
from __future__ import annotations

import json

import pytest

from bench.sections import sdo as sdo_section
from experiments import dipgo_efficiency, dipgo_learn_cost, sdo_parts


@pytest.mark.slow
def test_dipgo_quick(tmp_path):
    """The zoo part of the DiP-GO efficiency and quality rows, quick (the full run:
    python -m experiments.dipgo_efficiency)."""
    out = tmp_path / "dipgo-quick.json"
    doc = dipgo_efficiency.main(["--quick", "--out", str(out)])
    assert doc["efficiency"] and doc["quality"]


@pytest.mark.slow
def test_dipgo_learn_quick(tmp_path):
    out = dipgo_learn_cost.main(["--quick", "--out", str(tmp_path / "learn.json")])
    assert all(r["ratio"] > 0 for r in out["cost"]) and out["quality"]["digits-unet"]["rows"]


@pytest.mark.slow
def test_sdo_quick(tmp_path):
    """fidelity, cost and memory on a short chain (the full measurements:
    `python -m experiments.sdo_parts --part ... --out FILE`)."""
    out = tmp_path / "sdo.json"
    assert sdo_parts.main(["--part", "fidelity", "cost", "memory", "--steps", "6", "--batch", "2", "--draws", "1",
                           "--rounds", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"fidelity", "cost", "memory"} <= set(record)


def test_adapter_merge_part_times_both_states(one_thread):
    args = sdo_section.settings(full=False)
    args.steps, args.batch, args.rounds, args.methods = 2, 2, 1, ["full", "per-sample"]
    rows = sdo_parts.part_adapter_merge(args)["rows"]
    assert rows["per-sample merged"]["iterations"] == rows["per-sample apart"]["iterations"] == 5
    assert rows["per-sample speedup"] > 0 and not any(k.startswith("full") for k in rows)
