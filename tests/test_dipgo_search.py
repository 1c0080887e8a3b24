"""Schedule search (shortcut_kernels.dipgo.search): moves keep the MAC budget, the result is
never worse than the start on the bank, and a known optimum is found."""
import subprocess
import sys

import pytest
import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo import deepcache, skip_steps
from shortcut_kernels.runtime.schedule import graph_of
from shortcut_kernels.dipgo.evaluate import handmade
from shortcut_kernels.dipgo.search import branch_patterns, local_search, psnr, search, whole_calls_on
from shortcut_kernels.zoo import dipgo_eval
from shortcut_kernels.zoo.dipgo_eval import zoo_sampler

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)


@pytest.fixture(scope="module")
def unet():
    return zoo.load("digits-unet").model


def _distance_sampler(target: list[int]):
    """A fake sampler: the 'image' error grows with the distance of the computed calls from
    ``target`` (sorted, matched in order), so the optimum is known."""
    def sample(schedule):
        if schedule is None:
            return torch.zeros(2, 1, 4, 4)
        comp = schedule.computed_calls()
        err = sum(abs(a - b) for a, b in zip(comp, target)) + 1
        return torch.full((2, 1, 4, 4), 0.01 * err)
    return sample


@pytest.mark.parametrize("radius", [1, 3])
def test_search_finds_the_known_optimum_and_keeps_the_budget(unet, radius):
    start = skip_steps(unet, 16, compute=[0, 1, 2, 3])
    target = [0, 5, 9, 14]
    res = local_search(start, _distance_sampler(target), radius=radius, progress=False)
    assert res.schedule.computed_calls() == target
    assert res.schedule.macs_kept <= start.macs_kept + 1e-12
    assert res.psnr > res.start_psnr
    assert [h["score"] for h in res.history] == sorted(h["score"] for h in res.history)


def test_trades_give_a_whole_call_to_partial_rows_when_that_helps(unet):
    fine = graph_of(unet, "fine")
    patterns = branch_patterns(fine)
    assert patterns and patterns[0] == [len(fine) - 1]  # DeepCache's cheapest branch: the last up block
    assert all(fine.macs_kept([b in p for b in range(len(fine))]) <= 0.5 * fine.total_macs for p in patterns)
    assert branch_patterns(graph_of(unet, "coarse")) == []
    start = whole_calls_on(skip_steps(unet, 16, compute=[0, 4, 8, 12]), fine)
    assert start.granularity == "fine" and start.computed_calls() == [0, 4, 8, 12]

    def sample(schedule):  # the error falls with the number of calls that compute anything
        if schedule is None:
            return torch.zeros(2, 1, 4, 4)
        busy = int(schedule.keep.any(1).sum())
        return torch.full((2, 1, 4, 4), 0.1 / busy)

    res = local_search(start, sample, radius=1, patterns=patterns[:1], progress=False)
    assert res.psnr > res.start_psnr and res.schedule.macs_kept <= start.macs_kept + 1e-12
    traded = [h for h in res.history if "traded" in h]
    assert traded and traded[0]["pattern"] == patterns[0]
    whole = [c for c in range(16) if bool(res.schedule.keep[c].all())]
    partial = [c for c in range(16) if bool(res.schedule.keep[c].any()) and c not in whole]
    assert len(whole) < 4 and partial  # a computed call became partial rows
    assert all(res.schedule.keep[c].nonzero().flatten().tolist() == patterns[0] for c in partial)
    with pytest.raises(ValueError, match="whole-call"):
        whole_calls_on(deepcache(unet, 12, 3, 0), fine)


def test_search_stops_at_max_evals_and_moves_partial_rows(unet):
    start = deepcache(unet, 12, 3, 0)
    rng = torch.Generator().manual_seed(0)
    noise = {}

    def sample(schedule):  # a random landscape: only the bookkeeping is checked
        key = None if schedule is None else tuple(schedule.keep.flatten().tolist())
        if key not in noise:
            noise[key] = torch.rand(2, 1, 4, 4, generator=rng)
        return noise[key]

    res = local_search(start, sample, radius=2, max_evals=7, progress=False)
    assert res.evaluations <= 7 + 1
    assert res.schedule.macs_kept <= start.macs_kept + 1e-12
    assert res.psnr >= res.start_psnr
    # rows are swapped, never created: the multiset of row patterns is the start's
    rows = sorted(tuple(r.tolist()) for r in res.schedule.keep)
    assert rows == sorted(tuple(r.tolist()) for r in start.keep)


def test_search_on_the_zoo_model_never_returns_a_worse_schedule(unet):
    sched = zoo.make_scheduler(zoo.info("digits-unet")["scheduler_config"])
    sample = zoo_sampler(unet, sched, n=4, calls=8)
    start = skip_steps(unet, 8, count=3)
    res = local_search(start, sample, radius=1, max_evals=6, progress=False)
    ref = sample(None)
    assert res.psnr == pytest.approx(zoo.metrics.psnr(sample(res.schedule), ref))
    assert res.psnr >= res.start_psnr
    assert res.schedule.macs_kept <= start.macs_kept + 1e-12


def test_bad_arguments_are_named(unet):
    with pytest.raises(TypeError, match="start"):
        local_search("skip", _distance_sampler([0]))
    with pytest.raises(ValueError, match="radius"):
        local_search(skip_steps(unet, 8, count=2), _distance_sampler([0, 4]), radius=0)
    with pytest.raises(ValueError, match="scheduler"):
        zoo_sampler(unet)


def test_zoo_sampler_samples_the_full_model_once(unet, monkeypatch):
    sched = zoo.make_scheduler(zoo.info("digits-unet")["scheduler_config"])
    sample = zoo_sampler(unet, sched, n=2, calls=3)
    calls = []
    real = dipgo_eval.sample
    monkeypatch.setattr(dipgo_eval, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = sample(None)
    assert sample(None) is first and len(calls) == 1
    sample(skip_steps(unet, 3, count=2))
    assert len(calls) == 2


def test_the_default_metric_is_the_zoo_psnr():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    x = (ref + 0.05 * torch.randn(3, 1, 16, 16, generator=g)).clamp(-1, 1)
    assert psnr(x, ref) == pytest.approx(zoo.metrics.psnr(x, ref))
    assert psnr(ref, ref) == float("inf")


def test_search_starts_from_the_best_handmade_within_the_target(unet):
    def sample(schedule):  # more kept MACs, less error: the start is the costliest option
        if schedule is None:
            return torch.zeros(2, 1, 4, 4)
        return torch.full((2, 1, 4, 4), 1.0 - schedule.macs_kept)

    res = search(unet, sample, 0.5, calls=8, trades=False, progress=False)
    options = [s.macs_kept for s in handmade(unet, 8).values() if s.macs_kept <= 0.5 + 1e-9]
    assert res.schedule.macs_kept <= 0.5 + 1e-9
    assert res.start_psnr == pytest.approx(psnr(sample(None) + 1.0 - max(options), sample(None)))
    assert res.psnr >= res.start_psnr
    with pytest.raises(TypeError, match="sample"):
        search(unet, None, 0.5, calls=8)
    with pytest.raises(TypeError, match="dipgo_eval.handmade"):
        handmade("digits-unet", 8)
    assert dipgo_eval.handmade("digits-unet", 8).keys() == handmade(unet, 8).keys()


def test_the_library_does_not_import_the_zoo():
    code = ("import sys, shortcut_kernels.dipgo, shortcut_kernels.dipgo.search, shortcut_kernels.dipgo.evaluate, "
            "shortcut_kernels.sdo.rewards; print(sorted(m for m in sys.modules if m.startswith('shortcut_kernels.zoo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
