"""gated_residual in Triton: out = x + gate*y, x and y viewed as [B, T, C] (C innermost),
gate [B, C] broadcast over the T tokens; optionally delta = gate*y into `cache_out`.

Forward: grid axis 1 walks the samples, axis 0 the blocks of one sample; the gate is a
(cached) gather of channel offset % C. Backward: one program per (channel block, token
chunk, sample) tile writes dy and one partial sum of g*y per channel; the partials are
summed in a fixed order (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import MAX_GRID_Y, acc_type, check_grid_samples, elementwise_configs

BACKWARD_TOKENS = 32  # tokens per program of the backward (at least)
MAX_BLOCK_C = 128


@triton.autotune(configs=elementwise_configs(), key=["per_sample", "channels"])
@triton.jit
def _forward_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, cache_ptr, per_sample, channels,
                    HAS_GATE: tl.constexpr, HAS_CACHE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    sample = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < per_sample
    delta = tl.load(y_ptr + sample * per_sample + offsets, mask=mask).to(ACC)
    if HAS_GATE:
        gate = tl.load(gate_ptr + sample * channels + offsets % channels, mask=mask).to(ACC)
        delta = gate * delta  # same form as csrc/shortcut_math.h
    offsets += sample * per_sample
    if HAS_CACHE:
        tl.store(cache_ptr + offsets, delta.to(cache_ptr.dtype.element_ty), mask=mask)
    x = tl.load(x_ptr + offsets, mask=mask).to(ACC)
    tl.store(out_ptr + offsets, (x + delta).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, y_ptr, gate_ptr, d_y_ptr, partial_ptr, tokens, channels,
                     NEED_Y: tl.constexpr, NEED_GATE: tl.constexpr, ACC: tl.constexpr,
                     TOKENS: tl.constexpr, BLOCK_C: tl.constexpr):
    sample = tl.program_id(2).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = chunk * TOKENS + tl.arange(0, TOKENS)
    col_mask = cols < channels
    mask = (rows < tokens)[:, None] & col_mask[None, :]
    offsets = (sample * tokens + rows)[:, None] * channels + cols[None, :]
    grad = tl.load(grad_ptr + offsets, mask=mask).to(ACC)
    if NEED_Y:
        gate = tl.load(gate_ptr + sample * channels + cols, mask=col_mask).to(ACC)
        tl.store(d_y_ptr + offsets, (gate[None, :] * grad).to(d_y_ptr.dtype.element_ty), mask=mask)
    if NEED_GATE:
        y = tl.load(y_ptr + offsets, mask=mask).to(ACC)
        term = tl.where(mask, grad * y, 0.0)
        tl.store(partial_ptr + (sample * tl.num_programs(1) + chunk) * channels + cols,
                 tl.sum(term, axis=0), mask=col_mask)


def gated_residual_forward(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None,
                           cache_out: torch.Tensor | None = None) -> torch.Tensor:
    """x/y/cache_out contiguous [B, ..., C]; gate acc-dtype [B, C] or None."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    if gate is None:  # elementwise: one "sample" of every element
        samples, channels = 1, 1
    else:
        samples, channels = x.shape[0], x.shape[-1]
    per_sample = x.numel() // samples
    check_grid_samples(samples, "gated_residual")
    grid = lambda meta: (triton.cdiv(per_sample, meta["BLOCK"]), samples)  # noqa: E731
    _forward_kernel[grid](x, y, gate if gate is not None else x, out,
                          cache_out if cache_out is not None else out, per_sample, channels,
                          HAS_GATE=gate is not None, HAS_CACHE=cache_out is not None,
                          ACC=acc_type(x.dtype))
    return out


def gated_residual_backward(grad, y, gate, need_y: bool, need_gate: bool):
    """Returns (d_y, d_gate [B, C]); entries not needed are empty tensors."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    if gate is None:
        if need_gate:
            raise ValueError("gated_residual: need_gate without a `gate`")
        return (grad.clone() if need_y else y.new_empty(0)), y.new_empty(0, dtype=acc)
    d_y = torch.empty_like(y) if need_y else y.new_empty(0)
    samples, channels = y.shape[0], y.shape[-1]
    tokens = y.numel() // (samples * channels) if y.numel() else 0
    d_gate = torch.zeros_like(gate) if need_gate else gate.new_empty(0)
    if tokens == 0 or not (need_y or need_gate):
        return d_y, d_gate
    check_grid_samples(samples, "gated_residual")
    # Chunks of tokens on grid axis 1 (at most 65535 of them): depends on the shape only.
    chunk_tokens = max(BACKWARD_TOKENS, triton.next_power_of_2(triton.cdiv(tokens, MAX_GRID_Y)))
    chunks = triton.cdiv(tokens, chunk_tokens)
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(channels))
    partial = torch.empty((samples, chunks, channels), dtype=gate.dtype, device=gate.device)
    _backward_kernel[(triton.cdiv(channels, block_c), chunks, samples)](
        grad, y, gate, d_y if need_y else grad, partial, tokens, channels,
        NEED_Y=need_y, NEED_GATE=need_gate, ACC=acc_type(y.dtype),
        TOKENS=chunk_tokens, BLOCK_C=block_c, num_warps=4)
    if need_gate:
        d_gate = partial.sum(1)
    return d_y, d_gate
