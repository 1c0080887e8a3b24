"""The hand-made schedules a learned one is compared with, and the bar it must clear.

    schedules = {"learned": s, **handmade(model, 50)}
    rows = ...                                       # one quality row per schedule
    best = best_handmade(rows, macs=s.macs_kept)

``handmade`` builds every hand-made schedule of the peers for a model; ``best_handmade``
picks, from rows of measured quality (``schedule``, ``macs_kept``, ``psnr_vs_full``), the
hand-made schedule a learned one of the same MACs must beat.
"""
from __future__ import annotations

import torch

from ..models.deepcache import num_skips
from ..runtime.builders import deepcache, fora, skip_steps
from ..runtime.schedule import Schedule, graph_of

__all__ = ["handmade", "best_handmade"]


def handmade(model: torch.nn.Module, calls: int, *, intervals=range(2, 11), counts=None) -> dict[str, Schedule]:
    """Every hand-made schedule of the peers for ``model``: UNets - ``deepcache`` with each
    interval and skip branch (uniform and non-uniform placement) and ``skip_steps``;
    transformers - ``fora`` with each interval and ``skip_steps``. ``skip_steps`` runs
    ``count`` calls (default: 4..calls/2) placed uniformly and early-dense (power 1.5)."""
    if isinstance(model, str):
        raise TypeError(f"handmade takes a model, got the name {model!r} "
                        "(for a zoo model by name: shortcut_kernels.zoo.dipgo_eval.handmade)")
    out: dict[str, Schedule] = {}
    counts = counts or range(4, calls // 2 + 1, 2)
    g = graph_of(model, "fine")
    if g.blocks[0].deepcache is not None:
        for n in intervals:
            for skip in range(num_skips(g)):
                for uniform in (True, False):
                    key = f"deepcache({n},skip={skip}{'' if uniform else ',non-uniform'})"
                    out[key] = deepcache(model, calls, n, None, skip=skip, uniform=uniform)
    else:
        for n in intervals:
            out[f"fora({n})"] = fora(model, calls, n)
    for c in counts:
        out[f"skip_steps({c},uniform)"] = skip_steps(model, calls, count=c)
        out[f"skip_steps({c},power1.5)"] = skip_steps(model, calls, count=c, placement="power", exponent=1.5)
    return out


def best_handmade(rows: list[dict], macs: float, tolerance: float = 0.02, exclude=("full",)) -> dict | None:
    """The hand-made row with the best PSNR among those keeping at least ``macs`` (less
    ``tolerance``, relative) of the MACs: the bar a learned schedule must clear."""
    ok = [r for r in rows if r["schedule"] not in exclude and r["macs_kept"] >= macs * (1 - tolerance)
          and not r["schedule"].startswith("learned")]
    return max(ok, key=lambda r: r["psnr_vs_full"], default=None)
