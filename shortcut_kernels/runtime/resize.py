"""Resizing a schedule that no builder made to another number of denoiser calls.

A custom or learned schedule has no arguments to rebuild it from (and a builder's schedule
whose rows were edited by hand has arguments that no longer describe it), so its rows are mapped:
each kind of row (whole calls, and each pattern of partial rows) keeps its density along
the trajectory (:func:`requantile`), and the row counts are those whose MACs come nearest
the old share (:func:`nearest_counts`). :meth:`shortcut_kernels.dipgo.Schedule.resize`
uses :func:`resized_rows` for every schedule whose rows its builder would not make, and
:func:`mapped_calls` for explicit call lists.
"""
from __future__ import annotations

import itertools
import math

import torch

from ..models import BlockGraph

__all__ = ["resized_rows", "requantile", "nearest_counts", "mapped_calls"]


def mapped_calls(calls: list[int], old: int, new: int) -> list[int]:
    """Explicit call indices of an ``old``-call run mapped proportionally onto ``new`` calls
    (call 0 always among them)."""
    return sorted({min(new - 1, round(t * (new - 1) / max(1, old - 1))) for t in calls} | {0})


def requantile(computed: list[int], old: int, new: int, pin_first: bool = True, n: int | None = None) -> list[int]:
    """``n`` calls of ``new`` (default: ``len(computed) * new / old``, rounded half up) with the
    same density along the trajectory. Each computed call starts a segment that lasts until
    the next one (the last until the end); the new calls sit at the ``j / n`` quantiles of that
    segment density, then scale to the new length. Halving merges pairs of adjacent segments,
    doubling splits each in two, a uniform schedule stays uniform and an early-dense one
    early-dense. ``pin_first``: the first call is call 0 (whole calls)."""
    if n is None:
        n = math.floor(len(computed) * new / old + 0.5)
    n = max(1, min(new, n))
    ends = list(computed) + [old]
    pos = []
    for j in range(n):
        x = j * len(computed) / n
        k = int(x)
        pos.append(round((ends[k] + (x - k) * (ends[k + 1] - ends[k])) * new / old))
    out = []
    for p in pos:  # strictly increasing, then pulled back inside 0..new-1
        out.append(max(p, out[-1] + 1) if out else (0 if pin_first else min(p, new - 1)))
    for i in range(n - 1, -1, -1):
        out[i] = min(out[i], new - n + i)
    return out


def resized_rows(keep: torch.Tensor, calls: int, graph: BlockGraph) -> torch.Tensor:
    """``keep`` for ``calls`` calls with the MAC share nearest the old one and, for each kind of
    row (whole calls, each pattern of partial rows), the same density (:func:`requantile`).
    Counts: the combination whose MACs come nearest the old share (:func:`nearest_counts`).
    Whole calls are placed first, call 0 among them; a row that lands on a taken call moves to
    the nearest free one."""
    old, n = keep.shape
    kinds: dict[tuple, list[int]] = {}
    for c in range(old):
        if bool(keep[c].any()):
            kinds.setdefault(tuple(keep[c].tolist()), []).append(c)
    whole = tuple([True] * n)
    cost = {k: sum(m for m, on in zip(graph.block_macs, k) if on) for k in kinds}
    target = sum(cost[k] * len(v) for k, v in kinds.items()) / old * calls  # MACs of the new rows
    count = nearest_counts({k: len(v) * calls / old for k, v in kinds.items()}, cost, target, calls, whole)
    out = torch.zeros(calls, n, dtype=torch.bool)
    taken: set[int] = set()
    for kind in sorted(kinds, key=lambda k: (k != whole, -len(kinds[k]))):
        if not count[kind]:
            continue
        for p in requantile(kinds[kind], old, calls, pin_first=kind == whole, n=count[kind]):
            free = [q for q in range(calls) if q not in taken]
            if not free:
                break
            q = min(free, key=lambda q: (abs(q - p), q))
            out[q] = torch.tensor(kind)
            taken.add(q)
    out[0] = True
    return out


def nearest_counts(exact: dict, cost: dict, target: float, calls: int, whole: tuple) -> dict:
    """Row counts per kind (whole calls at least one, at most ``calls`` rows in all) whose MACs
    come nearest ``target``; then the counts nearest ``exact`` (each kind's share of the new
    calls); then more whole calls. Each count is ``exact`` rounded down or up, or one further
    (up to 6 kinds): rounding each kind on its own can miss. 9 whole calls and 3 partial rows
    of 0.28 of a call, halved: 4 + 2 or 5 + 1 are 0.36 of a call off the 4.92 the share asks
    for, 5 + 0 and 4 + 3 only 0.08; of those two, the whole calls win the tie (a partial row
    reads caches from further away once calls are fewer). Beyond 12 kinds with a fraction, the
    rest are rounded greedily."""
    lo = {k: 1 if k == whole else 0 for k in exact}
    spread = 1 if len(exact) <= 6 else 0
    options = {k: list(range(max(lo[k], math.floor(x) - spread), math.ceil(x) + spread + 1)) for k, x in exact.items()}
    open_kinds = sorted((k for k in exact if len(options[k]) > 1), key=lambda k: -cost[k])
    count = {k: options[k][0] for k in exact}
    spent0 = sum(cost[k] * count[k] for k in exact if k not in open_kinds[:12])
    for k in open_kinds[12:]:  # greedy on the tail: one more row where it brings the MACs nearer
        for _ in options[k][1:]:
            if abs(spent0 + cost[k] - target) >= abs(spent0 - target):
                break
            count[k] += 1
            spent0 += cost[k]
    unit = max(cost.values())
    best = None
    for pick in itertools.product(*(options[k] for k in open_kinds[:12])):
        trial = {**count, **dict(zip(open_kinds, pick))}
        if sum(trial.values()) > calls:
            continue
        spent = spent0 + sum(cost[k] * c for k, c in zip(open_kinds, pick))
        key = (round(abs(spent - target) / unit, 6), round(sum(abs(trial[k] - exact[k]) for k in exact), 6),
               -trial[whole])
        if best is None or key < best[0]:
            best = (key, trial)
    return best[1] if best else count
