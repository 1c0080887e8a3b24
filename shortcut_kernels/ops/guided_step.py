"""guided_step: classifier-free guidance fused with a linear sampler update.

    x_prev = a * x + b * (eps_uncond + w * (eps_cond - eps_uncond))

One read of each input and one write, instead of five kernels per sampling step.
`a`, `b` and `w` are Python floats (no tensor is created per call) or tensors: `a` and
`b` 0-d or one value per sample ([B] or [B,1,...,1]), `w` (the guidance scale) one
value. Under torch.compile pass coefficients that change from step to step as 0-d
tensors: a float is a constant of the compiled graph, so a new value recompiles.
The registered op takes each coefficient twice, `Tensor? a` and `float a_scalar` (a
tensor given overrides the scalar). The backward is one fused pass writing only the
gradients needed: dx = a*g, d_eps_uncond = b*(1-w)*g, d_eps_cond = b*w*g; when a, b or w
are tensors that require grad, da = sum(g*x), db = sum(g*guided_eps) (per sample, or in
total for one value) and dw = sum(g*b*(eps_cond - eps_uncond)) come from torch ops.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _validate as V
from ._dispatch import backend_impl, call, differentiable, select_backend

OP = "guided_step"

Coef = Union[float, Tensor]


def reference(x: Tensor, eps_uncond: Tensor, eps_cond: Tensor, a: Coef, b: Coef, w: Coef) -> Tensor:
    """The definition in plain torch: fp32 (fp64 for fp64) math, result in x.dtype."""
    acc = V.acc_dtype(x.dtype)
    a = _broadcast(a.to(acc), x) if isinstance(a, Tensor) else a
    b = _broadcast(b.to(acc), x) if isinstance(b, Tensor) else b
    w = w.to(acc).reshape(()) if isinstance(w, Tensor) else w
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


def _check(x, eps_uncond, eps_cond, a, b, w) -> None:
    V.check_tensor(x, "x", OP)
    V.check_like(x, "x", eps_uncond, "eps_uncond", OP)
    V.check_like(x, "x", eps_cond, "eps_cond", OP)
    _check_coef(a, "a", x)
    _check_coef(b, "b", x)
    if isinstance(w, Tensor):
        V.check_tensor(w, "w", OP)
        if w.numel() != 1 or w.device != x.device:
            raise ValueError(f"{OP}: `w` (the guidance scale) must be a float or a one-value tensor "
                             f"on {x.device}, got shape {tuple(w.shape)} on {w.device}")
    elif w is not None:  # None: the registered op's "use the scalar"
        _scalar(w, "w", "a float or a 0-d tensor (the guidance scale)")


def _scalar(value, name: str, expected: str = "a float or a tensor") -> float:
    if type(value) is float:  # the common case, before the (slower) abstract-class check
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{OP}: `{name}` must be {expected}, got {type(value).__name__}")


def _split(coef, name: str, expected: str = "a float or a tensor"):
    """A public coefficient -> (tensor or None, float) for the registered op."""
    if isinstance(coef, Tensor):
        return coef, 1.0
    return None, _scalar(coef, name, expected)


# ---- backends: (x, eps_uncond, eps_cond, a, b [acc, 0-d or B, or None], w [acc 0-d or None],
#                a_scalar, b_scalar, w_scalar)

def _coef_or_scalar(coef: Optional[Tensor], scalar: float):
    return scalar if coef is None else coef


def _torch_forward(x, eps_uncond, eps_cond, a, b, w, a_scalar, b_scalar, w_scalar):
    return reference(x, eps_uncond, eps_cond, _coef_or_scalar(a, a_scalar), _coef_or_scalar(b, b_scalar),
                     _coef_or_scalar(w, w_scalar))


def _torch_backward(grad, a, b, w, a_scalar, b_scalar, w_scalar, need_x, need_eps_uncond, need_eps_cond):
    acc = V.acc_dtype(grad.dtype)
    av = _broadcast(a, grad) if a is not None else a_scalar
    bv = _broadcast(b, grad) if b is not None else b_scalar
    wv = _coef_or_scalar(w, w_scalar)
    grad32 = grad.to(acc)
    d_x = (av * grad32).to(grad.dtype) if need_x else grad.new_empty(0)
    d_uncond = (bv * (1 - wv) * grad32).to(grad.dtype) if need_eps_uncond else grad.new_empty(0)
    d_cond = (bv * wv * grad32).to(grad.dtype) if need_eps_cond else grad.new_empty(0)
    return d_x, d_uncond, d_cond


FORWARD = backend_impl(OP, "forward", torch_impl=_torch_forward)
BACKWARD = backend_impl(OP, "backward", torch_impl=_torch_backward)


# ---- the registered ops (torch.compile) and the eager Function -----------------------

def _per_sample(coef: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    return None if coef is None else V.per_sample(coef, ref)


def _forward(x: Tensor, eps_uncond: Tensor, eps_cond: Tensor, a: Optional[Tensor], b: Optional[Tensor],
             w: Optional[Tensor], a_scalar: float, b_scalar: float, w_scalar: float, backend: str) -> Tensor:
    x, eps_uncond, eps_cond = V.dense(x, eps_uncond, eps_cond)
    out = FORWARD[backend](x, eps_uncond, eps_cond, _per_sample(a, x), _per_sample(b, x), _per_sample(w, x),
                           a_scalar, b_scalar, w_scalar)
    return V.in_layout_of(out, x)


@torch.library.custom_op("shortcut_kernels::guided_step", mutates_args=())
def guided_step_op(x: Tensor, eps_uncond: Tensor, eps_cond: Tensor, a: Optional[Tensor], b: Optional[Tensor],
                   w: Optional[Tensor], a_scalar: float, b_scalar: float, w_scalar: float, backend: str) -> Tensor:
    return _forward(x, eps_uncond, eps_cond, a, b, w, a_scalar, b_scalar, w_scalar, backend)


@guided_step_op.register_fake
def _(x, eps_uncond, eps_cond, a, b, w, a_scalar, b_scalar, w_scalar, backend):
    _check(x, eps_uncond, eps_cond, a, b, w)
    return torch.empty_like(V.dense(x, eps_uncond, eps_cond)[0])


def _backward_kernels(grad: Tensor, a: Optional[Tensor], b: Optional[Tensor], w: Optional[Tensor],
                      a_scalar: float, b_scalar: float, w_scalar: float, need_x: bool, need_eps_uncond: bool,
                      need_eps_cond: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    (grad,) = V.dense(grad)
    grads = BACKWARD[backend](grad, _per_sample(a, grad), _per_sample(b, grad), _per_sample(w, grad),
                              a_scalar, b_scalar, w_scalar, need_x, need_eps_uncond, need_eps_cond)
    return tuple(V.in_layout_of(d, grad) for d in grads)


guided_step_backward_op = torch.library.custom_op(
    "shortcut_kernels::guided_step_backward", _backward_kernels, mutates_args=())


@guided_step_backward_op.register_fake
def _(grad, a, b, w, a_scalar, b_scalar, w_scalar, need_x, need_eps_uncond, need_eps_cond, backend):
    (grad,) = V.dense(grad)
    return tuple(torch.empty_like(grad) if need else grad.new_empty(0)
                 for need in (need_x, need_eps_uncond, need_eps_cond))


def _setup_context(ctx, inputs, output):
    x, eps_uncond, eps_cond, a, b, w, a_scalar, b_scalar, w_scalar, backend = inputs
    ctx.scalars, ctx.backend = (a_scalar, b_scalar, w_scalar), backend
    need_a, need_b, need_w = (c is not None and c.requires_grad for c in (a, b, w))
    # The data is only needed for da (x), db and dw (eps): keep it only then.
    need_eps = need_b or need_w
    ctx.save_for_backward(a, b, w, x if need_a else None, eps_uncond if need_eps else None,
                          eps_cond if need_eps else None)


def _coef_grad(term: Tensor, coef: Tensor) -> Tensor:
    """Sum of `term` per sample for a [B]-like coefficient, in total for one value."""
    if coef.numel() == 1:
        total = term.sum()
    else:  # flatten(1), not reshape(B, -1): also right for empty and 1-d data
        total = term.flatten(1).sum(1) if term.dim() > 1 else term
    return total.reshape(coef.shape).to(coef.dtype)


def _backward(ctx, kernels, grad):
    need_x, need_uncond, need_cond, need_a, need_b, need_w = ctx.needs_input_grad[:6]
    a, b, w, x, eps_uncond, eps_cond = ctx.saved_tensors
    a_scalar, b_scalar, w_scalar = ctx.scalars
    d_x = d_uncond = d_cond = d_a = d_b = d_w = None
    if need_x or need_uncond or need_cond:
        d_x, d_uncond, d_cond = kernels(grad, *(None if c is None else c.detach() for c in (a, b, w)),
                                        a_scalar, b_scalar, w_scalar, need_x, need_uncond, need_cond,
                                        ctx.backend)
    if need_a or need_b or need_w:
        acc = V.acc_dtype(grad.dtype)
        grad32 = grad.to(acc)
        if need_a:
            d_a = _coef_grad(grad32 * x.to(acc), a)
        if need_b or need_w:
            uncond = eps_uncond.to(acc)
            diff = eps_cond.to(acc) - uncond
            wv = w_scalar if w is None else w.detach().to(acc).reshape(())
            if need_b:
                d_b = _coef_grad(grad32 * (uncond + wv * diff), b)
            if need_w:
                bv = b_scalar if b is None else _broadcast(b.detach().to(acc), grad)
                d_w = _coef_grad(grad32 * bv * diff, w)
    return (d_x if need_x else None, d_uncond if need_uncond else None, d_cond if need_cond else None,
            d_a, d_b, d_w)


_GuidedStep = differentiable(guided_step_op, "GuidedStep", _forward, _setup_context, _backward,
                             _backward_kernels, guided_step_backward_op)


def guided_step(x: Tensor, eps_uncond: Tensor, eps_cond: Tensor, a: Coef, b: Coef, w: Coef) -> Tensor:
    """`a*x + b*(eps_uncond + w*(eps_cond - eps_uncond))` in one pass.

    Args:
        x: the current sample x_t, any shape with the batch first.
        eps_uncond: the unconditional model output (same shape, dtype, device as `x`);
            often one half of `out.chunk(2)`.
        eps_cond: the conditional model output (same shape, dtype, device).
        a: a float, or a tensor: 0-d or one value per sample ([B] or [B,1,...,1]);
            may require grad.
        b: like `a`.
        w: the guidance scale: a float, or a 0-d tensor (may require grad).

    Under torch.compile, coefficients that change every step should be 0-d tensors: they
    are inputs of the graph, while a float is baked into it (a new value recompiles).
    """
    _check(x, eps_uncond, eps_cond, a, b, w)  # before the schema's own, less helpful, checks
    a_t, a_s = _split(a, "a")
    b_t, b_s = _split(b, "b")
    w_t, w_s = _split(w, "w", "a float or a 0-d tensor (the guidance scale)")
    return call(guided_step_op, _GuidedStep, x, eps_uncond, eps_cond, a_t, b_t, w_t, a_s, b_s, w_s,
                select_backend(x))
