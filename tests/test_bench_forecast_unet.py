"""bench/sections/forecast_unet.py at a tiny setting (6 DDIM calls, one sample per digit from
fresh noise, a 2-sample bank, half a second of learning): the rows it reports, their MAC
shares, the DeepCache package's row against our equal schedule, the gains and the report."""
from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("DeepCache")

from bench.sections import forecast_unet as fu  # noqa: E402
from shortcut_kernels.report.forecast_unet import forecast_unet_part  # noqa: E402

CALLS = 6
TARGET = 0.5


@pytest.fixture(scope="module")
def run():
    from shortcut_kernels import zoo

    torch.set_num_threads(1)
    s = fu.Settings(calls=CALLS, targets=(TARGET,), per_class=1, seconds=0.5, bank=2, estimate_size=1, top=0.97,
                    seed=random.randrange(20_000, 30_000))
    z = zoo.load(fu.MODEL)
    held = fu.HeldOut(z.model, z.scheduler_config, s)
    doc = fu.measure(s, held)
    return doc, held, z.model


def test_rows_of_each_schedule_at_every_order_within_the_budget(run):
    doc, held, model = run
    (t,) = doc["targets"]
    assert t["target_macs"] == pytest.approx(fu.anchored(model, CALLS, TARGET))
    assert doc["full"]["psnr"] == math.inf and doc["samples"] == 10
    for name in ("handmade", "learned"):
        g = t["groups"][name]
        rows = [r for r in t["rows"] if r["group"] == name]
        assert [r["key"] for r in rows] == [g["key"], f"{g['key']} forecast1", f"{g['key']} forecast2"]
        assert [r["order"] for r in rows] == [0, 1, 2]
        for r in rows:
            assert r["macs_kept"] <= t["target_macs"] + 1e-9 and r["macs_kept"] == rows[0]["macs_kept"]
            assert 0 < r["psnr"] < math.inf and 0 < r["psnr_image_mean"] < math.inf
            assert 0 <= r["class_accuracy"] <= 1
    # the hand-made pick is the best on the bank of the candidates, all within the budget
    bank = t["handmade"]["bank_psnr"]
    assert t["handmade"]["pick"] == max(bank, key=bank.get) == t["groups"]["handmade"]["key"]
    cands = fu.handmade_candidates(model, CALLS, t["target_macs"], doc["settings"]["top"])
    assert set(bank) == set(cands) and all(c.macs_kept <= t["target_macs"] + 1e-9 for c in cands.values())
    # forecasting ran: the hand-made schedule's order-1 samples differ from its repeat samples
    k = t["groups"]["handmade"]["key"]
    hand = cands[k].with_forecast(1)
    if any(o for row in hand.forecast_orders for o in row):
        assert not torch.equal(held.images[k], held.images[f"{k} forecast1"])


def test_package_row_is_our_equal_deepcache(run):
    from shortcut_kernels.dipgo import deepcache
    from shortcut_kernels.zoo import metrics

    doc, held, model = run
    (t,) = doc["targets"]
    (p,) = t["packages"]
    equal = deepcache(model, CALLS, p["interval"], p["branch"])
    row = next(r for r in t["rows"] if r["kind"] == "package")
    ours = next(r for r in t["rows"] if r["key"] == p["equal_to"])
    assert ours["order"] == 0 and ours["group"] == row["group"] == p["group"]
    assert row["macs_kept"] == ours["macs_kept"] == pytest.approx(equal.macs_kept, abs=1e-12)
    a, b = held.images[row["key"]], held.images[ours["key"]]
    assert (a - b).abs().max().item() == pytest.approx(p["max_abs_diff_vs_equal"]) and p["max_abs_diff_vs_equal"] < 1e-4
    assert metrics.psnr(a, held.ref) == pytest.approx(metrics.psnr(b, held.ref), abs=1e-3)
    # the package really reused something: its samples are not the full model's
    assert row["psnr"] < math.inf


def test_gains_follow_from_the_rows(run):
    doc, _, _ = run
    (t,) = doc["targets"]
    for name, g in t["groups"].items():
        held = {r["order"]: r["psnr"] for r in t["rows"] if r["group"] == name and r["kind"] != "package"}
        if sorted(held) == [0]:  # the package's setting, repeat only (the quick run's parity row)
            assert g["kind"] == "package-equal" and "best_order" not in g and "improves" not in g
            continue
        assert sorted(held) == [0, 1, 2]
        best = max((1, 2), key=held.get)
        assert g["best_order"] == best and g["gain_db"] == pytest.approx(held[best] - held[0])
        assert g["improves"] == (held[best] > held[0])
        pick = max((1, 2), key=lambda o: g["bank"][o])
        assert g["bank_order"] == pick and g["gain_at_bank_order_db"] == pytest.approx(held[pick] - held[0])
    assert t["forecast_improves"] == {n: t["groups"][n]["improves"] for n in ("handmade", "learned")}
    assert doc["holds"] == all(t["forecast_improves"].values())


def test_report_part_lists_every_row(run):
    doc, _, _ = run
    text = "\n".join(forecast_unet_part({"section": "forecast-unet", **doc}))
    (t,) = doc["targets"]
    assert "### 50% of the MACs" in text
    for r in t["rows"]:
        assert f"`{r['key']}`" in text and f"{r['psnr']:.2f}" in text
    assert ("**holds**" in text) == doc["holds"]


@pytest.mark.parametrize("target", [0.3, 0.45, 0.6, 0.75])
def test_package_settings_are_the_nearest_on_each_side(target):
    from shortcut_kernels import zoo
    from shortcut_kernels.dipgo import deepcache

    model = zoo.load(fu.MODEL).model
    every = {(n, b): deepcache(model, CALLS, n, b).macs_kept for n in range(2, CALLS + 1) for b in range(9)}
    below, above = fu.package_settings(model, CALLS, target, rows=2)
    assert every[below] <= target < every[above]
    assert not any(every[below] < m <= target or target < m < every[above] for m in every.values())
    (nearest,) = fu.package_settings(model, CALLS, target, rows=1)
    assert nearest in (below, above)
    assert abs(every[nearest] - target) == min(abs(every[below] - target), abs(every[above] - target))
