"""gated_residual: the adaLN-Zero residual of DiT blocks.

    out = x + gate * y            (out = x + y without a gate)

x and y are [B, ..., C] (usually [B, N, C] tokens, or [B, C]); `gate` is [B, C] or
[B, 1, C], broadcast over the token dims. With `cache_out` the delta gate*y is also
written, in the same pass, into that preallocated tensor (DiP-GO caches a block's delta
to reuse it at later steps). The backward is one fused pass: dx = g (returned as is),
dy = gate*g and d_gate[b, c] = sum over tokens of g*y, a deterministic reduction (fixed
chunks of tokens, then a fixed-order sum of the partials).

The kernels view x as [B, T, C] with C innermost: inputs in another layout (a transposed
view, channels_last) are copied to contiguous once.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _validate as V
from ._dispatch import backend_impl, differentiable, eager, select_backend

OP = "gated_residual"


def reference(x: Tensor, y: Tensor, gate: Optional[Tensor] = None) -> Tensor:
    """The definition in plain torch: fp32 (fp64 for fp64) math, result in x.dtype."""
    return (x.to(V.acc_dtype(x.dtype)) + _delta(y, gate)).to(x.dtype)


def _delta(y: Tensor, gate: Optional[Tensor]) -> Tensor:
    """gate*y in the accumulation dtype (y itself without a gate)."""
    acc = V.acc_dtype(y.dtype)
    if gate is None:
        return y.to(acc)
    return _broadcast(gate.to(acc), y) * y.to(acc)


def _broadcast(gate: Tensor, like: Tensor) -> Tensor:
    """[B, C] (or [B, 1, C]) -> [B, 1, ..., 1, C] against `like`."""
    return gate.reshape((like.shape[0],) + (1,) * (like.dim() - 2) + (like.shape[-1],))


def _check(x, y, gate, cache_out=None) -> None:
    V.check_tensor(x, "x", OP)
    V.check_like(x, "x", y, "y", OP)
    if cache_out is not None:
        V.check_like(x, "x", cache_out, "cache_out", OP)
    if gate is None:
        return
    V.check_tensor(gate, "gate", OP)
    if gate.device != x.device:
        raise ValueError(f"{OP}: `gate` is on {gate.device} but the data is on {x.device}")
    if x.dim() < 2:
        raise ValueError(f"{OP}: with a gate `x` must be [B, ..., C], got shape {tuple(x.shape)}")
    batch, channels = x.shape[0], x.shape[-1]
    shapes = [(batch, channels)] + ([(batch, 1, channels)] if x.dim() >= 3 else [])
    if tuple(gate.shape) not in shapes:
        wanted = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{OP}: `gate` must have shape {wanted} (one value per sample and channel, "
                         f"broadcast over the tokens), got shape {tuple(gate.shape)}")


def _gate(gate: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    """Shape-checked gate -> contiguous acc-dtype [B, C] tensor (None stays None)."""
    if gate is None:
        return None
    acc = V.acc_dtype(ref.dtype)
    if gate.dtype == acc and gate.dim() == 2 and gate.is_contiguous():
        return gate  # the common case, no new tensor (kernels run below autograd)
    return gate.detach().to(acc).reshape(ref.shape[0], ref.shape[-1]).contiguous()


def _contiguous(*tensors):
    """C must be the innermost dim: anything not contiguous is copied once."""
    return [t if t is None or t.is_contiguous() else t.contiguous() for t in tensors]


# ---- backends: (x, y, gate[acc, B x C] or None, cache_out or None) -> out --------------

def _torch_forward(x, y, gate, cache_out=None):
    delta = _delta(y, gate)
    if cache_out is not None:
        cache_out.copy_(delta)
    return (x.to(delta.dtype) + delta).to(x.dtype)


def _torch_backward(grad, y, gate, need_y, need_gate):
    acc = V.acc_dtype(y.dtype)
    if gate is None:
        if need_gate:
            raise ValueError(f"{OP}: need_gate without a `gate`")
        return (grad.clone() if need_y else y.new_empty(0)), y.new_empty(0, dtype=acc)
    grad32 = grad.to(acc)
    d_y = (_broadcast(gate, y) * grad32).to(y.dtype) if need_y else y.new_empty(0)
    if need_gate:
        term = grad32 * y.to(acc)
        # [B, T, C] by flatten/unsqueeze, not reshape(B, -1, C): also right for empty data
        d_gate = (term.flatten(1, -2) if term.dim() > 2 else term.unsqueeze(1)).sum(1)
    else:
        d_gate = gate.new_empty(0)
    return d_y, d_gate


FORWARD = backend_impl(OP, "forward", torch_impl=_torch_forward)
BACKWARD = backend_impl(OP, "backward", torch_impl=_torch_backward)


# ---- the registered ops (torch.compile) and the eager Function -----------------------

def _forward(x: Tensor, y: Tensor, gate: Optional[Tensor], cache_out: Optional[Tensor], backend: str) -> Tensor:
    x, y = _contiguous(x, y)
    target = cache_out
    if cache_out is not None and not cache_out.is_contiguous():
        target = torch.empty_like(x)  # the kernels write a contiguous delta...
    out = FORWARD[backend](x, y, _gate(gate, x), target)
    if target is not cache_out:
        cache_out.copy_(target)  # ...copied back into the user's tensor
    return V.in_layout_of(out, x)


def _fake_output(x, y, gate, cache_out=None):
    _check(x, y, gate, cache_out)
    return torch.empty_like(x.contiguous())


@torch.library.custom_op("shortcut_kernels::gated_residual", mutates_args=())
def gated_residual_op(x: Tensor, y: Tensor, gate: Optional[Tensor], backend: str) -> Tensor:
    return _forward(x, y, gate, None, backend)


@gated_residual_op.register_fake
def _(x, y, gate, backend):
    return _fake_output(x, y, gate)


@torch.library.custom_op("shortcut_kernels::gated_residual_cache_", mutates_args=("cache_out",))
def gated_residual_cache_op(x: Tensor, y: Tensor, gate: Optional[Tensor], cache_out: Tensor, backend: str) -> Tensor:
    """Inference form: also writes gate*y into cache_out. No autograd."""
    return _forward(x, y, gate, cache_out, backend)


@gated_residual_cache_op.register_fake
def _(x, y, gate, cache_out, backend):
    return _fake_output(x, y, gate, cache_out)


def _backward_kernels(grad: Tensor, y: Tensor, gate: Optional[Tensor], need_y: bool, need_gate: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    grad, y = _contiguous(grad, y)
    d_y, d_gate = BACKWARD[backend](grad, y, _gate(gate, y), need_y, need_gate)
    return V.in_layout_of(d_y, y), d_gate


gated_residual_backward_op = torch.library.custom_op(
    "shortcut_kernels::gated_residual_backward", _backward_kernels, mutates_args=())


@gated_residual_backward_op.register_fake
def _(grad, y, gate, need_y, need_gate, backend):
    acc = V.acc_dtype(y.dtype)
    d_gate_shape = (y.shape[0], y.shape[-1]) if need_gate else (0,)
    return (torch.empty_like(y.contiguous()) if need_y else y.new_empty(0),
            y.new_empty(d_gate_shape, dtype=acc))


def _setup_context(ctx, inputs, output):
    # inputs: (x, y, gate, backend), or (x, y, gate, cache_out, backend) for the Function
    x, y, gate, backend = inputs[0], inputs[1], inputs[2], inputs[-1]
    ctx.backend = backend
    ctx.has_gate = gate is not None
    if gate is not None:
        ctx.gate_shape, ctx.gate_dtype = gate.shape, gate.dtype
        # y is only needed for the gate gradient: keep it only then.
        ctx.save_for_backward(gate, y if gate.requires_grad else None)


def _backward(ctx, kernels, grad):
    need_x, need_y, need_gate = ctx.needs_input_grad[:3]
    d_x = grad if need_x else None  # out = x + ...: dx is g itself, no kernel
    if not ctx.has_gate:
        return d_x, (grad if need_y else None), None
    gate, y = ctx.saved_tensors
    d_y = d_gate = None
    if need_y or need_gate:
        d_y, d_gate = kernels(grad, grad if y is None else y, gate.detach(), need_y, need_gate, ctx.backend)
        d_gate = d_gate.reshape(ctx.gate_shape).to(ctx.gate_dtype) if need_gate else None
    return d_x, (d_y if need_y else None), d_gate


# Eagerly the Function takes cache_out too: its forward writes the delta in the same pass
# (the cache is a detached copy, never part of the graph).
_GatedResidual = differentiable(gated_residual_op, "GatedResidual", _forward, _setup_context, _backward,
                                _backward_kernels, gated_residual_backward_op)


def gated_residual(x: Tensor, y: Tensor, gate: Optional[Tensor] = None,
                   cache_out: Optional[Tensor] = None) -> Tensor:
    """`x + gate*y` in one pass (the adaLN-Zero residual), optionally caching `gate*y`.

    Args:
        x: the residual stream, [B, ..., C] (e.g. [B, N, C] tokens).
        y: the block's output (same shape, dtype, device as `x`).
        gate: None (then `x + y`), or [B, C] / [B, 1, C] in any float dtype, broadcast
            over the token dims; may require grad.
        cache_out: optional preallocated tensor like `x` that receives the delta
            `gate*y` (rounded to x.dtype) in the same pass, for DiP-GO's feature cache.
            It never carries gradients.

    Under torch.compile a call with `cache_out` and no input requiring grad is the
    mutating op shortcut_kernels::gated_residual_cache_; when an input requires grad the
    output comes from the differentiable op and the delta is written separately.
    """
    _check(x, y, gate, cache_out)  # before the schema's own, less helpful, checks
    if cache_out is not None and cache_out.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{OP}: `cache_out` must not require grad (it receives a detached delta)")
    backend = select_backend(x)
    if not torch.compiler.is_compiling():
        return eager(_GatedResidual, x, y, gate, cache_out, backend)
    if cache_out is None:
        return gated_residual_op(x, y, gate, backend)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, y, gate))):
        return gated_residual_cache_op(x, y, gate, cache_out, backend)  # the graph must see the op
    out = gated_residual_op(x, y, gate, backend)
    with torch.no_grad():
        cache_out.copy_(_delta(y.detach(), None if gate is None else gate.detach()))
    return out
