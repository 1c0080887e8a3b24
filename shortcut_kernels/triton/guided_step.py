"""guided_step in Triton: x_prev = a*x + b*(eps_u + w*(eps_c - eps_u)).

a and b are Python floats (kernel scalars) or acc-dtype tensors, 0-d or one value per
sample ([B]). Grid axis 1 walks the samples (one scalar load per program for a [B]
coefficient), axis 0 the blocks of one sample; with no [B] coefficient the whole tensor
is one "sample". Scalars reach the kernel as fp32, so fp64 inputs get their scalars as
fp64 tensors instead (a rare path: no tensor is created for the other dtypes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_type, check_grid_samples, elementwise_configs

BACKWARD_BLOCK = 2048


@triton.jit
def _coef(ptr, scalar, sample, stride, FROM_PTR: tl.constexpr, ACC: tl.constexpr):
    if FROM_PTR:
        value = tl.load(ptr + sample * stride).to(ACC)
    else:
        value = scalar
    return value


@triton.jit
def _block(a_ptr, b_ptr, w_ptr, a_scalar, b_scalar, w_scalar, a_stride, b_stride, per_sample,
           A_PTR: tl.constexpr, B_PTR: tl.constexpr, W_PTR: tl.constexpr, ACC: tl.constexpr,
           BLOCK: tl.constexpr):
    """This program's offsets and mask within its sample, and the sample's a, b and w."""
    sample = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < per_sample
    offsets += sample * per_sample
    a = _coef(a_ptr, a_scalar, sample, a_stride, A_PTR, ACC)
    b = _coef(b_ptr, b_scalar, sample, b_stride, B_PTR, ACC)
    w = _coef(w_ptr, w_scalar, sample, 0, W_PTR, ACC)
    return offsets, mask, a, b, w


@triton.autotune(configs=elementwise_configs(), key=["per_sample"])
@triton.jit
def _forward_kernel(x_ptr, uncond_ptr, cond_ptr, out_ptr, a_ptr, b_ptr, w_ptr, a_scalar, b_scalar,
                    w_scalar, a_stride, b_stride, per_sample, A_PTR: tl.constexpr,
                    B_PTR: tl.constexpr, W_PTR: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    offsets, mask, a, b, w = _block(a_ptr, b_ptr, w_ptr, a_scalar, b_scalar, w_scalar, a_stride, b_stride,
                                    per_sample, A_PTR, B_PTR, W_PTR, ACC, BLOCK)
    x = tl.load(x_ptr + offsets, mask=mask).to(ACC)
    uncond = tl.load(uncond_ptr + offsets, mask=mask).to(ACC)
    cond = tl.load(cond_ptr + offsets, mask=mask).to(ACC)
    out = a * x + b * (uncond + w * (cond - uncond))  # same form as csrc/shortcut_math.h
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, d_x_ptr, d_uncond_ptr, d_cond_ptr, a_ptr, b_ptr, w_ptr, a_scalar,
                     b_scalar, w_scalar, a_stride, b_stride, per_sample, NEED_X: tl.constexpr,
                     NEED_UNCOND: tl.constexpr, NEED_COND: tl.constexpr, A_PTR: tl.constexpr,
                     B_PTR: tl.constexpr, W_PTR: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr):
    offsets, mask, a, b, w = _block(a_ptr, b_ptr, w_ptr, a_scalar, b_scalar, w_scalar, a_stride, b_stride,
                                    per_sample, A_PTR, B_PTR, W_PTR, ACC, BLOCK)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(ACC)
    if NEED_X:
        tl.store(d_x_ptr + offsets, (a * grad).to(d_x_ptr.dtype.element_ty), mask=mask)
    if NEED_UNCOND:
        tl.store(d_uncond_ptr + offsets, (b * (1.0 - w) * grad).to(d_uncond_ptr.dtype.element_ty), mask=mask)
    if NEED_COND:
        tl.store(d_cond_ptr + offsets, (b * w * grad).to(d_cond_ptr.dtype.element_ty), mask=mask)


def _coef_args(ref: torch.Tensor, a, b, w, a_scalar: float, b_scalar: float, w_scalar: float):
    """(samples, kernel arguments) for the coefficients of a call on `ref`."""
    if ref.dtype == torch.float64:  # kernel scalars are fp32: pass fp64 values by pointer
        def as_tensor(value):
            return torch.tensor(value, dtype=torch.float64, device=ref.device)
        a = as_tensor(a_scalar) if a is None else a
        b = as_tensor(b_scalar) if b is None else b
        w = as_tensor(w_scalar) if w is None else w
    w_tensor = w
    a_stride = 1 if a is not None and a.numel() > 1 else 0
    b_stride = 1 if b is not None and b.numel() > 1 else 0
    samples = max(1, a.numel() if a_stride else 1, b.numel() if b_stride else 1)
    args = dict(a_ptr=a if a is not None else ref, b_ptr=b if b is not None else ref,
                w_ptr=w_tensor if w_tensor is not None else ref,
                a_scalar=float(a_scalar), b_scalar=float(b_scalar), w_scalar=float(w_scalar),
                a_stride=a_stride, b_stride=b_stride,
                A_PTR=a is not None, B_PTR=b is not None, W_PTR=w_tensor is not None)
    return samples, args


def guided_step_forward(x: torch.Tensor, eps_uncond: torch.Tensor, eps_cond: torch.Tensor,
                        a: torch.Tensor | None, b: torch.Tensor | None, w: torch.Tensor | None,
                        a_scalar: float, b_scalar: float, w_scalar: float) -> torch.Tensor:
    """x/eps_uncond/eps_cond share one dense layout; a, b (when given, overriding the
    scalars) are acc-dtype, 0-d or [B]; w (when given) acc-dtype 0-d."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    samples, coefs = _coef_args(x, a, b, w, a_scalar, b_scalar, w_scalar)
    check_grid_samples(samples, "guided_step")
    per_sample = x.numel() // samples
    grid = lambda meta: (triton.cdiv(per_sample, meta["BLOCK"]), samples)  # noqa: E731
    _forward_kernel[grid](x, eps_uncond, eps_cond, out, per_sample=per_sample,
                          ACC=acc_type(x.dtype), **coefs)
    return out


def guided_step_backward(grad: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None,
                         w: torch.Tensor | None, a_scalar: float, b_scalar: float, w_scalar: float,
                         need_x: bool, need_eps_uncond: bool, need_eps_cond: bool):
    """Returns (d_x, d_eps_uncond, d_eps_cond); entries not needed are empty tensors."""
    d_x = torch.empty_like(grad) if need_x else grad.new_empty(0)
    d_uncond = torch.empty_like(grad) if need_eps_uncond else grad.new_empty(0)
    d_cond = torch.empty_like(grad) if need_eps_cond else grad.new_empty(0)
    if grad.numel() == 0 or not (need_x or need_eps_uncond or need_eps_cond):
        return d_x, d_uncond, d_cond
    samples, coefs = _coef_args(grad, a, b, w, a_scalar, b_scalar, w_scalar)
    check_grid_samples(samples, "guided_step")
    per_sample = grad.numel() // samples
    _backward_kernel[(triton.cdiv(per_sample, BACKWARD_BLOCK), samples)](
        grad, d_x if need_x else grad, d_uncond if need_eps_uncond else grad,
        d_cond if need_eps_cond else grad, per_sample=per_sample, NEED_X=need_x,
        NEED_UNCOND=need_eps_uncond, NEED_COND=need_eps_cond, ACC=acc_type(grad.dtype),
        BLOCK=BACKWARD_BLOCK, num_warps=8, **coefs)
    return d_x, d_uncond, d_cond
