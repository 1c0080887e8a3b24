"""guided_step: classifier-free guidance fused with a linear sampler update.

    x_prev = a * x + b * (eps_uncond + w * (eps_cond - eps_uncond))

One read of each input and one write, instead of five kernels per sampling step.
`a` and `b` are Python floats (the common case: no tensor is created per call) or
tensors, 0-d or one value per sample ([B] or [B,1,...,1]); `w` is the guidance scale.
The registered op takes each coefficient twice, `Tensor? a` and `float a_scalar` (a
tensor given overrides the scalar). The backward is one fused pass writing only the
gradients needed: dx = a*g, d_eps_uncond = b*(1-w)*g, d_eps_cond = b*w*g; when a or b
are tensors that require grad, da = sum(g*x) and db = sum(g*guided_eps) per sample
(or in total for one value) come from torch ops (a rare path).
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _validate as V
from ._dispatch import AUTOGRAD, DIRECT, backend_impl, call_path, eager_autograd, fast_kernel, select_backend

OP = "guided_step"

Coef = Union[float, Tensor]


def reference(x: Tensor, eps_uncond: Tensor, eps_cond: Tensor, a: Coef, b: Coef, w: float) -> Tensor:
    """The definition in plain torch: fp32 (fp64 for fp64) math, result in x.dtype."""
    acc = V.acc_dtype(x.dtype)
    a = _broadcast(a.to(acc), x) if isinstance(a, Tensor) else a
    b = _broadcast(b.to(acc), x) if isinstance(b, Tensor) else b
    uncond = eps_uncond.to(acc)
    guided = uncond + w * (eps_cond.to(acc) - uncond)
    return (a * x.to(acc) + b * guided).to(x.dtype)


def _broadcast(coef: Tensor, like: Tensor) -> Tensor:
    """[B] (or [B,1,...]) -> [B,1,...,1] against `like`; one value -> 0-d."""
    if coef.numel() == 1:
        return coef.reshape(())
    return coef.reshape((-1,) + (1,) * (like.dim() - 1))


def _check_coef(coef, name: str, x: Tensor) -> None:
    """A float, or a 0-d/[B] tensor (None: the registered op's "use the scalar")."""
    if isinstance(coef, Tensor):
        V.check_per_sample_shape(coef, name, x, OP)
    elif coef is not None:
        _scalar(coef, name)


def _check(x, eps_uncond, eps_cond, a, b) -> None:
    V.check_tensor(x, "x", OP)
    V.check_like(x, "x", eps_uncond, "eps_uncond", OP)
    V.check_like(x, "x", eps_cond, "eps_cond", OP)
    _check_coef(a, "a", x)
    _check_coef(b, "b", x)


def _scalar(value, name: str, expected: str = "a float or a tensor") -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{OP}: `{name}` must be {expected}, got {type(value).__name__}")


def _plain(coef, x: Tensor) -> bool:
    """A coefficient the C++ op takes as it is: a float or int, or an acc-dtype tensor."""
    return type(coef) in (float, int) or V.is_kernel_coef(coef, x)


def _split(coef, name: str):
    """A public coefficient -> (tensor or None, float) for the registered op."""
    if isinstance(coef, Tensor):
        return coef, 1.0
    return None, _scalar(coef, name)


# ---- backends: (x, eps_uncond, eps_cond, a, b [acc, 0-d or B, or None], a_scalar, b_scalar, w)

def _coef_or_scalar(coef: Optional[Tensor], scalar: float):
    return scalar if coef is None else coef


def _torch_forward(x, eps_uncond, eps_cond, a, b, a_scalar, b_scalar, w):
    return reference(x, eps_uncond, eps_cond, _coef_or_scalar(a, a_scalar), _coef_or_scalar(b, b_scalar), w)


def _torch_backward(grad, a, b, a_scalar, b_scalar, w, need_x, need_eps_uncond, need_eps_cond):
    acc = V.acc_dtype(grad.dtype)
    av = _broadcast(a, grad) if a is not None else a_scalar
    bv = _broadcast(b, grad) if b is not None else b_scalar
    grad32 = grad.to(acc)
    d_x = (av * grad32).to(grad.dtype) if need_x else grad.new_empty(0)
    d_uncond = (bv * (1 - w) * grad32).to(grad.dtype) if need_eps_uncond else grad.new_empty(0)
    d_cond = (bv * w * grad32).to(grad.dtype) if need_eps_cond else grad.new_empty(0)
    return d_x, d_uncond, d_cond


FORWARD = backend_impl(OP, "forward", torch_impl=_torch_forward)
BACKWARD = backend_impl(OP, "backward", torch_impl=_torch_backward)


# ---- the registered ops -------------------------------------------------------------

def _per_sample(coef: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    return None if coef is None else V.per_sample(coef, ref)


def _forward(x: Tensor, eps_uncond: Tensor, eps_cond: Tensor, a: Optional[Tensor], b: Optional[Tensor],
             a_scalar: float, b_scalar: float, w: float) -> Tensor:
    x, eps_uncond, eps_cond = V.dense(x, eps_uncond, eps_cond)
    backend = select_backend(x)
    return FORWARD[backend](x, eps_uncond, eps_cond, _per_sample(a, x), _per_sample(b, x),
                            a_scalar, b_scalar, w)


@torch.library.custom_op("shortcut_kernels::guided_step", mutates_args=())
def guided_step_op(x: Tensor, eps_uncond: Tensor, eps_cond: Tensor, a: Optional[Tensor],
                   b: Optional[Tensor], a_scalar: float, b_scalar: float, w: float) -> Tensor:
    return _forward(x, eps_uncond, eps_cond, a, b, a_scalar, b_scalar, w)


@guided_step_op.register_fake
def _(x, eps_uncond, eps_cond, a, b, a_scalar, b_scalar, w):
    _check(x, eps_uncond, eps_cond, a, b)
    return torch.empty_like(V.dense(x, eps_uncond, eps_cond)[0])


def _backward_kernels(grad: Tensor, a: Optional[Tensor], b: Optional[Tensor], a_scalar: float,
                      b_scalar: float, w: float, need_x: bool, need_eps_uncond: bool,
                      need_eps_cond: bool) -> tuple[Tensor, Tensor, Tensor]:
    (grad,) = V.dense(grad)
    backend = select_backend(grad)
    return BACKWARD[backend](grad, _per_sample(a, grad), _per_sample(b, grad), a_scalar, b_scalar, w,
                             need_x, need_eps_uncond, need_eps_cond)


guided_step_backward_op = torch.library.custom_op(
    "shortcut_kernels::guided_step_backward", _backward_kernels, mutates_args=())


@guided_step_backward_op.register_fake
def _(grad, a, b, a_scalar, b_scalar, w, need_x, need_eps_uncond, need_eps_cond):
    (grad,) = V.dense(grad)
    return tuple(torch.empty_like(grad) if need else grad.new_empty(0)
                 for need in (need_x, need_eps_uncond, need_eps_cond))


def _setup_context(ctx, inputs, output):
    x, eps_uncond, eps_cond, a, b, a_scalar, b_scalar, w = inputs
    ctx.scalars = (a_scalar, b_scalar, w)
    need_a = a is not None and a.requires_grad
    need_b = b is not None and b.requires_grad
    # The data is only needed for da (x) and db (eps): keep it only then.
    ctx.save_for_backward(a, b, x if need_a else None, eps_uncond if need_b else None,
                          eps_cond if need_b else None)


def _coef_grad(term: Tensor, coef: Tensor) -> Tensor:
    """Sum of `term` per sample for a [B]-like coefficient, in total for one value."""
    if coef.numel() == 1:
        total = term.sum()
    else:  # flatten(1), not reshape(B, -1): also right for empty and 1-d data
        total = term.flatten(1).sum(1) if term.dim() > 1 else term
    return total.reshape(coef.shape).to(coef.dtype)


def _make_backward(backward_kernels):
    def backward(ctx, grad):
        need_x, need_uncond, need_cond, need_a, need_b = ctx.needs_input_grad[:5]
        a, b, x, eps_uncond, eps_cond = ctx.saved_tensors
        a_scalar, b_scalar, w = ctx.scalars
        d_x = d_uncond = d_cond = d_a = d_b = None
        if need_x or need_uncond or need_cond:
            d_x, d_uncond, d_cond = backward_kernels(
                grad, None if a is None else a.detach(), None if b is None else b.detach(),
                a_scalar, b_scalar, w, need_x, need_uncond, need_cond)
        if need_a or need_b:
            acc = V.acc_dtype(grad.dtype)
            grad32 = grad.to(acc)
            if need_a:
                d_a = _coef_grad(grad32 * x.to(acc), a)
            if need_b:
                uncond = eps_uncond.to(acc)
                d_b = _coef_grad(grad32 * (uncond + w * (eps_cond.to(acc) - uncond)), b)
        return (d_x if need_x else None, d_uncond if need_uncond else None, d_cond if need_cond else None,
                d_a, d_b, None, None, None)
    return backward


_registered_backward = _make_backward(guided_step_backward_op)
guided_step_op.register_autograd(_registered_backward, setup_context=_setup_context)
_GuidedStepEager = eager_autograd("GuidedStep", _forward, _setup_context,
                                  _make_backward(_backward_kernels), _registered_backward)


def guided_step(x: Tensor, eps_uncond: Tensor, eps_cond: Tensor, a: Coef, b: Coef, w: float) -> Tensor:
    """`a*x + b*(eps_uncond + w*(eps_cond - eps_uncond))` in one pass.

    Args:
        x: the current sample x_t, any shape with the batch first.
        eps_uncond: the unconditional model output (same shape, dtype, device as `x`);
            often one half of `out.chunk(2)`.
        eps_cond: the conditional model output (same shape, dtype, device).
        a: a float, or a tensor: 0-d or one value per sample ([B] or [B,1,...,1]);
            may require grad.
        b: like `a`.
        w: the guidance scale, a float.
    """
    kernel = fast_kernel(FORWARD, x, eps_uncond, eps_cond, a if type(a) is Tensor else None,
                         b if type(b) is Tensor else None)
    if kernel is not None and type(w) in (float, int) and _plain(a, x) and _plain(b, x):
        (a_t, a_s), (b_t, b_s) = _split(a, "a"), _split(b, "b")
        try:
            return kernel(x, eps_uncond, eps_cond, a_t, b_t, a_s, b_s, w)
        except Exception:  # noqa: BLE001  the full path below explains, or converts
            pass
    _check(x, eps_uncond, eps_cond, a, b)  # before the schema's own, less helpful, checks
    a_t, a_s = _split(a, "a")
    b_t, b_s = _split(b, "b")
    w = _scalar(w, "w", "a Python float (the guidance scale)")
    path = call_path(x, eps_uncond, eps_cond, a_t, b_t)
    if path == DIRECT:
        return _forward(x, eps_uncond, eps_cond, a_t, b_t, a_s, b_s, w)
    if path == AUTOGRAD:
        return _GuidedStepEager.apply(x, eps_uncond, eps_cond, a_t, b_t, a_s, b_s, w)
    return guided_step_op(x, eps_uncond, eps_cond, a_t, b_t, a_s, b_s, w)
