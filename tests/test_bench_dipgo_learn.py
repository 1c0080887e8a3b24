"""The `make bench` learning section (bench/sections/dipgo_learn.py) on tiny settings: it runs end
to end, compares learn, search, STE and the hand-made schedules at equal MACs, counts the cost
of an iteration, and the report renders it; the MAC counter counts what the model computes."""
from __future__ import annotations

import pytest
import torch

from bench.sections import dipgo_learn as section
from shortcut_kernels import zoo
from shortcut_kernels.dipgo import accelerate, deepcache, skip_steps
from shortcut_kernels.dipgo.search import with_trades
from shortcut_kernels.report.tables import _estimate_quality, learn_part
from shortcut_kernels.runtime.schedule import graph_of


@pytest.fixture(scope="module")
def unet():
    return zoo.load("digits-unet")


def test_counter_counts_the_kept_macs_and_the_backward(unet, one_thread):
    model = unet.model
    s = zoo.make_scheduler(unet.scheduler_config)
    s.set_timesteps(6)
    calls = [0] + sorted(torch.randperm(5)[:2].add(1).tolist())
    sch = skip_steps(model, 6, compute=calls)
    c = section.MacCounter(model)
    n = int(torch.randint(1, 4, ()))
    # a guided call on one sample is 2 equivalents; reused blocks compute nothing (on the fine
    # graph the runtime still calls a reused block, which runs none of its layers)
    for sch in (sch, with_trades(model, sch)[0], deepcache(model, 6, 3, 1)):
        before = c.total
        with c, torch.no_grad(), accelerate(model, sch, scheduler=s):
            zoo.sample(model, s, labels=list(range(n)), steps=6, progress=False)
        assert c.total - before == pytest.approx(2 * n * 6 * sch.macs_kept, rel=1e-9) and c.backward == 0
    outside = c.total
    model(torch.randn(2, 1, 16, 16), torch.tensor(5), torch.tensor([1, 2]))  # not counted: inactive
    assert c.total == outside
    x = torch.randn(1, 1, 16, 16, requires_grad=True)
    with c:
        model(x, torch.tensor(5), torch.tensor([3])).sum().backward()
    assert c.forward / c.unit == pytest.approx(outside + 1, rel=1e-9)
    g = graph_of(model, "fine")  # every block, twice its forward; the overhead has no backward
    assert c.backward == pytest.approx(2 * (g.total_macs - g.overhead_macs), rel=1e-9)
    c.remove()


def test_section_runs_and_the_report_renders_it(one_thread):
    # whole-call units only: the learned schedule keeps its start's MACs unless a drop helps
    s = section.Settings(calls=8, targets=(0.5,), seconds=4.0, bank=2, estimate_size=1, per_class=1,
                         timing_reps=1, extra=dict(max_validations=4, patterns=False))
    doc = section.run(full=False, s=s)
    q = {r["schedule"]: r for r in doc["quality"]}
    assert {doc["learned"], doc["searched"], doc["ste"], "full"} <= set(q)
    assert doc["handmade_best"] in doc["handmade_within"] and doc["handmade_best"] in q
    m = q[doc["learned"]]["macs_kept"]
    for k in doc["handmade_within"]:  # every hand-made schedule within 2% was evaluated
        assert abs(q[k]["macs_kept"] - m) <= section.EQUAL_MACS * m
    assert m * (1 - 0.01) - 1e-9 <= q[doc["ste"]]["macs_kept"] <= m + 1e-9  # STE is read at the learned MACs
    assert set(doc["cost"]) == {"learn", "search", "ste-exact", "ste-shortcut"}
    assert all(doc["cost"][k]["per_iteration"] > 0 for k in doc["cost"])
    # exact STE keeps every call's graph: it costs more per iteration than the shortcut
    assert doc["cost"]["ste-exact"]["per_iteration"] > doc["cost"]["ste-shortcut"]["per_iteration"]
    assert doc["learn"]["history"][0]["seconds"] == 0 and doc["train"]["history"]
    assert set(doc["samples"]) >= {"full", doc["learned"]} and doc["timing"]
    md = "\n".join(learn_part({"section": "dipgo-learn", "wall_s": 1.0, "budget_s": 300, **doc}, set()))
    for k in (doc["learned"], doc["searched"], doc["ste"], doc["handmade_best"]):
        assert f"| {k} |" in md
    assert f"{q[doc['learned']]['psnr_image_mean']:.2f}" in md and f"{q[doc['ste']]['psnr_vs_full']:.2f}" in md
    assert f"{doc['cost']['ste-exact']['per_iteration']:.0f}" in md


def test_spearman_is_the_rank_correlation():
    a = torch.randn(12).tolist()
    assert section.spearman(a, [3 * x + 1 for x in a]) == pytest.approx(1.0)
    assert section.spearman(a, [-x ** 3 for x in a]) == pytest.approx(-1.0)
    b = torch.randn(12).tolist()
    ra, rb = torch.tensor(a).argsort().argsort().double(), torch.tensor(b).argsort().argsort().double()
    n = len(a)
    assert section.spearman(a, b) == pytest.approx(1 - 6 * float(((ra - rb) ** 2).sum()) / (n * (n * n - 1)), abs=1e-6)


def test_estimate_quality_measures_every_whole_call_flip_and_the_report_shows_it(unet, one_thread):
    from shortcut_kernels.dipgo.learn import _null_label, bank_loss, make_bank
    from shortcut_kernels.dipgo.gated_chain import _Chain
    from shortcut_kernels.dipgo.supernet import SuperNet
    from shortcut_kernels.runtime.schedule import Schedule

    s = zoo.make_scheduler(unet.scheduler_config)
    s.set_timesteps(8)
    q = section.estimate_quality(unet.model, s, 2, count=4)
    assert sorted(f["call"] for f in q["flips"]) == list(range(1, 8))  # one flip per call after call 0
    assert set(q["spearman"]) == set(section.ESTIMATORS) == set(q["seconds"])
    # a measured effect is the bank loss of the flipped schedule minus the start's
    start = skip_steps(unet.model, 8, count=4, placement="power", exponent=1.5)
    f = q["flips"][int(torch.randint(len(q["flips"]), ()))]
    keep = start.keep.clone()
    keep[f["call"]] = ~keep[f["call"]]
    net = SuperNet(unet.model, graph=start.graph)
    chain = _Chain(net, s, 3.0, _null_label(unet.model))
    bank = make_bank(unet.model, s, 2)
    assert f["measured"] == pytest.approx(bank_loss(chain, bank, Schedule(keep, start.graph)) - q["loss"], rel=1e-6)
    net.remove()
    md = "\n".join(_estimate_quality(q))
    assert f"{q['spearman']['shortcut']['drops']:.2f}" in md and f"{q['spearman']['ste']['adds']:.2f}" in md
