"""The three ways a public op runs a call (ops/_dispatch.call_path): direct, the eager
autograd Function, and the registered custom op (what torch.compile sees). The first
two are what users hit in eager mode; the third must give the same values and
gradients, since compiled code uses it."""
import pytest
import torch

import shortcut_kernels as sk
from shortcut_kernels.ops import _dispatch

from _helpers import BACKENDS


def _cases(device):
    """(name, public call, registered-op call, inputs) for every differentiable op."""
    b, c, t = 3, 5, 7
    fresh, cache, residual = (torch.randn(b, c, t, device=device) for _ in range(3))
    gate = torch.rand(b, device=device)
    x, y = torch.randn(b, t, c, device=device), torch.randn(b, t, c, device=device)
    ada = torch.randn(b, c, device=device)
    caches = [torch.randn(b, t, c, device=device) for _ in range(2)]
    a, bb = torch.rand(b, device=device), torch.rand(b, device=device)
    ops = torch.ops.shortcut_kernels
    return [
        ("gated_blend", lambda f, k, g, r: sk.gated_blend(f, k, g, r),
         lambda f, k, g, r: ops.gated_blend(f, k, g, r), [fresh, cache, gate, residual]),
        ("gated_residual", lambda x_, y_, g: sk.gated_residual(x_, y_, g),
         lambda x_, y_, g: ops.gated_residual(x_, y_, g), [x, y, ada]),
        ("cache_residual", lambda x_, c0, c1: sk.cache_residual(x_, [c0, c1]),
         lambda x_, c0, c1: ops.cache_residual(x_, [c0, c1]), [x, *caches]),
        ("guided_step", lambda x_, u, k, a_, b_: sk.guided_step(x_, u, k, a_, b_, 2.5),
         lambda x_, u, k, a_, b_: ops.guided_step(x_, u, k, a_, b_, 1.0, 1.0, 2.5),
         [fresh, cache, residual, a, bb]),
    ]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", ["gated_blend", "gated_residual", "cache_residual", "guided_step"])
def test_eager_autograd_matches_registered_op(backend, device, op):
    name, public, registered, inputs = next(case for case in _cases(device) if case[0] == op)
    leaves = [t.clone().requires_grad_() for t in inputs]
    with sk.use_backend(backend):
        out = public(*leaves)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad)
        expected_out = registered(*leaves)
        expected = torch.autograd.grad(expected_out, leaves, grad)
        direct = public(*inputs)  # nothing requires grad: the direct path
    # The eager path is the Function, not the custom op's autograd.
    assert type(out.grad_fn).__name__ != type(expected_out.grad_fn).__name__
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(direct, expected_out.detach(), rtol=0, atol=0)
    for g, e, leaf in zip(got, expected, leaves):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"{name} d/{leaf.shape}: {m}")


def test_call_path_choice():
    x = torch.randn(2, 3)
    assert _dispatch.call_path(x, None) == _dispatch.DIRECT
    assert _dispatch.call_path(x, x.clone().requires_grad_()) == _dispatch.AUTOGRAD
    with torch.no_grad():
        assert _dispatch.call_path(x.clone().requires_grad_()) == _dispatch.DIRECT



@pytest.mark.parametrize("op", ["gated_blend", "gated_residual", "cache_residual"])
def test_double_backward_through_identity_terms(op):
    """With create_graph=True the gradients that are g itself (residual, x) stay
    differentiable, as through the registered op: a gradient penalty matches the plain
    torch composite."""
    x, y = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def penalty(fn):
        xl = x.clone().requires_grad_()
        out = fn(xl, y * w)
        (dx,) = torch.autograd.grad(out.square().sum(), xl, create_graph=True)
        (dw,) = torch.autograd.grad(dx.square().sum(), w)
        return dw

    ours = {"gated_blend": lambda a, b: sk.gated_blend(b, b, torch.tensor(0.5, dtype=torch.float64), a),
            "gated_residual": lambda a, b: sk.gated_residual(a, b),
            "cache_residual": lambda a, b: sk.cache_residual(a, [b])}[op]
    torch.testing.assert_close(penalty(ours), penalty(lambda a, b: a + b))


def test_double_backward_without_a_formula_raises():
    """Second derivatives through d_fresh = gate*g have no formula: an error, never a
    silently missing term."""
    fresh = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    cache = torch.randn(2, 4, dtype=torch.float64)
    gate = torch.rand(2, dtype=torch.float64, requires_grad=True)
    out = sk.gated_blend(fresh, cache, gate)
    (d_gate,) = torch.autograd.grad(out.square().sum(), gate, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(d_gate.sum(), fresh)
