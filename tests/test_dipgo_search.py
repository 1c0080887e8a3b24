"""Schedule search (shortcut_kernels.dipgo.search): moves keep the MAC budget, the result is
never worse than the start on the bank, and a known optimum is found."""
import pytest
import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo import skip_steps
from shortcut_kernels.dipgo.schedule import deepcache
from shortcut_kernels.dipgo.search import local_search, zoo_sampler

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
    real = zoo.sample
    monkeypatch.setattr(zoo, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = sample(None)
    assert sample(None) is first and len(calls) == 1
    sample(skip_steps(unet, 3, count=2))
    assert len(calls) == 2
