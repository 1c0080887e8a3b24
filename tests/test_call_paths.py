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

