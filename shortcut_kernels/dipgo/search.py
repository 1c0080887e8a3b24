"""Learn a schedule by validated local search: move computed calls, keep what a bank confirms.

    sample = zoo_sampler("digits-unet", scheduler, n=30)      # training noise, seeds 10,000+
    start = skip_steps(model, 50, count=10, placement="power")
    result = local_search(start, sample)                      # same MACs, higher PSNR on the bank
    result.schedule.save("searched.json")

Why a search and not only the pruner's gradient: on the zoo models the straight-through gate
gradient ranks single decisions, while reusing one more call compounds through every later
call's cache; trained from a hand-made schedule, the gradient's swaps made it worse (see
docs/dipgo_learning.md). Here every candidate is sampled and kept only when it raises the PSNR
against the full model's samples of the same training noise.

A move swaps the rows of two calls a few steps apart (``radius``): a computed call moves
earlier or later, a partial row (e.g. DeepCache's shallow branch) moves with its pattern. The
MAC budget of the start schedule is never exceeded. The first improving move of a sweep is
taken; the search stops when a whole sweep finds none, or at ``max_evals`` / ``time_budget``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from .runtime import accelerate
from .schedule import Schedule

__all__ = ["local_search", "zoo_sampler", "SearchResult", "TRAIN_SEED"]

TRAIN_SEED = 10_000  # training noise; evaluation (dipgo.evaluate) uses seed 1234


@dataclass
class SearchResult:
    schedule: Schedule
    start_psnr: float           # dB against the full samples of the bank
    psnr: float
    evaluations: int
    seconds: float
    history: list = field(default_factory=list)  # one dict per accepted move


def zoo_sampler(name_or_model, scheduler=None, *, n: int = 30, calls: int = 50, guidance: float = 3.0,
                seed: int = TRAIN_SEED) -> Callable[[Schedule | None], Tensor]:
    """``sample(schedule) -> images`` for a zoo model: ``n`` images (labels 0..9 in turn) from
    the noise of ``seed``, through ``accelerate(model, schedule)``; ``sample(None)`` is the
    full model, sampled once and then reused."""
    from .. import zoo

    if isinstance(name_or_model, str):
        z = zoo.load(name_or_model)
        model, scheduler = z.model, scheduler or zoo.make_scheduler(z.scheduler_config)
    else:
        model = name_or_model
        if scheduler is None:
            raise ValueError("give the scheduler for a model passed as a module")
    labels = torch.arange(n) % 10
    full_samples: list[Tensor] = []  # the reference, sampled once: every caller asks for it first

    @torch.no_grad()
    def sample(schedule: Schedule | None) -> Tensor:
        if schedule is None:
            if not full_samples:
                full_samples.append(zoo.sample(model, scheduler, labels, steps=calls, guidance=guidance, seed=seed,
                                               progress=False))
            return full_samples[0]
        with accelerate(model, schedule, scheduler=scheduler, auto_resize=False):
            return zoo.sample(model, scheduler, labels, steps=calls, guidance=guidance, seed=seed, progress=False)

    return sample


def _psnr(x: Tensor, ref: Tensor) -> float:
    from ..zoo.metrics import psnr

    return psnr(x, ref)


def _swapped(s: Schedule, a: int, b: int) -> Schedule:
    keep = s.keep.clone()
    keep[[a, b]] = keep[[b, a]]
    return Schedule(keep, s.graph, name="searched", params={"start": s.params.get("start", s.name)},
                    sampler=s.sampler, steps=s.steps)


def local_search(start: Schedule, sample: Callable[[Schedule | None], Tensor], *, radius: int = 2,
                 min_gain: float = 0.02, max_evals: int | None = None, time_budget: float | None = None,
                 metric: Callable[[Tensor, Tensor], float] = _psnr, progress: bool = True) -> SearchResult:
    """Improve ``start`` (same MACs or fewer) by moving its rows; see the module docstring.

    sample: ``sample(schedule) -> images`` on training noise; ``sample(None)`` the full model
        (:func:`zoo_sampler` builds one for the zoo models).
    radius: a row may move up to this many calls.
    min_gain: a move must raise ``metric`` (PSNR in dB by default) by more than this.
    """
    if not isinstance(start, Schedule):
        raise TypeError(f"start must be a Schedule, got {type(start).__name__}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    t0 = time.perf_counter()
    ref = sample(None)
    best, best_score = start, metric(sample(start), ref)
    result = SearchResult(start, best_score, best_score, 1, 0.0)
    budget = start.macs_kept + 1e-9
    bar = tqdm(desc="schedule search", disable=not progress, unit="eval")

    def out_of_time() -> bool:
        return ((max_evals is not None and result.evaluations >= max_evals)
                or (time_budget is not None and time.perf_counter() - t0 >= time_budget))

    # sweep the calls cyclically from the last accepted move; stop after a sweep without one
    a, since_last = 1, 0
    while since_last < best.calls - 1 and not out_of_time():
        keep, accepted = best.keep, False
        for d in [d for r in range(1, radius + 1) for d in (-r, r)]:
            b = a + d
            if not 1 <= b < best.calls or torch.equal(keep[a], keep[b]):
                continue
            na, nb = int(keep[a].sum()), int(keep[b].sum())
            if nb > na or (nb == na and b < a):
                continue  # each pair once, from its busier row
            cand = _swapped(best, a, b)
            if cand.macs_kept > budget:
                continue
            score = metric(sample(cand), ref)
            result.evaluations += 1
            bar.update(1)
            if score > best_score + min_gain:
                best, best_score, accepted = cand, score, True
                result.history.append(dict(evaluations=result.evaluations, moved=(a, b), score=score,
                                           seconds=time.perf_counter() - t0))
                bar.set_postfix(psnr=f"{score:.2f}")
                break
            if out_of_time():
                break
        since_last = 0 if accepted else since_last + 1
        a = a % (best.calls - 1) + 1  # 1..calls-1: call 0 always computes everything
    bar.close()
    result.schedule, result.psnr = best, best_score
    result.seconds = time.perf_counter() - t0
    return result


def search(name_or_model, scheduler, target: float, *, calls: int = 50, bank: int = 30, guidance: float = 3.0,
           radius: int = 2, time_budget: float | None = None, progress: bool = True) -> SearchResult:
    """A zoo model's schedule keeping at most ``target`` of the MACs: score the hand-made
    schedules within that budget (the top 10% of it) on the training bank, then
    :func:`local_search` from the best of them. ``result.start_psnr`` is that start's PSNR."""
    from .evaluate import handmade

    if not 0 < target <= 1:
        raise ValueError(f"target is the kept-MAC fraction in (0, 1], got {target}")
    options = {k: s for k, s in handmade(name_or_model, calls).items() if s.macs_kept <= target + 1e-9}
    if not options:
        raise ValueError(f"no hand-made schedule keeps <= {target:.1%} of the MACs at {calls} calls")
    top = max(s.macs_kept for s in options.values())
    options = {k: s for k, s in options.items() if s.macs_kept >= 0.9 * top}
    sample = zoo_sampler(name_or_model, scheduler, n=bank, calls=calls, guidance=guidance)
    ref = sample(None)
    start = max(options.values(), key=lambda s: _psnr(sample(s), ref))
    return local_search(start, sample, radius=radius, time_budget=time_budget, progress=progress)
