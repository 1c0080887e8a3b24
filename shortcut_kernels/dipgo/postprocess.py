"""DiP-GO's post-processing: a pruner's ``[calls, blocks]`` reuse scores -> a schedule at a
MAC budget (:meth:`~.pruner.Pruner.to_schedule`, :meth:`~.pruner.Pruner.budget_gates`).

* :func:`from_scores` - the published rule: threshold descent from the output side, each
  reuse with its cascade, until the kept MACs meet the target;
* :func:`from_ranking` / :func:`budget_rows` - by rank, no threshold: the rule the
  budgeted training mode trains with, so the schedule is the one it trained.

Ties between calls (every score ties at a new pruner's "keep everything") are broken in
:func:`tie_order`, a deterministic even spread over the chain with call 1 last. Breaking them
earliest call first made the first reuses calls 1, 2, 3, ..., the calls whose reuse moves every
later input the most, so a budget met by ties alone was the worst placement rather than a
neutral one (an even spread is ``skip_steps``' uniform placement).
"""
from __future__ import annotations

import torch

from ..models import BlockGraph
from ..runtime.schedule import Schedule, graph_of

__all__ = ["from_scores", "from_ranking", "budget_rows", "tie_order"]


def tie_order(calls: int) -> list[int]:
    """Calls ``1 .. calls - 1`` in the order equal scores are taken: call ``1 + floor(v_k *
    (calls - 1))`` for the base-2 van der Corput sequence ``v_1, v_2, ... = 1/2, 1/4, 3/4,
    1/8, ...`` (repeats skipped), so every prefix is spread evenly over the chain; the middle
    call comes first and call 1, the most damaging to reuse, in the second half."""
    n = calls - 1
    out, seen, k = [], set(), 1
    while len(out) < n:
        v, half, i = 0.0, 0.5, k
        while i:  # bit-reverse k into [0, 1)
            v, half, i = v + half * (i & 1), half / 2, i >> 1
        t = 1 + int(v * n)
        if t not in seen:
            seen.add(t)
            out.append(t)
        k += 1
    return out


def _checked_scores(graph: BlockGraph, scores, target_macs: float) -> torch.Tensor:
    """``scores`` as a float64 ``[calls, blocks]`` tensor; ValueError for another shape or a
    ``target_macs`` outside (0, 1]."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.ndim != 2 or s.shape[1] != len(graph) or s.shape[0] < 1:
        raise ValueError(f"scores must be [calls, {len(graph)}], got {tuple(s.shape)}")
    if not 0 < target_macs <= 1:
        raise ValueError(f"target_macs must be a fraction in (0, 1], got {target_macs}")
    return s


def from_scores(model, scores, target_macs: float, *, threshold: float = 0.95, step: float = 0.05,
                slack: float | None = None, granularity: str | None = None, sample_shape=None) -> Schedule:
    """DiP-GO's post-processing: reuse probabilities -> a schedule at a MAC budget.

    Args:
        scores: ``[calls, blocks]`` reuse probabilities in [0, 1] (e.g. the pruner's
            softmax for "reuse").
        target_macs: the fraction of the full model's MACs to keep (DiP-GO's prune
            ratio 0.8 is ``target_macs=0.2``).
        threshold, step: start at ``threshold``; walking the blocks from the output side
            (and the calls of each block in :func:`tie_order`), reuse every (call > 0, block)
            whose probability exceeds it (with its cascade) until the target is met; if it
            is not met, lower the threshold by ``step``.
        slack: if given, a reuse that would take the kept MACs below ``target_macs * (1 - slack)``
            is passed over (the walk goes on to the next candidate), so the schedule lands
            within ``slack`` of the target whenever some small enough reuse is left. Without
            it the last reuse may overshoot by a whole cascade (an outer block of a UNet takes
            its inner blocks with it), which breaks equal-MAC comparisons.
    """
    g = graph_of(model, granularity or "coarse", sample_shape)
    s = _checked_scores(g, scores, target_macs)
    if not bool(((s >= 0) & (s <= 1)).all()):
        raise ValueError("scores must be probabilities in [0, 1]")
    if slack is not None and not 0 <= slack < 1:
        raise ValueError(f"slack must be a fraction in [0, 1), got {slack}")
    calls = s.shape[0]
    total = calls * g.total_macs
    floor = -1.0 if slack is None else target_macs * (1 - slack) - 1e-12
    rows = [[True] * len(g) for _ in range(calls)]
    row_macs = [g.total_macs] * calls
    spent = sum(row_macs)
    thr = threshold
    order = list(reversed(range(len(g))))  # output side first
    call_order = tie_order(calls)
    while spent / total > target_macs + 1e-12:
        for b in order:
            for t in call_order:
                if spent / total <= target_macs + 1e-12:
                    break
                if rows[t][b] and s[t, b] > thr:
                    spent += _reuse(g, rows, row_macs, t, b, spent, floor * total)
        if thr <= 0:
            break
        thr = round(thr - step, 10)
    return Schedule(rows, g, name="from_scores",
                    params=dict(target_macs=target_macs, threshold=threshold, step=step, slack=slack,
                                final_threshold=max(thr, 0.0)))


def _reuse(graph: BlockGraph, rows: list[list[bool]], row_macs: list[int], t: int, b: int, spent: float,
           lowest: float) -> int:
    """Reuse block ``b`` at call ``t`` with its cascade, in place, unless that takes the kept MACs
    (``spent`` now) below ``lowest``: then nothing changes (the caller tries a smaller reuse).
    Returns the MACs this changes (0 when refused)."""
    before = rows[t][:]
    rows[t][b] = False
    rows[t] = graph.cascade(rows[t])
    new = graph.overhead_macs + sum(m for m, k in zip(graph.block_macs, rows[t]) if k)
    if spent + new - row_macs[t] < lowest:
        rows[t] = before  # overshoots the window
        return 0
    delta, row_macs[t] = new - row_macs[t], new
    return delta


def budget_rows(graph: BlockGraph, scores, target_macs: float, slack: float | None = None) -> list[list[bool]]:
    """Keep rows meeting a MAC budget by rank: reuse the (call > 0, block) pairs in decreasing
    order of ``scores`` (ties: the output side first, then the calls in :func:`tie_order`), each
    with its cascade, until at most ``target_macs`` of the MACs are kept (or nothing is left to
    reuse). Unlike :func:`from_scores` no threshold is involved; the budgeted training mode
    (``shortcut_kernels.dipgo.train``, through :meth:`~.pruner.Pruner.budget_gates`) uses the
    same rule at every iteration. ``slack``: a reuse that would take the kept MACs below
    ``target_macs * (1 - slack)`` is passed over for the next one (a last reuse of an outer
    block takes its whole cascade, a whole call on a UNet), so the rows land within ``slack``
    of the target whenever some smaller reuse allows it (equal-MAC comparisons); when none does,
    a second pass without the window meets the budget all the same."""
    if slack is not None and not 0 <= slack < 1:
        raise ValueError(f"slack must be a fraction in [0, 1), got {slack}")
    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    calls, n = s.shape
    total = calls * graph.total_macs
    floor = -1.0 if slack is None else target_macs * (1 - slack) - 1e-12
    rows = [[True] * n for _ in range(calls)]
    row_macs = [graph.total_macs] * calls
    spent = sum(row_macs)
    # candidates in the tie order, then a stable sort by decreasing score
    cand = [(t, b) for b in reversed(range(n)) for t in tie_order(calls)]
    order = sorted(range(len(cand)), key=lambda i: -float(s[cand[i]]))
    for lowest in (floor, -1.0):  # when no reuse lands in the window, the budget still holds
        for i in order:
            if spent / total <= target_macs + 1e-12:
                return rows
            t, b = cand[i]
            if rows[t][b]:  # not already reused by a cascade
                spent += _reuse(graph, rows, row_macs, t, b, spent, lowest * total)
    return rows


def from_ranking(model, scores, target_macs: float, *, slack: float | None = None, granularity: str | None = None,
                 sample_shape=None) -> Schedule:
    """A schedule at a MAC budget from ``[calls, blocks]`` reuse scores by rank
    (:func:`budget_rows`, ``slack`` its window): the post-processing that matches the budgeted
    training mode."""
    g = graph_of(model, granularity or "coarse", sample_shape)
    s = _checked_scores(g, scores, target_macs)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores must be finite")
    return Schedule(budget_rows(g, s, target_macs, slack), g, name="from_ranking",
                    params=dict(target_macs=target_macs, slack=slack))
