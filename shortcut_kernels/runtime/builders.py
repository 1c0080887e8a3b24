"""Hand-made schedule builders. Each takes a model, pipeline, zoo model or
:class:`~shortcut_kernels.models.BlockGraph` and the number of denoiser calls:

* :func:`full` - every block at every call (bit-identical to the untouched model);
* :func:`deepcache` - DeepCache (UNets): full calls every ``interval`` calls (or at
  non-uniform, centre-dense positions), retrieval calls keep the shallow path above a
  skip branch, numbered as the ``DeepCache`` package does (``branch``: block ``b // 3``,
  layer ``b % 3``) or by skip index (``skip=``);
* :func:`skip_steps` - whole-call reuse at the calls that do not compute (the shipped
  DiP-GO 0.8 schedule is of this kind): explicit calls, or a count placed uniformly or
  early-dense (power law);
* :func:`fora` - FORA-style (transformers): every block reused between full calls.

Each is registered with :func:`~.schedule.rebuildable`, so ``Schedule.resize`` rebuilds
their schedules from the stored arguments (rows edited since building are resized as rows).
``deepcache``, ``skip_steps`` and ``fora`` take ``forecast=`` (0, the default: reused blocks
repeat their cached output; 1 or 2: they extrapolate it from their last computed outputs,
:mod:`.forecast`); a non-zero order is stored in ``params``.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..models import deepcache_keep, skip_keep
from .forecast import check_order
from .schedule import Schedule, check_calls, graph_of, rebuildable

__all__ = ["full", "deepcache", "skip_steps", "fora"]


@rebuildable
def full(model, calls: int, *, granularity: str = "coarse", sample_shape=None) -> Schedule:
    """Every block computes at every call: identical to the untouched model."""
    g = graph_of(model, granularity, sample_shape)
    calls = check_calls(calls)
    return Schedule(torch.ones(calls, len(g), dtype=torch.bool), g, name="full", params={})


def _check_interval(interval) -> None:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be a positive int, got {interval!r}")


def _forecast_params(forecast) -> dict:
    """``{"forecast": order}`` for a non-zero order, ``{}`` for 0 (the schedules of earlier
    versions, bit for bit); ValueError naming ``forecast`` otherwise."""
    return {"forecast": forecast} if check_order(forecast) else {}


def _full_calls_uniform(calls: int, interval: int) -> list[int]:
    return list(range(0, calls, interval))


def _full_calls_centered(calls: int, n: int, center: int, power: float) -> list[int]:
    """``n`` full calls, dense around ``center`` and spreading out by a power law (DeepCache's
    non-uniform variant): positions ``center + sign(x)|x|^p`` for ``x`` evenly spaced in
    ``[-center^(1/p), (calls - center)^(1/p)]``; ``p`` is lowered until ``n`` are distinct."""
    if n >= calls:
        return list(range(calls))
    p = power
    while p > 1.0:
        lo, hi = -(center ** (1.0 / p)), (calls - center) ** (1.0 / p)
        xs = [lo + (hi - lo) * i / n for i in range(n + 1)]
        pos = sorted({0} | {int(center + math.copysign(abs(x) ** p, x)) for x in xs[1:-1]})
        pos = [q for q in pos if 0 <= q < calls]
        if len(pos) == n:
            return pos
        p -= 0.02
    return sorted(set(round(i * (calls - 1) / max(1, n - 1)) for i in range(n)))  # fall back to uniform


@rebuildable
def deepcache(model, calls: int, interval: int = 3, branch: int | None = 0, *, skip: int | None = None,
              uniform: bool = True, center: int = 15, power: float = 1.4, sample_shape=None,
              forecast: int = 0) -> Schedule:
    """DeepCache (UNets, fine graph): full calls every ``interval`` calls; at the others only
    the shallow path above the cache branch runs.

    Args:
        interval: ``N`` - one full call every ``N`` calls (uniform), or
            ``ceil(calls / N)`` full calls placed non-uniformly (``uniform=False``).
        branch: the ``DeepCache`` package's ``cache_branch_id`` (block ``branch // 3``,
            layer ``branch % 3``, whatever the UNet's layers per block).
        skip: instead of ``branch``: the skip index (keep skips ``0..skip`` fresh).
        uniform, center, power: the package pipelines' non-uniform variant - full calls
            dense around call ``center``, spread by a power law of exponent ``power``.
        forecast: 0 repeats the cached deep features; 1 / 2 extrapolate them from their last
            2 / 3 computations (linear / quadratic in the call index).
    """
    g = graph_of(model, "fine", sample_shape)
    calls = check_calls(calls)
    _check_interval(interval)
    fc = _forecast_params(forecast)
    try:
        model_kind_name = g.blocks[0].deepcache
    except IndexError:  # pragma: no cover
        model_kind_name = None
    if model_kind_name is None:
        raise ValueError(f"deepcache() needs a UNet (its skip branches); {g.model_class} has none: "
                         "use fora() or skip_steps()")
    if skip is not None:
        if branch not in (None, 0):
            raise ValueError("give branch= (package numbering) or skip= (skip index), not both")
        retrieval = skip_keep(g, skip)
        branch = None
    else:
        if branch is None:
            raise ValueError("give branch= or skip=")
        retrieval = deepcache_keep(g, branch)
    if uniform:
        full_calls = _full_calls_uniform(calls, interval)
    else:
        full_calls = _full_calls_centered(calls, math.ceil(calls / interval), min(center, calls - 1), power)
    keep = torch.tensor([retrieval] * calls, dtype=torch.bool)
    keep[full_calls] = True
    return Schedule(keep, g, name="deepcache", params=dict(interval=interval, branch=branch, skip=skip,
                                                           uniform=uniform, center=center, power=power, **fc),
                    forecast=forecast)


def _placement(calls: int, count: int, placement: str, exponent: float, lead: int) -> list[int]:
    if placement == "uniform":
        pos = [math.floor(i * calls / count) for i in range(count)]
    elif placement in ("power", "early"):
        pos = [math.floor(calls * (i / count) ** exponent) for i in range(count)]
    elif placement == "lead":  # calls 0..lead-1, the rest centred in equal parts of the remaining calls
        rest = count - lead
        pos = list(range(lead)) + [lead + math.floor((i + 0.5) * (calls - lead) / rest) for i in range(rest)]
    else:
        raise ValueError(f"placement must be 'uniform', 'power' or 'lead', got {placement!r}")
    out = []
    for p in pos:  # strictly increasing, within range
        p = max(p, out[-1] + 1) if out else 0
        out.append(p)
    if out[-1] >= calls:  # pragma: no cover - count <= calls guarantees room
        raise ValueError("cannot place that many calls")
    return out


@rebuildable
def skip_steps(model, calls: int, compute: Iterable[int] | None = None, *, count: int | None = None,
               placement: str = "uniform", exponent: float = 1.5, lead: int | None = None,
               granularity: str = "coarse", sample_shape=None, forecast: int = 0) -> Schedule:
    """Whole-call reuse: the model runs only at the ``compute`` calls; every other call
    reuses everything (UNets: the last output, through the cascade; transformers: each
    block's cached residual on the current input).

    Give the calls explicitly (``compute=[0, 13, 19, ...]``, call 0 added if missing) or a
    ``count`` placed ``"uniform"``-ly or early-dense by a ``"power"`` law
    (``floor(calls * (i / count) ** exponent)``: more of them early), or ``"lead"``: the first
    ``lead`` calls, the rest evenly spread over the remaining calls (cache-dit's static-mask
    placement; ``lead`` defaults to a fifth of ``count``, at least 1).
    ``forecast=1`` / ``2``: a reused call extrapolates each block's output (transformers: its
    residual) from its last 2 / 3 computed calls instead of repeating the last one.
    """
    g = graph_of(model, granularity, sample_shape)
    calls = check_calls(calls)
    fc = _forecast_params(forecast)
    if (compute is None) == (count is None):
        raise ValueError("give either compute= (explicit calls) or count= (how many calls compute)")
    if compute is not None:
        comp = sorted({int(t) for t in compute} | {0})
        bad = [t for t in comp if not 0 <= t < calls]
        if bad:
            raise ValueError(f"compute calls {bad} out of range 0..{calls - 1}")
    else:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= calls:
            raise ValueError(f"count must be an int in 1..{calls}, got {count!r}")
        if placement == "lead":
            lead = max(1, count // 5) if lead is None else lead
            if isinstance(lead, bool) or not isinstance(lead, int) or not 1 <= lead <= count:
                raise ValueError(f"lead must be an int in 1..count ({count}), got {lead!r}")
        elif lead is not None:
            raise ValueError(f"lead applies to placement='lead' only (placement={placement!r})")
        comp = _placement(calls, count, placement, exponent, lead)
    keep = torch.zeros(calls, len(g), dtype=torch.bool)
    keep[comp] = True
    lead_param = {"lead": lead} if placement == "lead" and compute is None else {}  # earlier schedules' params unchanged
    return Schedule(keep, g, name="skip_steps", params=dict(compute=None if compute is None else comp, count=count,
                                                            placement=placement, exponent=exponent, **lead_param,
                                                            **fc),
                    forecast=forecast)


@rebuildable
def fora(model, calls: int, interval: int = 3, *, granularity: str = "fine", sample_shape=None,
         forecast: int = 0) -> Schedule:
    """FORA-style reuse for transformers (DiT, PixArt): full calls every ``interval``
    calls, every transformer block reused (its cached residual) in between; with
    ``forecast=1`` / ``2`` the residual is extrapolated from the last 2 / 3 full calls."""
    g = graph_of(model, granularity, sample_shape)
    calls = check_calls(calls)
    _check_interval(interval)
    fc = _forecast_params(forecast)
    if not all(b.residual for b in g):
        raise ValueError(f"fora() reuses transformer blocks; {g.model_class} is a UNet: use deepcache() or "
                         "skip_steps()")
    keep = torch.zeros(calls, len(g), dtype=torch.bool)
    keep[_full_calls_uniform(calls, interval)] = True
    return Schedule(keep, g, name="fora", params=dict(interval=interval, **fc), forecast=forecast)
