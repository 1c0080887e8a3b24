"""bench/sections/cache_dit.py: compute is counted the same way for the cache-dit package and
for our runtime, on the zoo DiT at a tiny setting (10 DDIM calls, one sample per digit, fresh
noise): what the hooks count is checked against what each library says it computed."""
from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("cache_dit")

from bench.sections import cache_dit as cd  # noqa: E402
from shortcut_kernels.report.cache_dit import cache_dit_part  # noqa: E402
from shortcut_kernels.runtime import full, skip_steps  # noqa: E402

CALLS = 10
BLOCKS = 6


@pytest.fixture(scope="module")
def bench():
    torch.set_num_threads(1)
    b = cd.Bench(cd.Protocol(calls=CALLS, per_class=1, seed=random.randrange(20_000, 30_000)))
    row = b.full()
    assert row["compute"] == 1.0 and row["psnr"] == math.inf
    return b


def test_cache_dit_computing_everything_is_the_full_model(bench, fresh_seed):
    # threshold 0 never reuses: every block runs, the images are the full model's bit for bit
    rng = random.Random(fresh_seed)
    s = cd.CacheDiTSetting(Fn=rng.randint(1, 3), threshold=0.0, warmup=0, order=rng.randint(0, 2))
    row = bench.cache_dit(s)
    assert row["compute"] == 1.0 and row["macs"] == pytest.approx(1.0, abs=1e-12)
    assert row["cached_steps"] == [] and row["counts_agree"]
    assert row["psnr"] == math.inf and row["psnr_image_mean"] == math.inf


def test_cache_dit_static_mask_runs_only_the_first_blocks_at_cached_calls(bench, fresh_seed):
    rng = random.Random(fresh_seed)
    fn, k, lead = rng.randint(1, 3), rng.randint(2, CALLS - 2), rng.randint(1, 3)
    mask = cd.spread_mask(CALLS, k, lead)
    assert sum(mask) == k and mask[:min(lead, k)] == (1,) * min(lead, k)
    s = cd.CacheDiTSetting(Fn=fn, warmup=lead, order=rng.randint(0, 2), mask=mask, policy="static", mask_name="t")
    # hooks on the blocks themselves: a block cache-dit skips is not called at all
    row = bench.cache_dit(s, on_blocks=True)
    want = "".join(str(BLOCKS if m else fn) for m in mask)
    assert row["blocks_per_call"] == want
    assert row["cached_steps"] == [t for t, m in enumerate(mask) if not m] and row["counts_agree"]
    assert row["compute"] == pytest.approx((BLOCKS * k + fn * (CALLS - k)) / (BLOCKS * CALLS), abs=1e-15)
    assert 0 < row["psnr"] < math.inf
    # the same run counted on the blocks' attention (what the section counts) agrees
    assert bench.cache_dit(s)["blocks_per_call"] == want


def test_cache_dit_masks_as_our_schedules_compute_and_repeat_alike(bench, fresh_seed):
    # the same keep rows on our runtime: the same blocks run, and repeating each block's residual
    # (ours) gives the images of repeating their sum (cache-dit) up to rounding
    rng = random.Random(fresh_seed)
    fn, k = rng.randint(1, 2), rng.randint(2, CALLS - 3)
    s = cd.CacheDiTSetting(Fn=fn, warmup=1, mask=cd.spread_mask(CALLS, k, 1), policy="static", mask_name="lead1+even")
    ours = cd.mask_schedules(cd.Ours(), bench.model, [s], orders=(0,), fns=(fn,))
    (key, schedule), = ours.schedules.items()
    a, b = bench.cache_dit(s), bench.ours(key, schedule)
    assert a["blocks_per_call"] == b["blocks_per_call"] and a["compute"] == b["compute"]
    assert abs(a["psnr"] - b["psnr"]) < 0.05


def test_taylorseer_is_our_forecast_at_its_orders_with_its_second_derivative(bench, fresh_seed, monkeypatch):
    # cache-dit's TaylorSeer on a static mask = our forecast of the same keep rows at the orders
    # TaylorSeer runs call by call (taylorseer_orders) with its second derivative
    # (taylorseer_weights): the same images up to rounding
    if cd.forecast_orders() == (0,):
        pytest.skip("this runtime has no forecast reuse")
    from shortcut_kernels.runtime import forecast
    from shortcut_kernels.runtime.schedule import Schedule

    rng = random.Random(fresh_seed)
    fn, k, lead, order = rng.randint(1, 2), rng.randint(3, CALLS - 3), rng.randint(1, 4), rng.randint(1, 2)
    mask = cd.spread_mask(CALLS, k, lead)
    s = cd.CacheDiTSetting(Fn=fn, warmup=min(lead, k), order=order, mask=mask, policy="static", mask_name="t")
    keep = torch.zeros(CALLS, BLOCKS, dtype=torch.bool)
    keep[:, :fn] = True
    keep[[t for t, m in enumerate(mask) if m]] = True
    monkeypatch.setattr(forecast, "weights", cd.taylorseer_weights)
    ours = bench.ours("ts", Schedule(keep, bench.graph, forecast=cd.taylorseer_orders(mask, order, fn, BLOCKS)))
    theirs = bench.cache_dit(s)
    assert ours["blocks_per_call"] == theirs["blocks_per_call"]
    assert abs(ours["psnr"] - theirs["psnr"]) < 0.005
    assert abs(ours["psnr_image_mean"] - theirs["psnr_image_mean"]) < 0.005


def test_taylorseer_orders_start_at_call_three():
    # lead 4 then every other call: calls 0-2 give no derivative, call 3 a first, call 5 a second
    mask = (1, 1, 1, 1, 0, 1, 0, 1, 0, 0)
    two, one = cd.taylorseer_orders(mask, 2, 1, 3), cd.taylorseer_orders(mask, 1, 1, 3)
    assert two[:, 1].tolist() == [0, 0, 0, 0, 1, 0, 2, 0, 2, 2] and not two[:, 0].any()
    assert one[:, 2].tolist() == [0, 0, 0, 0, 1, 0, 1, 0, 1, 1]
    # full calls 0 and 1 only: no derivative ever (cache-dit repeats)
    assert not cd.taylorseer_orders((1, 1, 0, 0, 0), 2, 1, 3).any()
    # on even spacing TaylorSeer's second derivative is ours
    from shortcut_kernels.runtime.forecast import weights
    assert cd.taylorseer_weights(9, [7, 5, 3]) == pytest.approx(weights(9, [7, 5, 3]), abs=1e-12)
    assert cd.taylorseer_weights(9, [7, 4, 3]) != pytest.approx(weights(9, [7, 4, 3]), abs=1e-3)


def test_ours_counts_equal_the_schedule(bench, fresh_seed):
    rng = random.Random(fresh_seed)
    count = rng.randint(2, CALLS - 1)
    s = skip_steps(bench.model, CALLS, count=count, placement=rng.choice(["uniform", "power"]), granularity="fine")
    row = bench.ours("skip", s)  # raises if the blocks that ran are not the schedule's computed ones
    assert row["compute"] == count / CALLS
    assert row["macs"] == pytest.approx(s.macs_kept, rel=1e-12)
    assert 0 < row["psnr"] < math.inf
    every = bench.ours("full", full(bench.model, CALLS, granularity="fine"))
    assert every["compute"] == 1.0 and every["psnr"] == math.inf


def test_ours_forecast_rows_count_only_computed_blocks(bench):
    if cd.forecast_orders() == (0,):
        pytest.skip("this runtime has no forecast reuse")
    s = skip_steps(bench.model, CALLS, count=4, granularity="fine", forecast=1)
    row = bench.ours("skip forecast", s)
    assert row["compute"] == 4 / CALLS and 0 < row["psnr"] < math.inf


def test_forecast_cost_rows_time_the_order_two_calls_and_count_the_bytes(bench):
    """The forecast-cost part at one run per mode: the calls timed are those where every reused
    block forecasts at order 2 (full calls 0, 3, 6 of 9: calls 7 and 8), the bytes are p + 2
    block outputs per forecasting block (6 blocks reused by fora, 5 by the Fn-1 row), and the
    report renders the table. Timings are not checked: they are valid only on a quiet machine."""
    if cd.forecast_orders() == (0,):
        pytest.skip("this runtime has no forecast reuse")
    from shortcut_kernels.report.cache_dit import cost_lines

    cost = cd.forecast_cost(bench, cd.CostPlan(reps=1, copies=2))
    t = cost["tensor_bytes"]
    assert t == 4 * math.prod(cost["block_output_shape"]) and cost["block_output_shape"][0] == cost["batch_per_call"]
    assert [r["row"] for r in cost["rows"]] == ["fora(3)", "first1+every 3"]
    for r, reused in zip(cost["rows"], (6, 5)):
        assert r["calls_timed"] == [7, 8]
        for o in (1, 2):
            f = r[f"forecast{o}"]
            assert f["extrapolation_bytes"] == reused * (o + 2) * t
            # one pass over x and the run's caches either way: READ reads one per block, a
            # forecast o + 1, so it moves o per block more
            assert f["bytes_moved_beyond_read"] == reused * o * t
            assert len(f["times"]) == 1 and f["seconds"] > 0 and f["bound_s"] > r["read_s"] > 0
            assert f["copy_s_scaled"] == pytest.approx(r["copy_s"] * f["extrapolation_bytes"] / (2 * t))
            assert f["bytes_s"] > 0 and f["bound_s"] == pytest.approx(r["read_s"] + f["bytes_s"])
            assert f["over_bound"] == pytest.approx(f["seconds"] / f["bound_s"])  # one round: its own ratio
            assert f["holds"] == (f["over_bound"] <= 1.05)
    text = "\n".join(cost_lines(cost))
    assert "Forecast reuse, CPU cost" in text and "`first1+every 3`" in text and "7, 8" in text


def test_learned_starts_from_our_best_and_stays_within_the_budget(bench, monkeypatch):
    """The learned row: its start is the best of our schedules at the budget on the training
    bank (scored through the runtime, with their forecast), it learns at that budget's MACs with
    forecast orders to choose from, and ends no worse than the start on the bank, at no more
    block compute than the budget."""
    if cd.forecast_orders() == (0,):
        pytest.skip("this runtime has no forecast reuse")
    from shortcut_kernels.dipgo import learn as learn_mod

    seen = {}
    real = learn_mod.learn

    def recording(*args, **kwargs):
        seen.update(kwargs, target=args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(learn_mod, "learn", recording)
    candidates = {f"skip{o}": skip_steps(bench.model, CALLS, count=5, granularity="fine", forecast=o) for o in (0, 1)}
    candidates["too much"] = skip_steps(bench.model, CALLS, count=6, granularity="fine", forecast=1)
    res, key, scores = cd.learned(bench, 0.5, 4.0, candidates, bank_size=2)
    assert set(scores) == {"skip0", "skip1"} and key == max(scores, key=scores.get)
    assert res.start_psnr == pytest.approx(scores[key]) and res.psnr >= res.start_psnr
    assert seen["forecast"] == (0, 1, 2) and seen["start"] is candidates[key]
    assert seen["target"] == pytest.approx(cd._macs_at(bench, 0.5))
    assert cd.compute_share(res.schedule.keep) <= 0.5 + 1e-9


def test_pattern_table_takes_taylorseer_orders_from_their_own_or_an_equal_row(fresh_seed):
    from shortcut_kernels.report.cache_dit import pattern_lines

    rng = random.Random(fresh_seed)
    psnr = {k: round(rng.uniform(10, 50), 2) for k in ("cd0", "cd1", "cd2", "o0", "o1", "o2", "ts2")}
    setting = dict(policy="static", mask_name="lead4+even", Fn=1, mask="1111010")

    def cd_row(o):
        return dict(library="cache-dit", compute=0.5, psnr=psnr[f"cd{o}"], setting={**setting, "order": o})

    def our_row(key, params, same_as=()):
        return dict(library="ours", builder="cache-dit-mask", key=key, psnr=psnr[key], same_as=list(same_as),
                    params={"Fn": 1, "mask": "1111010", **params})

    rows = [cd_row(o) for o in (0, 1, 2)] + [
        our_row("o0", {}, same_as=["m forecast1 (TaylorSeer's orders)"]),  # TaylorSeer's order 1 never forecast
        our_row("o1", {"forecast": 1}), our_row("o2", {"forecast": 2}),
        our_row("ts2", {"forecast": 2, "orders": "taylorseer"})]
    last = pattern_lines({"rows": rows})[-1].strip("| ").split(" | ")
    assert last[2:] == [f"{psnr[k]:.2f}" for k in ("cd0", "cd1", "cd2", "o0", "o1", "o2", "o0", "ts2")]


@pytest.mark.parametrize("trial", range(20))
def test_most_full_calls_is_the_largest_that_fits(trial, fresh_seed):
    rng = random.Random(fresh_seed + trial)
    calls, fn, budget = rng.randint(5, 60), rng.randint(1, 3), rng.uniform(0.1, 1.0)

    def share(k):
        return (BLOCKS * k + fn * (calls - k)) / (BLOCKS * calls)

    k = cd.most_full_calls(calls, BLOCKS, fn, budget)
    if k == 0:
        assert share(1) > budget + cd.EPS
    else:
        assert share(k) <= budget + cd.EPS and (k == calls or share(k + 1) > budget + cd.EPS)


def test_bests_pick_each_library_best_at_no_more_compute(fresh_seed):
    rng = random.Random(fresh_seed)
    rows = [dict(library=rng.choice(["ours", "cache-dit"]), key=f"r{i}", compute=rng.uniform(0.1, 0.7),
                 macs=0.0, psnr=rng.uniform(10, 50), psnr_image_mean=0.0, class_accuracy=1.0, time_vs_full=None)
            for i in range(40)]
    for e in cd.bests(rows, (0.2, 0.4, 0.6), margin=1.0):
        for lib in ("ours", "cache-dit"):
            ok = [r for r in rows if r["library"] == lib and r["compute"] <= e["budget"]]
            if not ok:
                assert e[lib] is None
                continue
            assert e[lib]["compute"] <= e["budget"]
            assert e[lib]["psnr"] == max(r["psnr"] for r in ok)
        if e["ours"] and e["cache-dit"]:
            assert e["holds"] == (e["ours"]["psnr"] - e["cache-dit"]["psnr"] >= 1.0)


def test_section_end_to_end_at_a_tiny_setting(bench):
    """The section's measurement (quick grid) on 10 calls: every row counted, the bests and the
    report part."""
    doc = cd.measure(bench, cd.Plan(budgets=(0.2, 0.5), per_class=1), full=False)
    libs = {r["library"] for r in doc["rows"]}
    assert libs == {"full", "ours", "cache-dit"}
    assert all(r["counts_agree"] for r in doc["rows"] if r["library"] == "cache-dit")
    assert "deepcache" in doc["not_applicable"]
    assert [e["budget"] for e in doc["bests"]] == [0.2, 0.5]
    ours_20 = doc["bests"][0]["ours"]
    assert ours_20 is not None and ours_20["compute"] <= 0.2
    text = "\n".join(cache_dit_part({"section": "cache-dit", **doc}))
    assert f"`{ours_20['key']}`" in text and f"{ours_20['psnr']:.2f}" in text
    mirrors = [r for r in doc["rows"] if r.get("builder") == "cache-dit-mask"]
    assert mirrors and "The same blocks computed by both" in text
    for r in mirrors:
        assert any(c["library"] == "cache-dit" and c["blocks_per_call"] == r["blocks_per_call"] for c in doc["rows"])


def test_finalists_keep_the_best_rows_of_each_library_at_each_budget(fresh_seed):
    rng = random.Random(fresh_seed)
    rows = [dict(library=rng.choice(["ours", "cache-dit"]), key=f"r{i}", compute=rng.uniform(0.1, 0.7),
                 psnr=rng.uniform(10, 50)) for i in range(60)]
    budgets, count = (0.2, 0.4, 0.6), rng.randint(1, 4)
    keep = cd.finalists(rows, budgets, count)
    wanted = set()
    for b in budgets:
        for lib in ("ours", "cache-dit"):
            ok = sorted((r for r in rows if r["library"] == lib and r["compute"] <= b), key=lambda r: -r["psnr"])
            wanted.update((lib, r["key"]) for r in ok[:count])
    assert keep == wanted
    # the bests over the finalists are the bests over every row
    final = [r for r in rows if (r["library"], r["key"]) in keep]
    for r in rows:
        r.update(macs=0.0, psnr_image_mean=0.0, class_accuracy=1.0, time_vs_full=None)
    assert cd.bests(final, budgets) == cd.bests(rows, budgets)


def test_a_screened_section_measures_the_screens_best_rows_again(bench):
    """Screened on the same samples (the same noise), the finalists' rows are the screen's, and
    only the best of each library per budget run again."""
    doc = cd.measure(bench, cd.Plan(budgets=(0.2, 0.5), per_class=1, screen_per_class=1, finalists=1), full=False)
    screen = doc["screen"]["rows"]
    final = [r for r in doc["rows"] if r["library"] != "full"]
    assert len(final) < len(screen) - 1
    by_key = {(r["library"], r["key"]): r for r in screen}
    for r in final:
        assert r["psnr"] == by_key[(r["library"], r["key"])]["psnr"]
    def picked(bests):  # wall-clock aside
        return [(e["budget"], *((e[lib] or {}).get("key") for lib in ("ours", "cache-dit")),
                 *((e[lib] or {}).get("psnr") for lib in ("ours", "cache-dit"))) for e in bests]
    assert picked(doc["bests"]) == picked(cd.bests(screen, (0.2, 0.5)))
    text = "\n".join(cache_dit_part({"section": "cache-dit", **doc}))
    assert "Screened:" in text and "The same blocks computed by both" in text
