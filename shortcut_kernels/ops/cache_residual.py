"""cache_residual: a pruned block (or a run of consecutive pruned blocks) at inference.

    out = x + caches[0] + ... + caches[K-1]

in one pass: every input is read once, the output written once, and each element is
summed in fp32 (fp64 for fp64) and rounded once. A run of K pruned DiT blocks whose
cached deltas are reused is one call instead of K additions. The backward needs no
kernel: dx = g and d caches[i] = g.

Elementwise, so any dense layout works as it is (channels_last is kept); mixed or
strided layouts are copied to contiguous once.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from .. import _validate as V
from ._dispatch import backend_impl, differentiable, eager, select_backend

OP = "cache_residual"


def reference(x: Tensor, caches: Sequence[Tensor]) -> Tensor:
    """The definition in plain torch: fp32 (fp64 for fp64) math, left to right, result
    in x.dtype."""
    acc = V.acc_dtype(x.dtype)
    out = x.to(acc)
    for cache in caches:
        out = out + cache.to(acc)
    return out.to(x.dtype)


def _as_list(caches) -> list:
    """A single tensor is accepted as [tensor]."""
    if isinstance(caches, Tensor):
        return [caches]
    if not isinstance(caches, (list, tuple)):
        raise TypeError(f"{OP}: `caches` must be a tensor or a list/tuple of tensors, got {type(caches).__name__}")
    return list(caches)


def _check(x, caches) -> None:
    V.check_tensor(x, "x", OP)
    if len(caches) == 0:
        raise ValueError(f"{OP}: `caches` must hold at least one tensor")
    for i, cache in enumerate(caches):
        V.check_like(x, "x", cache, f"caches[{i}]", OP)


# ---- backends: (x, caches) -> out, all in one dense layout ---------------------------

def _torch_forward(x, caches):
    return reference(x, caches)


FORWARD = backend_impl(OP, "forward", torch_impl=_torch_forward)


# ---- the registered op (torch.compile) and the eager Function ------------------------

def _forward(x: Tensor, caches: list[Tensor], backend: str) -> Tensor:
    x, *caches = V.dense(x, *caches)
    return V.in_layout_of(FORWARD[backend](x, caches), x)


@torch.library.custom_op("shortcut_kernels::cache_residual", mutates_args=())
def cache_residual_op(x: Tensor, caches: list[Tensor], backend: str) -> Tensor:
    return _forward(x, caches, backend)


@cache_residual_op.register_fake
def _(x, caches, backend):
    _check(x, caches)
    return torch.empty_like(V.dense(x, *caches)[0])  # the layout the kernels write


def _backward(ctx, kernels, grad):
    """The gradients are g itself: no kernel, nothing saved."""
    need_x, need_caches = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if isinstance(need_caches, (list, tuple)):  # the registered op: one flag per cache
        return (grad if need_x else None), [grad if need else None for need in need_caches]
    # the Function: (x, backend, *caches)
    return (grad if need_x else None, None) + tuple(grad if need else None for need in ctx.needs_input_grad[2:])


def _setup_context(ctx, inputs, output):
    pass


# A Function does not see tensors inside a list: it takes (x, backend, *caches).
_CacheResidual = differentiable(cache_residual_op, "CacheResidual",
                                lambda x, backend, *caches: _forward(x, list(caches), backend),
                                _setup_context, _backward, None, None)


def cache_residual(x: Tensor, caches: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """`x + sum(caches)` in one pass: the residual of pruned blocks reusing their caches.

    Args:
        x: the input of the first pruned block, any shape.
        caches: the cached deltas (or outputs) to add: a list/tuple of one or more
            tensors like `x` (same shape, dtype, device), or a single tensor.
    """
    caches = _as_list(caches)
    _check(x, caches)  # before the schema's own, less helpful, checks
    backend = select_backend(x)
    if torch.compiler.is_compiling():
        return cache_residual_op(x, caches, backend)
    return eager(_CacheResidual, x, backend, *caches)
