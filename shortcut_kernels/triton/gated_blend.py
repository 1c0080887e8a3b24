"""gated_blend in Triton: out = residual + gate*fresh + (1-gate)*cache, gate per sample.

Grid axis 1 walks the samples (so the gate is one scalar load per program), axis 0 the
blocks of one sample. The backward writes d_fresh/d_cache and one partial sum of
g*(fresh-cache) per program; the partials are summed in a fixed order (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_type, check_grid_samples, elementwise_configs

BACKWARD_BLOCK = 2048


@triton.autotune(configs=elementwise_configs(), key=["per_sample"])
@triton.jit
def _forward_kernel(fresh_ptr, cache_ptr, residual_ptr, out_ptr, gate_ptr, per_sample,
                    HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    sample = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < per_sample
    offsets += sample * per_sample
    gate = tl.load(gate_ptr + sample).to(ACC)
    fresh = tl.load(fresh_ptr + offsets, mask=mask).to(ACC)
    cache = tl.load(cache_ptr + offsets, mask=mask).to(ACC)
    out = gate * fresh + (1.0 - gate) * cache  # same form as csrc/shortcut_math.h
    if HAS_RESIDUAL:
        out += tl.load(residual_ptr + offsets, mask=mask).to(ACC)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, fresh_ptr, cache_ptr, d_fresh_ptr, d_cache_ptr, gate_ptr,
                     partial_ptr, per_sample, NEED_FRESH: tl.constexpr,
                     NEED_CACHE: tl.constexpr, NEED_GATE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr):
    sample = tl.program_id(1).to(tl.int64)
    block = tl.program_id(0)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < per_sample
    offsets += sample * per_sample
    gate = tl.load(gate_ptr + sample).to(ACC)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(ACC)
    if NEED_FRESH:
        tl.store(d_fresh_ptr + offsets, (gate * grad).to(d_fresh_ptr.dtype.element_ty), mask=mask)
    if NEED_CACHE:
        tl.store(d_cache_ptr + offsets, ((1.0 - gate) * grad).to(d_cache_ptr.dtype.element_ty), mask=mask)
    if NEED_GATE:
        fresh = tl.load(fresh_ptr + offsets, mask=mask).to(ACC)
        cache = tl.load(cache_ptr + offsets, mask=mask).to(ACC)
        term = tl.where(mask, grad * (fresh - cache), 0.0)
        tl.store(partial_ptr + sample * tl.num_programs(0) + block, tl.sum(term, axis=0))


def gated_blend_forward(fresh: torch.Tensor, cache: torch.Tensor, gate: torch.Tensor,
                        residual: torch.Tensor | None) -> torch.Tensor:
    """fresh/cache/residual share one dense layout; gate is acc-dtype, 0-d or [B]."""
    out = torch.empty_like(fresh)
    samples = max(1, gate.numel())
    per_sample = fresh.numel() // samples if fresh.numel() else 0
    if per_sample == 0:
        return out
    check_grid_samples(samples, "gated_blend")
    grid = lambda meta: (triton.cdiv(per_sample, meta["BLOCK"]), samples)  # noqa: E731
    _forward_kernel[grid](fresh, cache, residual if residual is not None else fresh, out, gate,
                          per_sample, HAS_RESIDUAL=residual is not None, ACC=acc_type(fresh.dtype))
    return out


def gated_blend_backward(grad, fresh, cache, gate, need_fresh: bool, need_cache: bool,
                         need_gate: bool):
    """Returns (d_fresh, d_cache, d_gate); entries not needed are empty tensors."""
    d_fresh = torch.empty_like(fresh) if need_fresh else fresh.new_empty(0)
    d_cache = torch.empty_like(cache) if need_cache else fresh.new_empty(0)
    samples = max(1, gate.numel())
    per_sample = grad.numel() // samples if grad.numel() else 0
    if not need_gate:
        d_gate = gate.new_empty(0)
    if per_sample == 0 or not (need_fresh or need_cache or need_gate):
        return d_fresh, d_cache, (torch.zeros_like(gate) if need_gate else d_gate)
    check_grid_samples(samples, "gated_blend")
    blocks = triton.cdiv(per_sample, BACKWARD_BLOCK)
    partial = torch.empty((samples, blocks), dtype=gate.dtype, device=gate.device)
    _backward_kernel[(blocks, samples)](
        grad, fresh, cache, d_fresh if need_fresh else grad, d_cache if need_cache else grad, gate,
        partial, per_sample, NEED_FRESH=need_fresh, NEED_CACHE=need_cache, NEED_GATE=need_gate,
        ACC=acc_type(fresh.dtype), BLOCK=BACKWARD_BLOCK, num_warps=8)
    if need_gate:
        d_gate = partial.sum(1).reshape(gate.shape)
    return d_fresh, d_cache, d_gate
