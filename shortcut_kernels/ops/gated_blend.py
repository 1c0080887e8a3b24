"""gated_blend: the SuperNet op of DiP-GO training.

    out = residual + gate * fresh + (1 - gate) * cache

`gate` is a 0-d tensor or one value per sample ([B]); DiP-GO's two-logit
straight-through gate reduces to this one gate. The backward is one fused pass:
d_fresh = gate*g, d_cache = (1-gate)*g, d_residual = g and the per-sample reduction
d_gate = sum(g * (fresh - cache)), computed deterministically.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validate as V
from ._dispatch import backend_impl, call, differentiable, select_backend

OP = "gated_blend"


def reference(fresh: Tensor, cache: Tensor, gate: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """The definition in plain torch: fp32 (fp64 for fp64) math, result in fresh.dtype."""
    acc = V.acc_dtype(fresh.dtype)
    g = _broadcast(gate.to(acc), fresh)
    out = g * fresh.to(acc) + (1 - g) * cache.to(acc)
    if residual is not None:
        out = out + residual.to(acc)
    return out.to(fresh.dtype)


def _broadcast(gate: Tensor, like: Tensor) -> Tensor:
    """[B] (or [B,1,...]) -> [B,1,...,1] against `like`; one value -> 0-d."""
    if gate.numel() == 1:
        return gate.reshape(())
    return gate.reshape((-1,) + (1,) * (like.dim() - 1))


def _check(fresh, cache, gate, residual) -> None:
    V.check_tensor(fresh, "fresh", OP)
    V.check_like(fresh, "fresh", cache, "cache", OP)
    if residual is not None:
        V.check_like(fresh, "fresh", residual, "residual", OP)
    V.check_per_sample_shape(gate, "gate", fresh, OP)


# ---- backends: (fresh, cache, gate[acc, 0-d or B], residual) -> out -------------------

def _torch_forward(fresh, cache, gate, residual):
    return reference(fresh, cache, gate, residual)


def _torch_backward(grad, fresh, cache, gate, need_fresh, need_cache, need_gate):
    acc = V.acc_dtype(fresh.dtype)
    g = _broadcast(gate, fresh)
    grad32 = grad.to(acc)
    d_fresh = (g * grad32).to(fresh.dtype) if need_fresh else fresh.new_empty(0)
    d_cache = ((1 - g) * grad32).to(fresh.dtype) if need_cache else fresh.new_empty(0)
    if need_gate:
        term = grad32 * (fresh.to(acc) - cache.to(acc))
        # flatten(1), not reshape(B, -1): also right for empty and 1-d data
        d_gate = term.sum() if gate.dim() == 0 else (term.flatten(1).sum(1) if term.dim() > 1 else term)
    else:
        d_gate = gate.new_empty(0)
    return d_fresh, d_cache, d_gate


FORWARD = backend_impl(OP, "forward", torch_impl=_torch_forward)
BACKWARD = backend_impl(OP, "backward", torch_impl=_torch_backward)


# ---- the registered ops (torch.compile) and the eager Function -----------------------

def _forward(fresh: Tensor, cache: Tensor, gate: Tensor, residual: Optional[Tensor], backend: str) -> Tensor:
    if backend != "cpu":  # the CPU kernel checks for NaN gates itself, at no cost
        V.check_no_nan(gate, "gate", OP)
    fresh, cache, residual = V.dense(fresh, cache, residual)
    return V.in_layout_of(FORWARD[backend](fresh, cache, V.per_sample(gate, fresh), residual), fresh)


@torch.library.custom_op("shortcut_kernels::gated_blend", mutates_args=())
def gated_blend_op(fresh: Tensor, cache: Tensor, gate: Tensor, residual: Optional[Tensor], backend: str) -> Tensor:
    return _forward(fresh, cache, gate, residual, backend)


@gated_blend_op.register_fake
def _(fresh, cache, gate, residual, backend):
    _check(fresh, cache, gate, residual)
    return torch.empty_like(V.dense(fresh, cache, residual)[0])


def _backward_kernels(grad: Tensor, fresh: Tensor, cache: Tensor, gate: Tensor, need_fresh: bool,
                      need_cache: bool, need_gate: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    grad, fresh, cache = V.dense(grad, fresh, cache)
    d_fresh, d_cache, d_gate = BACKWARD[backend](grad, fresh, cache, V.per_sample(gate, fresh),
                                                 need_fresh, need_cache, need_gate)
    return V.in_layout_of(d_fresh, fresh), V.in_layout_of(d_cache, cache), d_gate


gated_blend_backward_op = torch.library.custom_op(
    "shortcut_kernels::gated_blend_backward", _backward_kernels, mutates_args=())


@gated_blend_backward_op.register_fake
def _(grad, fresh, cache, gate, need_fresh, need_cache, need_gate, backend):
    grad, fresh, cache = V.dense(grad, fresh, cache)
    g = V.per_sample(gate, fresh)
    return (torch.empty_like(fresh) if need_fresh else fresh.new_empty(0),
            torch.empty_like(cache) if need_cache else fresh.new_empty(0),
            torch.empty_like(g) if need_gate else g.new_empty(0))


def _setup_context(ctx, inputs, output):
    fresh, cache, gate, residual, backend = inputs
    ctx.backend = backend
    ctx.gate_shape, ctx.gate_dtype = gate.shape, gate.dtype
    ctx.has_residual = residual is not None
    # fresh and cache are only needed for the gate gradient: keep them only then.
    if gate.requires_grad:
        ctx.save_for_backward(gate, fresh, cache)
    else:
        ctx.save_for_backward(gate)


def _backward(ctx, kernels, grad):
    need_fresh, need_cache, need_gate = ctx.needs_input_grad[:3]
    need_residual = ctx.has_residual and ctx.needs_input_grad[3]
    gate, *saved = ctx.saved_tensors
    fresh, cache = saved if saved else (grad, grad)  # placeholders: not read without need_gate
    d_fresh = d_cache = d_gate = None
    if need_fresh or need_cache or need_gate:
        d_fresh, d_cache, d_gate = kernels(grad, fresh, cache, gate.detach(), need_fresh, need_cache,
                                           need_gate, ctx.backend)
        d_gate = d_gate.reshape(ctx.gate_shape).to(ctx.gate_dtype) if need_gate else None
    return (d_fresh if need_fresh else None, d_cache if need_cache else None, d_gate,
            grad if need_residual else None)


_GatedBlend = differentiable(gated_blend_op, "GatedBlend", _forward, _setup_context, _backward,
                             _backward_kernels, gated_blend_backward_op)


def gated_blend(fresh: Tensor, cache: Tensor, gate: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """`residual + gate*fresh + (1-gate)*cache` in one pass.

    Args:
        fresh: the block's freshly computed output, any shape with the batch first.
        cache: the cached output of the same block (same shape, dtype, device).
        gate: a 0-d tensor, or one value per sample (shape [B]); may require grad.
        residual: optional tensor added to the blend (same shape as `fresh`).
    """
    _check(fresh, cache, gate, residual)
    return call(gated_blend_op, _GatedBlend, fresh, cache, gate, residual, select_backend(fresh))
