"""cache_residual: a pruned block (or a run of consecutive pruned blocks) at inference.

    out = x + caches[0] + ... + caches[K-1]
    out = x + w[0]*caches[0] + ... + w[K-1]*caches[K-1]      (with `weights`)

in one pass: every input is read once, the output written once, and each element is
summed in fp32 (fp64 for fp64) and rounded once. A run of K pruned DiT blocks whose
cached deltas are reused is one call instead of K additions; with weights, a forecast
reuse (an extrapolation from a block's last computed residuals, runtime/forecast.py) is
one call too. `weights` is a 1-D tensor on x's device (one value per cache, any float
dtype, used in the accumulation dtype): a tensor input, so torch.compile does not
recompile for new values, and the GPU kernels read it on the device (no host sync).
Without weights the op is the plain sum, bit for bit.

The backward needs no kernel: dx = g, d caches[k] = g (w[k]*g with weights) and, when
the weights require grad, d w[k] = sum(g * caches[k]) in the accumulation dtype.

Elementwise, so any dense layout works as it is (channels_last is kept); mixed or
strided layouts are copied to contiguous once.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _validate as V
from ._dispatch import backend_impl, differentiable, eager, select_backend

OP = "cache_residual"


def reference(x: Tensor, caches: Sequence[Tensor], weights: Optional[Tensor] = None) -> Tensor:
    """The definition in plain torch: fp32 (fp64 for fp64) math, left to right, result
    in x.dtype."""
    acc = V.acc_dtype(x.dtype)
    out = x.to(acc)
    if weights is None:
        for cache in caches:
            out = out + cache.to(acc)
    else:
        w = weights.to(acc)
        for k, cache in enumerate(caches):
            out = out + w[k] * cache.to(acc)
    return out.to(x.dtype)


def _as_list(caches) -> list:
    """A single tensor is accepted as [tensor]."""
    if isinstance(caches, Tensor):
        return [caches]
    if not isinstance(caches, (list, tuple)):
        raise TypeError(f"{OP}: `caches` must be a tensor or a list/tuple of tensors, got {type(caches).__name__}")
    return list(caches)


def _check(x, caches, weights=None) -> None:
    V.check_tensor(x, "x", OP)
    if len(caches) == 0:
        raise ValueError(f"{OP}: `caches` must hold at least one tensor")
    for i, cache in enumerate(caches):
        V.check_like(x, "x", cache, f"caches[{i}]", OP)
    if weights is not None:
        _check_weights(weights, len(caches), x)


def _check_weights(weights, count: int, x: Tensor) -> None:
    if not isinstance(weights, Tensor):
        raise TypeError(f"{OP}: `weights` must be a 1-D tensor (one value per cache) or None, "
                        f"got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"{OP}: `weights` must be a floating-point tensor, got {weights.dtype}")
    if weights.dim() != 1 or weights.shape[0] != count:
        raise ValueError(f"{OP}: `weights` must have shape [{count}] (one value per cache), "
                         f"got shape {tuple(weights.shape)}")
    if weights.device != x.device:
        raise ValueError(f"{OP}: `weights` is on {weights.device} but `x` is on {x.device}")


def _acc_weights(weights: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """None, or the weights as the kernels take them: contiguous, in the accumulation dtype."""
    if weights is None:
        return None
    acc = V.acc_dtype(x.dtype)
    if weights.dtype == acc and weights.is_contiguous():
        return weights.detach()  # the common case (the runtime makes them so): no new tensor
    return weights.detach().to(acc).contiguous()


# ---- backends: (x, caches, weights [acc, 1-D, or None]) -> out, all in one dense layout

def _torch_forward(x, caches, weights=None):
    return reference(x, caches, weights)


FORWARD = backend_impl(OP, "forward", torch_impl=_torch_forward)


# ---- the registered op (torch.compile) and the eager Function ------------------------

def _forward(x: Tensor, caches: list[Tensor], weights: Optional[Tensor], backend: str) -> Tensor:
    x, *caches = V.dense(x, *caches)
    weights = _acc_weights(weights, x)
    out = FORWARD[backend](x, caches) if weights is None else FORWARD[backend](x, caches, weights)
    return V.in_layout_of(out, x)


# `weights` comes after the backend (with a default) so that calls without it keep their form.
@torch.library.custom_op("shortcut_kernels::cache_residual", mutates_args=())
def cache_residual_op(x: Tensor, caches: list[Tensor], backend: str, weights: Optional[Tensor] = None) -> Tensor:
    return _forward(x, caches, weights, backend)


@cache_residual_op.register_fake
def _(x, caches, backend, weights=None):
    _check(x, caches, weights)
    return torch.empty_like(V.dense(x, *caches)[0])  # the layout the kernels write


def _inputs(inputs) -> tuple:
    """(x, caches, weights, backend) of the registered op's inputs (x, caches, backend,
    weights) or the Function's (x, weights, backend, *caches)."""
    if isinstance(inputs[1], (list, tuple)):
        x, caches, backend, *rest = inputs
        return x, list(caches), (rest[0] if rest else None), backend
    x, weights, backend, *caches = inputs
    return x, caches, weights, backend


def _setup_context(ctx, inputs, output):
    x, caches, weights, backend = _inputs(inputs)
    ctx.weighted = weights is not None
    if not ctx.weighted:
        return  # every gradient is g: nothing saved
    ctx.weights_dtype = weights.dtype
    ctx.cache_dtypes = [c.dtype for c in caches]
    # The caches are only needed for the weights' gradient: keep them only then.
    if weights.requires_grad:
        ctx.save_for_backward(weights, *caches)
    else:
        ctx.save_for_backward(weights)


def _backward(ctx, kernels, grad):
    """dx = g; d caches[k] = g (w[k]*g with weights); d w[k] = sum(g*caches[k]). No kernel."""
    flags = ctx.needs_input_grad
    op = isinstance(flags[1], (list, tuple))  # the registered op: one flag per cache
    if op:
        need_x, need_caches = flags[0], list(flags[1])
        need_weights = ctx.weighted and len(flags) > 3 and flags[3]
    else:  # the Function: (x, weights, backend, *caches)
        need_x, need_weights, need_caches = flags[0], ctx.weighted and flags[1], list(flags[3:])
    d_x = grad if need_x else None
    d_weights = None
    if not ctx.weighted:
        d_caches = [grad if need else None for need in need_caches]
    else:
        weights, *caches = ctx.saved_tensors
        acc = V.acc_dtype(grad.dtype)
        grad_acc = grad.to(acc)
        w = weights.to(acc)
        d_caches = [(w[k] * grad_acc).to(ctx.cache_dtypes[k]) if need else None
                    for k, need in enumerate(need_caches)]
        if need_weights:
            d_weights = torch.stack([(grad_acc * c.to(acc)).sum() for c in caches]).to(ctx.weights_dtype)
    if op:
        return d_x, d_caches, None, d_weights
    return (d_x, d_weights, None, *d_caches)


# A Function does not see tensors inside a list: it takes (x, weights, backend, *caches).
_CacheResidual = differentiable(cache_residual_op, "CacheResidual",
                                lambda x, weights, backend, *caches: _forward(x, list(caches), weights, backend),
                                _setup_context, _backward, None, None)


def cache_residual(x: Tensor, caches: Union[Tensor, Sequence[Tensor]], weights: Optional[Tensor] = None) -> Tensor:
    """`x + sum(caches)` (`x + sum(w[k] * caches[k])` with weights) in one pass: the residual
    of pruned blocks reusing their caches, or a forecast from them.

    Args:
        x: the input of the first pruned block, any shape.
        caches: the cached deltas (or outputs) to add: a list/tuple of one or more
            tensors like `x` (same shape, dtype, device), or a single tensor.
        weights: optional 1-D floating-point tensor on x's device, one weight per cache
            (used in fp32, fp64 for fp64 `x`); may require grad. None: every weight 1.
    """
    caches = _as_list(caches)
    _check(x, caches, weights)  # before the schema's own, less helpful, checks
    backend = select_backend(x)
    if torch.compiler.is_compiling():
        if weights is None:
            return cache_residual_op(x, caches, backend)
        return cache_residual_op(x, caches, backend, weights)
    return eager(_CacheResidual, x, weights, backend, *caches)
