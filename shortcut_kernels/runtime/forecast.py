"""Forecast reuse: a reused block's output extrapolated from its last computed outputs.

Where a schedule reuses block ``b`` at call ``t``, ``READ`` returns the output ``b`` last
computed (transformer blocks: its residual ``out - in``). With a forecast order ``p`` (1 or
2) the runtime extrapolates from the block's last ``p + 1`` computed outputs ``y_0, y_1,
y_2`` (newest first, computed at calls ``c_0 > c_1 > c_2``), ``e = t - c_0`` calls after the
newest:

    order 1:  y(t) = y_0 + e d_1,                 d_1 = (y_0 - y_1) / (c_0 - c_1)
    order 2:  y(t) = y_0 + e d_1 + e^2 d_2,       d_2 = (d_1 - (y_1 - y_2) / (c_1 - c_2)) / (c_0 - c_2)

a Taylor expansion at ``c_0`` whose derivatives are divided differences (``d_1`` the slope
of the last two computations, ``2 d_2`` the second derivative). On evenly spaced computed
calls (spacing ``h``, ``s = e / h``) order 2 is ``y_0 + s D1 + s^2 / 2 D2`` (``D1 = y_0 - y_1``,
``D2 = y_0 - 2 y_1 + y_2``), cache-dit's TaylorSeer exactly; on uneven spacing (learned and
``skip_steps`` schedules) ``d_2`` stays a second divided difference where TaylorSeer divides
by the last window only. (The parabola through the three points, ``s (s + 1) / 2 D2``, would
be exact on quadratic trajectories but extrapolates further; docs/dipgo.md compares the two,
and both second derivatives.) TaylorSeer also takes no derivative from the computations at
calls 0-2 of a run, so it forecasts at lower orders early on; per-cell orders (``[calls,
blocks]``) give a schedule those, the fallback below only follows what was computed.

The variable is the denoiser call index, not the timestep. TaylorSeer does the same (its
"elapsed" is the number of steps since the last computed one, its differences are divided by
the step window). Call indices are known when the schedule is built, so the weights are
constants of the schedule: nothing reads the scheduler's timesteps or waits for the device,
and compiled calls take the weights as tensor inputs (one graph per pattern of modes and
orders). For DDIM and the other single-call samplers with evenly spaced timesteps (the zoo's,
the pipelines' default spacings) the timestep is affine in the call index, so both variables
give the same extrapolation.

Fallback: at a call where fewer than ``p + 1`` computed outputs exist (early in a run: call
0 computes every block, the next computation of the block comes later), the order drops to
what they allow; with one computed output that is order 0, a plain ``READ``.

Evaluation with the fused ops: both orders are weighted sums ``L_0 y_0 + L_1 y_1 (+ L_2 y_2)``
with weights summing to 1 (:func:`weights`). A transformer block's forecast output is its
input ``x`` plus the extrapolated residual, ``x + L_0 y_0 + L_1 y_1 (+ L_2 y_2)``: one pass of
:func:`shortcut_kernels.ops.cache_residual.cache_residual` with ``weights=(L_0, L_1[, L_2])``
(a 1-D tensor), reading ``x`` and the ``p + 1`` cached residuals and writing the output, for
either order; the runtime sums a whole run of consecutive reused blocks (repeating ones at
weight 1) in one such pass (:mod:`.cache`). Other blocks (UNet outputs, no residual) use
:func:`shortcut_kernels.ops.gated_blend.gated_blend` (``g fresh + (1 - g) cache``, any real
gate) and its gates (:func:`gates`): order 1 is ``gated_blend(y_0, y_1, L_0)``; order 2 is
``gated_blend(y_0, p, L_0)`` with ``p = gated_blend(y_1, y_2, L_1 / (L_1 + L_2))``. ``L_0 > 1``
for any call after ``c_0``, so ``L_1 + L_2 = 1 - L_0`` is never 0.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..ops.cache_residual import cache_residual
from ..ops.gated_blend import gated_blend

ORDERS = (0, 1, 2)
"""Forecast orders: 0 repeats the cache (``READ``), 1 extrapolates linearly, 2 quadratically."""

__all__ = ["ORDERS", "check_order", "normalise", "per_block", "to_json", "from_json", "mapped", "weights",
           "gates", "extrapolate", "extrapolate_output"]


def check_order(value, name: str = "forecast") -> int:
    """``value`` if it is a forecast order (0, 1 or 2), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in ORDERS:
        raise ValueError(f"{name} must be 0 (repeat the cached output), 1 (linear) or 2 (quadratic extrapolation "
                         f"from the block's last computed outputs), got {value!r}")
    return value


def normalise(forecast: Any, keep: Tensor) -> Tensor:
    """A ``[calls, blocks]`` int8 tensor of forecast orders from ``forecast``: an int (every
    block), one order per block, or one per (call, block). Cells where ``keep`` computes hold 0
    (a computing block forecasts nothing), so equal schedules have equal tensors."""
    calls, blocks = keep.shape
    if forecast is None:
        forecast = 0
    if isinstance(forecast, int) and not isinstance(forecast, bool):
        f = torch.full((calls, blocks), check_order(forecast), dtype=torch.int8)
    else:
        if isinstance(forecast, bool) or isinstance(forecast, (str, bytes)):
            raise ValueError(f"forecast must be an int, {blocks} ints (one per block) or [{calls}, {blocks}] ints, "
                             f"got {forecast!r}")
        try:
            t = torch.as_tensor(forecast)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"forecast must be an int, {blocks} ints (one per block) or [{calls}, {blocks}] ints: "
                             f"{e}") from e
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"forecast must hold ints 0, 1 or 2, got dtype {t.dtype}")
        if t.shape == (blocks,):
            t = t.expand(calls, blocks)
        elif t.shape != (calls, blocks):
            raise ValueError(f"forecast must be an int, {blocks} ints (one per block) or [{calls}, {blocks}] ints "
                             f"(one per call and block), got shape {tuple(t.shape)}")
        bad = sorted({int(v) for v in t.flatten().tolist()} - set(ORDERS))
        if bad:
            raise ValueError(f"forecast holds {bad}: orders are 0 (repeat the cached output), 1 (linear) or 2 "
                             "(quadratic extrapolation)")
        f = t.to(torch.int8).clone()
    f[keep.to(torch.bool)] = 0
    return f


def per_block(forecast: Tensor, keep: Tensor) -> list[int] | None:
    """One order per block if every reused cell of each block has the same one, else None."""
    out = []
    reused = ~keep.to(torch.bool)
    for b in range(forecast.shape[1]):
        values = set(forecast[:, b][reused[:, b]].tolist())
        if len(values) > 1:
            return None
        out.append(int(values.pop()) if values else 0)
    return out


def to_json(forecast: Tensor, keep: Tensor) -> list:
    """The JSON of a forecast tensor: one int per block where that says it all, else one
    string of digits per call."""
    blocks = per_block(forecast, keep)
    if blocks is not None:
        return blocks
    return ["".join(str(int(v)) for v in row) for row in forecast.tolist()]


def from_json(value: Any, calls: int, blocks: int) -> Any:
    """The ``forecast`` field of a schedule file, as :func:`normalise` takes it (ValueError
    naming the field when malformed)."""
    if value is None:
        return 0
    if isinstance(value, list) and value and all(isinstance(r, str) for r in value):
        if len(value) != calls or any(len(r) != blocks or set(r) - set("012") for r in value):
            raise ValueError(f"malformed schedule: forecast rows must be {calls} strings of {blocks} digits 0-2")
        return [[int(c) for c in r] for r in value]
    if not isinstance(value, list) or len(value) != blocks:
        raise ValueError(f"malformed schedule: forecast must be {blocks} orders (one per block) or {calls} rows")
    return value


def mapped(forecast: Tensor, keep: Tensor, calls: int) -> Tensor:
    """Per-cell orders of an ``old``-call schedule on ``calls`` calls: each new call takes the
    row of the old call at the same place in the run (the resized rows then mask it). A cell
    where the old schedule computes (order 0 there) takes the order of the block's next reused
    cell (those forecast from that computation; after the last one, the last one's), so that a
    new reused cell landing there gets an order the old schedule used nearby."""
    old, blocks = forecast.shape
    filled = forecast.clone()
    reused = ~keep.to(torch.bool)
    for b in range(blocks):
        cells = reused[:, b].nonzero().flatten().tolist()
        if not cells:
            continue
        for t in range(old):
            if not reused[t, b]:
                source = next((c for c in cells if c > t), cells[-1])
                filled[t, b] = forecast[source, b]
    rows = [min(old - 1, round(t * (old - 1) / max(1, calls - 1))) for t in range(calls)]
    return filled[rows].clone()


def weights(call: int, computed: Sequence[int]) -> tuple[float, ...]:
    """The weights ``L_i`` of the outputs computed at ``computed`` (newest first, 2 or 3
    calls) in the forecast at ``call`` (the module docstring's formulas, expanded)."""
    e = call - computed[0]
    w0 = computed[0] - computed[1]
    if len(computed) == 2:
        return (1 + e / w0, -e / w0)
    w1 = computed[1] - computed[2]
    span = computed[0] - computed[2]
    q = e * e / span
    return (1 + e / w0 + q / w0, -e / w0 - q / w0 - q / w1, q / w1)


def gates(w: Sequence[float]) -> tuple[float, float | None]:
    """The two gates of :func:`extrapolate` for Lagrange weights ``w`` (2 or 3 of them):
    ``(L_0, None)`` or ``(L_0, L_1 / (L_1 + L_2))``."""
    if len(w) == 2:
        return (w[0], None)
    return (w[0], w[1] / (w[1] + w[2]))


def extrapolate(caches: Sequence[Tensor], coefs: Sequence[Tensor | None] | Tensor,
                residual: Tensor | None = None) -> Tensor:
    """The forecast of one tensor from ``caches`` (newest first, 2 or 3), on the fused ops.

    With ``residual`` (a transformer block's input): ``residual + sum L_i caches[i]`` in one
    ``cache_residual`` pass, ``coefs`` the 1-D tensor of the weights ``L_i`` (:func:`weights`,
    in the accumulation dtype on the caches' device). Without: the extrapolated tensor on
    ``gated_blend``, ``coefs`` the 0-d gate tensors of :func:`gates`."""
    if residual is not None:
        return cache_residual(residual, caches, weights=coefs)
    g0, inner = coefs
    prev = caches[1] if len(caches) == 2 else gated_blend(caches[1], caches[2], inner)
    return gated_blend(caches[0], prev, g0)


def extrapolate_output(caches: Sequence[Any], gate: Sequence[Tensor | None]) -> Any:
    """:func:`extrapolate` over block outputs of any structure the runtime caches: a tensor,
    a tuple of tensors, or a UNet down block's ``(hidden, (skips, ...))``."""
    first = caches[0]
    if isinstance(first, Tensor):
        return extrapolate(caches, gate)
    if isinstance(first, tuple):
        return tuple(extrapolate_output([c[i] for c in caches], gate) for i in range(len(first)))
    raise TypeError(f"cannot forecast a block output of type {type(first).__name__}: forecast reuse works on "
                    "blocks returning tensors or tuples of tensors (use forecast=0 for this block)")
