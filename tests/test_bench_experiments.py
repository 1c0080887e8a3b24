"""The experiments (experiments/, run as ``python -m experiments.<name>``) on tiny settings: each
script's command line runs end to end and writes what its docs read."""
from __future__ import annotations

import json

import pytest

from bench.sections import sdo as sdo_section
from experiments import dipgo_efficiency, dipgo_learn_cost, learn_schedules, sdo_parts


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


def test_learn_transfer_part_compares_at_equal_macs(tmp_path, one_thread):
    """--part transfer on a tiny setting (8 DDIM calls learned, 4 DPM-Solver++ calls held out):
    the learned schedule is resized to the new calls and compared with hand-made schedules built
    there at its MACs (within 2%, or the nearest level above), the best picked per PSNR."""
    path = tmp_path / "transfer.json"
    doc = learn_schedules.main(["--part", "transfer", "--calls", "8", "--transfer-calls", "4", "--target", "0.402",
                                "--time-budget", "1", "--bank", "2", "--estimate-size", "1", "--per-class", "1",
                                "--out", str(path)])
    assert json.loads(path.read_text())["target_0.402"]["transfer"]["handmade_within"] == \
        doc["target_0.402"]["transfer"]["handmade_within"]
    learned, t = doc["target_0.402"]["learned"], doc["target_0.402"]["transfer"]
    assert len(learned["keep"]) == 8 and learned["macs_kept"] <= 0.402
    assert t["calls"] == 4 and len(t["keep"]) == 4 and t["scheduler"] == "DPMSolverMultistepScheduler"
    rows = {r["schedule"]: r for r in t["rows"]}
    m = rows["learned"]["macs_kept"]
    assert m == pytest.approx(t["macs_kept"]) and {r["n_samples"] for r in rows.values()} == {10}
    assert t["handmade_within"] and set(t["handmade_within"]) <= set(rows) - {"learned", "full"}
    hand = [rows[k]["macs_kept"] for k in t["handmade_within"]]
    if t["window_rule"] == "within 2%":
        assert all(abs(h - m) <= 0.02 * m for h in hand)
    else:
        assert t["window_rule"] == "nearest level above" and all(h >= m for h in hand)
    best = max(t["handmade_within"], key=lambda k: rows[k]["psnr_vs_full"])
    best_mean = max(t["handmade_within"], key=lambda k: rows[k]["psnr_image_mean"])
    assert rows[t["best_handmade"]]["psnr_vs_full"] == rows[best]["psnr_vs_full"]
    assert rows[t["best_handmade_image_mean"]]["psnr_image_mean"] == rows[best_mean]["psnr_image_mean"]
    assert t["gain_db"] == pytest.approx(rows["learned"]["psnr_vs_full"] - rows[best]["psnr_vs_full"])
    assert t["gain_db_image_mean"] == pytest.approx(rows["learned"]["psnr_image_mean"] - rows[best_mean]["psnr_image_mean"])
