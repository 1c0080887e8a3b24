"""cache_residual in Triton: out = x + caches[0] + ... + caches[K-1], elementwise, or with
weights out = x + w[0]*caches[0] + ... + w[K-1]*caches[K-1] (the weights a device tensor in
the accumulation dtype, each loaded once per program: no host sync).

Up to CACHES_PER_LAUNCH caches per launch; longer sums run further passes through an
accumulation-dtype buffer (`out` itself for fp32/fp64), so every element is rounded to
storage once, as in the C++ kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_type, elementwise_configs

CACHES_PER_LAUNCH = 4


# out may be the base itself (a running sum in place): tuning runs must not add twice.
@triton.autotune(configs=elementwise_configs(), key=["numel", "COUNT", "WEIGHTED"], restore_value=["out_ptr"])
@triton.jit
def _forward_kernel(base_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, w_ptr, out_ptr, numel,
                    COUNT: tl.constexpr, WEIGHTED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    acc = tl.load(base_ptr + offsets, mask=mask).to(ACC)
    # same order as csrc/shortcut_math.h: acc + cache, or acc + w*cache
    if WEIGHTED:
        acc += tl.load(w_ptr).to(ACC) * tl.load(c0_ptr + offsets, mask=mask).to(ACC)
        if COUNT > 1:
            acc += tl.load(w_ptr + 1).to(ACC) * tl.load(c1_ptr + offsets, mask=mask).to(ACC)
        if COUNT > 2:
            acc += tl.load(w_ptr + 2).to(ACC) * tl.load(c2_ptr + offsets, mask=mask).to(ACC)
        if COUNT > 3:
            acc += tl.load(w_ptr + 3).to(ACC) * tl.load(c3_ptr + offsets, mask=mask).to(ACC)
    else:
        acc += tl.load(c0_ptr + offsets, mask=mask).to(ACC)
        if COUNT > 1:
            acc += tl.load(c1_ptr + offsets, mask=mask).to(ACC)
        if COUNT > 2:
            acc += tl.load(c2_ptr + offsets, mask=mask).to(ACC)
        if COUNT > 3:
            acc += tl.load(c3_ptr + offsets, mask=mask).to(ACC)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(base, group, weights, out, numel):
    """weights: None, or this group's acc-dtype weights (a view into the call's)."""
    padded = list(group) + [group[0]] * (CACHES_PER_LAUNCH - len(group))  # unread placeholders
    grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)  # noqa: E731
    _forward_kernel[grid](base, *padded, base if weights is None else weights, out, numel, COUNT=len(group),
                          WEIGHTED=weights is not None, ACC=acc_type(out.dtype))


def cache_residual_forward(x: torch.Tensor, caches: list[torch.Tensor], weights=None) -> torch.Tensor:
    """x and every cache share one dense layout; weights: None or a contiguous 1-D tensor in
    the accumulation dtype on x's device, one per cache. Returns out in x's layout."""
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    starts = range(0, len(caches), CACHES_PER_LAUNCH)
    groups = [caches[i:i + CACHES_PER_LAUNCH] for i in starts]
    group_weights = [None if weights is None else weights[i:i + CACHES_PER_LAUNCH] for i in starts]
    if len(groups) == 1:
        _launch(x, groups[0], group_weights[0], out, numel)
        return out
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    buffer = out if x.dtype == acc else torch.empty_like(x, dtype=acc)
    _launch(x, groups[0], group_weights[0], buffer, numel)
    for group, w in zip(groups[1:-1], group_weights[1:-1]):
        _launch(buffer, group, w, buffer, numel)
    _launch(buffer, groups[-1], group_weights[-1], out, numel)
    return out
