"""The two ways a public op runs a call (ops/_dispatch): the eager autograd Function,
which calls the kernels directly, and the registered custom op (what torch.compile
sees). Both must give the same values and gradients, run the backward on the backend
that ran the forward, and let kernel errors through unchanged."""
import importlib
import threading

import pytest
import torch

import shortcut_kernels as sk

from _helpers import BACKENDS

OPS = ["gated_blend", "gated_residual", "cache_residual", "guided_step"]
DIFFERENTIABLE_KERNEL_OPS = ["gated_blend", "gated_residual", "guided_step"]  # cache_residual: dx = g


def _module(op):
    return importlib.import_module(f"shortcut_kernels.ops.{op}")


def _cases(device):
    """{name: (public call, registered-op call(inputs, backend), inputs)} for every op."""
    b, c, t = 3, 5, 7
    fresh, cache, residual = (torch.randn(b, c, t, device=device) for _ in range(3))
    gate = torch.rand(b, device=device)
    x, y = torch.randn(b, t, c, device=device), torch.randn(b, t, c, device=device)
    ada = torch.randn(b, c, device=device)
    caches = [torch.randn(b, t, c, device=device) for _ in range(2)]
    a, bb, w = torch.rand(b, device=device), torch.rand(b, device=device), torch.tensor(2.5, device=device)
    ops = torch.ops.shortcut_kernels
    return {
        "gated_blend": (lambda f, k, g, r: sk.gated_blend(f, k, g, r),
                        lambda backend, f, k, g, r: ops.gated_blend(f, k, g, r, backend), [fresh, cache, gate, residual]),
        "gated_residual": (lambda x_, y_, g: sk.gated_residual(x_, y_, g),
                           lambda backend, x_, y_, g: ops.gated_residual(x_, y_, g, backend), [x, y, ada]),
        "cache_residual": (lambda x_, c0, c1: sk.cache_residual(x_, [c0, c1]),
                           lambda backend, x_, c0, c1: ops.cache_residual(x_, [c0, c1], backend), [x, *caches]),
        "guided_step": (lambda x_, u, k, a_, b_, w_: sk.guided_step(x_, u, k, a_, b_, w_),
                        lambda backend, x_, u, k, a_, b_, w_: ops.guided_step(x_, u, k, a_, b_, w_, 1.0, 1.0, 1.0,
                                                                              backend),
                        [fresh, cache, residual, a, bb, w]),
    }


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_eager_function_matches_registered_op(backend, device, op):
    public, registered, inputs = _cases(device)[op]
    leaves = [t.clone().requires_grad_() for t in inputs]
    with sk.use_backend(backend):
        out = public(*leaves)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad)
        expected_out = registered(backend, *leaves)
        expected = torch.autograd.grad(expected_out, leaves, grad)
        no_grad = public(*inputs)
    # The eager path is the Function, not the custom op's autograd.
    assert type(out.grad_fn).__name__ != type(expected_out.grad_fn).__name__
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(no_grad, expected_out.detach(), rtol=0, atol=0)
    for g, e, leaf in zip(got, expected, leaves):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"{op} d/{leaf.shape}: {m}")


def _count_calls(monkeypatch, impls, calls, stage):
    """Wraps every backend of `impls` (an op's FORWARD/BACKWARD) to count its calls."""
    for backend in ("torch", "cpu", "triton", "cuda"):
        try:
            impl = impls[backend]
        except Exception:  # noqa: BLE001  a backend that cannot load here is never called
            continue

        def counted(*args, _impl=impl, _backend=backend):
            calls.append((stage, _backend))
            return _impl(*args)
        monkeypatch.setitem(impls, backend, counted)


@pytest.mark.parametrize("where", ["after_the_with_block", "another_thread"])
@pytest.mark.parametrize("op", DIFFERENTIABLE_KERNEL_OPS)
def test_backward_runs_the_forward_backend(monkeypatch, op, where):
    """Forced `torch` while `auto` would pick the C++ kernels: the forward and the backward
    both run `torch`, also when the backward runs where use_backend() is not in force
    (after the block, or on an autograd/user thread that never saw the context)."""
    if sk.backends.select("cpu", torch.float32) == "torch":
        pytest.skip("auto already picks torch here (C++ extension not built)")
    module, calls = _module(op), []
    _count_calls(monkeypatch, module.FORWARD, calls, "forward")
    _count_calls(monkeypatch, module.BACKWARD, calls, "backward")
    public, _, inputs = _cases("cpu")[op]
    leaves = [t.clone().requires_grad_() for t in inputs]
    with sk.use_backend("torch"):
        out = public(*leaves)
    grads = {}
    if where == "another_thread":
        thread = threading.Thread(target=lambda: grads.update(g=torch.autograd.grad(out.sum(), leaves)))
        thread.start()
        thread.join()
    else:
        grads["g"] = torch.autograd.grad(out.sum(), leaves)
    assert len(grads["g"]) == len(leaves)
    assert calls == [("forward", "torch"), ("backward", "torch")], calls


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (simulated)"),
                                   RuntimeError("an illegal memory access was encountered (simulated)")],
                         ids=["oom", "kernel-fault"])
@pytest.mark.parametrize("op", OPS)
def test_kernel_errors_propagate_once(monkeypatch, op, error):
    """A failing kernel raises its own error, once: it is not swallowed and retried."""
    module, public, inputs = _module(op), *_cases("cpu")[op][::2]
    backend = sk.backends.select("cpu", torch.float32)
    calls = []

    def failing(*args):
        calls.append(args)
        raise error
    monkeypatch.setitem(module.FORWARD, backend, failing)
    with pytest.raises(type(error), match="simulated"):
        public(*inputs)
    assert len(calls) == 1


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


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_no_graph_calls_skip_the_function(monkeypatch, backend, device, op):
    """With no graph to record (no grad mode, inference mode, or no input requiring grad) the
    eager path runs the Function's forward alone: the same values, no autograd node; an input
    requiring grad in grad mode still goes through the Function, and so does forward-mode AD
    (the Function raises there, instead of dropping the tangents)."""
    from shortcut_kernels.ops import _dispatch

    public, _, inputs = _cases(device)[op]
    function = next(v for v in vars(_module(op)).values()
                    if isinstance(v, type) and issubclass(v, torch.autograd.Function))
    alone = []
    real = function.kernels

    def counted(*args):
        alone.append(1)
        return real(*args)
    with sk.use_backend(backend):
        expected = public(*[t.clone().requires_grad_() for t in inputs]).detach()
        monkeypatch.setattr(function, "kernels", staticmethod(counted))
        plain = public(*inputs)
        with torch.no_grad():
            no_grad = public(*[t.clone().requires_grad_() for t in inputs])
        with torch.inference_mode():
            inference = public(*inputs)
        assert len(alone) == 3
        tracked = public(inputs[0].clone().requires_grad_(), *inputs[1:])
        assert len(alone) == 3 and tracked.grad_fn is not None
        monkeypatch.setattr(_dispatch, "_forward_ad_active", lambda: True)
        public(*inputs)
        assert len(alone) == 3
    for got in (plain, no_grad, inference):
        assert got.grad_fn is None
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_forward_mode_ad_raises_instead_of_dropping_tangents():
    import torch.autograd.forward_ad as fwAD

    x, y, gate = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(2)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="jvp"):
            sk.gated_blend(dual, y, gate)
