"""Learn a schedule by validated local search: move computed calls, keep what a bank confirms.

    start = skip_steps(model, 50, count=10, placement="power")
    result = local_search(start, sample)      # same MACs, higher PSNR on the bank
    result.schedule.save("searched.json")

``sample(schedule) -> images`` samples a fixed bank of training noise through the model
accelerated by ``schedule`` (``with accelerate(model, schedule): ...``); ``sample(None)`` is
the full model, the reference every candidate is scored against (``metric``, PSNR by
default).

Why a search and not only the pruner's gradient: the straight-through gate gradient ranks
single decisions, while reusing one more call compounds through every later call's cache, so
a swap the gradient favours can lower the quality. Here every candidate is sampled and kept
only when it raises the metric against the full model's samples of the same training noise.

A move swaps the rows of two calls a few steps apart (``radius``): a computed call moves
earlier or later, a partial row (e.g. DeepCache's shallow branch) moves with its pattern. The
MAC budget of the start schedule is never exceeded. The first improving move of a sweep is
taken. When a whole sweep finds none, the search tries *trades* (given ``patterns``, the
partial rows of a UNet's DeepCache branches, :func:`branch_patterns`): one computed call
gives its MACs to partial rows of a pattern placed just after the computed calls; the best
trade that helps is taken and the sweeps go on. The search stops when neither helps, or at
``max_evals`` / ``time_budget``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ..models.deepcache import num_skips
from ..runtime.builders import deepcache
from .evaluate import handmade
from ..runtime.schedule import Schedule, graph_of

__all__ = ["local_search", "search", "branch_patterns", "whole_calls_on", "with_trades", "psnr", "SearchResult"]

Sampler = Callable[[Schedule | None], Tensor]


@dataclass
class SearchResult:
    schedule: Schedule
    start_psnr: float           # dB against the full samples of the bank
    psnr: float
    evaluations: int
    seconds: float
    history: list = field(default_factory=list)  # one dict per accepted move


def psnr(images: Tensor, reference: Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of ``images`` against ``reference`` over the whole set (one MSE; [-1, 1]
    data, so ``data_range`` 2); ``inf`` for identical images. The default search metric."""
    a, b = images.double(), reference.double()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def _swapped(s: Schedule, a: int, b: int) -> Schedule:
    keep = s.keep.clone()
    keep[[a, b]] = keep[[b, a]]
    return _as_searched(s, keep)


def branch_patterns(graph, max_share: float = 0.5) -> list[list[int]]:
    """The partial rows of DeepCache's skip branches on a fine UNet graph (the shallow blocks
    that still compute when the deep ones reuse), cheapest first, each costing at most
    ``max_share`` of a call; none for graphs without DeepCache numbering (transformers)."""
    if graph.granularity != "fine" or not graph.blocks or graph.blocks[0].deepcache is None:
        return []
    out = []
    for skip in range(num_skips(graph)):
        row = deepcache(graph, 2, 2, None, skip=skip).keep[1]
        if graph.macs_kept(row.tolist()) <= max_share * graph.total_macs:
            out.append(row.nonzero().flatten().tolist())
    return out


def _traded(s: Schedule, drop: int, pattern: list[int]) -> Schedule | None:
    """``s`` without the whole call ``drop``, its MACs given to partial rows of ``pattern`` at
    the reused calls just after the computed ones (1 after each, then 2 after, ...)."""
    keep = s.keep.clone()
    keep[drop] = False
    whole = [c for c in range(s.calls) if bool(keep[c].all())]
    budget = s.macs_kept + 1e-9
    added = 0
    for d in range(1, s.calls):
        for c in whole:
            t = c + d
            if t >= s.calls or bool(keep[t].any()):  # whole calls and placed rows are taken
                continue
            keep[t, pattern] = True
            if Schedule(keep, s.graph).macs_kept > budget:
                keep[t, pattern] = False
                return _as_searched(s, keep) if added else None
            added += 1
    return _as_searched(s, keep) if added else None


def _as_searched(s: Schedule, keep: Tensor) -> Schedule:
    return Schedule(keep, s.graph, name="searched", params={"start": s.params.get("start", s.name)},
                    sampler=s.sampler, steps=s.steps)


def local_search(start: Schedule, sample: Sampler, *, radius: int = 2,
                 min_gain: float = 0.02, max_evals: int | None = None, time_budget: float | None = None,
                 metric: Callable[[Tensor, Tensor], float] = psnr, patterns=(), progress: bool = True
                 ) -> SearchResult:
    """Improve ``start`` (same MACs or fewer) by moving its rows; see the module docstring.

    sample: ``sample(schedule) -> images`` on training noise; ``sample(None)`` the full model.
    radius: a row may move up to this many calls.
    min_gain: a move must raise ``metric`` (PSNR in dB by default) by more than this.
    patterns: partial rows (block indices of ``start.graph``) for trades, e.g.
        ``branch_patterns(graph_of(model, "fine"))``; none: only moves.
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
        if since_last == best.calls - 1 and patterns and not out_of_time():  # no move helps: trade
            trades = [(c, i) for c in best.computed_calls() if c > 0 and bool(best.keep[c].all())
                      for i in range(len(patterns))]
            scored = []
            for c, i in trades:
                cand = _traded(best, c, list(patterns[i]))
                if cand is None:
                    continue
                scored.append((metric(sample(cand), ref), c, i, cand))
                result.evaluations += 1
                bar.update(1)
                if out_of_time():
                    break
            if scored:
                score, c, i, cand = max(scored, key=lambda x: x[0])
                if score > best_score + min_gain:
                    best, best_score, since_last = cand, score, 0
                    result.history.append(dict(evaluations=result.evaluations, traded=c, pattern=patterns[i],
                                               score=score, seconds=time.perf_counter() - t0))
                    bar.set_postfix(psnr=f"{score:.2f}")
    bar.close()
    result.schedule, result.psnr = best, best_score
    result.seconds = time.perf_counter() - t0
    return result


def whole_calls_on(schedule: Schedule, graph) -> Schedule:
    """A schedule of whole-call rows rebuilt on another graph of the same model (e.g. the fine
    one, where partial rows can be traded in), with its forecast order where every reused cell
    has the same one (per-block orders name blocks of the old graph: ValueError)."""
    rows = schedule.keep
    if not bool((rows.all(1) | ~rows.any(1)).all()):
        raise ValueError("only schedules of whole-call rows can change graph")
    orders = {int(o) for o in schedule.forecast[~rows].tolist()}
    if len(orders) > 1:
        raise ValueError(f"schedule forecasts at orders {sorted(orders)} on different blocks: only one order for "
                         "every reused block carries to another graph")
    keep = rows.all(1, keepdim=True).expand(-1, len(graph)).clone()
    return Schedule(keep, graph, name=schedule.name, params=schedule.params, sampler=schedule.sampler,
                    steps=schedule.steps, forecast=orders.pop() if orders else 0)


def with_trades(model, start: Schedule) -> tuple[Schedule, list[list[int]]]:
    """``(start, patterns)`` for a search with trades: on a UNet the DeepCache-branch patterns
    of its fine graph and ``start`` on that graph (whole-call schedules move there); on other
    models ``start`` unchanged and no patterns."""
    fine = graph_of(model, "fine")
    patterns = branch_patterns(fine)
    if patterns and start.granularity != "fine":
        start = whole_calls_on(start, fine)
    return start, patterns


def search(model, sample: Sampler, target: float, *, calls: int = 50, radius: int = 2, trades: bool = True,
           time_budget: float | None = None, metric: Callable[[Tensor, Tensor], float] = psnr,
           progress: bool = True) -> SearchResult:
    """A schedule of ``model`` keeping at most ``target`` of the MACs: score the hand-made
    schedules within that budget (the top 10% of it, :func:`.evaluate.handmade`) with
    ``sample``, then :func:`local_search` from the best of them (with ``trades`` on a UNet: on
    its fine graph, trading whole calls for DeepCache-branch partial rows).
    ``result.start_psnr`` is that start's score."""
    if not 0 < target <= 1:
        raise ValueError(f"target is the kept-MAC fraction in (0, 1], got {target}")
    if not callable(sample):
        raise TypeError(f"sample must be callable schedule -> images, got {type(sample).__name__}")
    options = {k: s for k, s in handmade(model, calls).items() if s.macs_kept <= target + 1e-9}
    if not options:
        raise ValueError(f"no hand-made schedule keeps <= {target:.1%} of the MACs at {calls} calls")
    top = max(s.macs_kept for s in options.values())
    options = {k: s for k, s in options.items() if s.macs_kept >= 0.9 * top}
    ref = sample(None)
    start = max(options.values(), key=lambda s: metric(sample(s), ref))
    start, patterns = with_trades(model, start) if trades else (start, [])
    return local_search(start, sample, radius=radius, time_budget=time_budget, metric=metric, patterns=patterns,
                        progress=progress)
