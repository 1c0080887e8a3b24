"""guided_step: every backend against the reference, gradients, opcheck, bad inputs."""
import importlib

import pytest
import torch
from _helpers import BACKENDS, DTYPES, LAYOUTS, assert_close_to_reference, atol_for, randn, three_in_layout

import shortcut_kernels as sk

gs = importlib.import_module("shortcut_kernels.ops.guided_step")
guided_step = gs.guided_step

SHAPES = [(2, 3, 5, 7), (1, 17), (3, 1, 33, 9), (4, 130)]
W = 7.5
# (a, b) kinds: Python floats (the common case), 0-d tensors, one value per sample as [B]
# and as [B,1,...,1], and floats mixed with per-sample tensors.
COEF_KINDS = ["float", "tensor0d", "per_sample", "mixed"]


def make_coefs(kind, x, requires_grad=False):
    batch, device = x.shape[0], x.device
    if kind == "float":
        return 0.93, -0.21
    if kind == "tensor0d":
        coefs = torch.rand((), device=device), -torch.rand((), device=device)
    elif kind == "per_sample":
        coefs = torch.rand(batch, device=device), -torch.rand((batch,) + (1,) * (x.dim() - 1), device=device)
    elif kind == "mixed":
        return 0.93, -torch.rand(batch, device=device).requires_grad_(requires_grad)
    else:
        raise ValueError(kind)
    return tuple(c.requires_grad_(requires_grad) for c in coefs)


def _coef(c, like):
    return gs._broadcast(c.to(like.dtype), like) if isinstance(c, torch.Tensor) else c


def eager(x, eps_uncond, eps_cond, a, b, w):
    """What a user writes, in the inputs' own dtype."""
    return _coef(a, x) * x + _coef(b, x) * (eps_uncond + w * (eps_cond - eps_uncond))


def _double(c):
    return c.detach().double() if isinstance(c, torch.Tensor) else c


def truth(x, eps_uncond, eps_cond, a, b, w):
    return gs.reference(x.double(), eps_uncond.double(), eps_cond.double(), _double(a), _double(b), w)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("coef_kind", COEF_KINDS)
def test_forward_matches_reference(backend, device, dtype, shape, coef_kind):
    x, eps_uncond, eps_cond = (randn(shape, dtype, device) for _ in range(3))
    a, b = make_coefs(coef_kind, x)
    with sk.use_backend(backend):
        out = guided_step(x, eps_uncond, eps_cond, a, b, W)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert_close_to_reference(out, truth(x, eps_uncond, eps_cond, a, b, W), eager(x, eps_uncond, eps_cond, a, b, W),
                              backend=backend, device=device, atol=atol_for(dtype))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunk_view_of_one_model_call(backend, device, layout, dtype):
    """eps_uncond/eps_cond as the two halves of one batched model output, as CFG samplers
    pass them; gradients reach that output through chunk()."""
    x = randn((3, 4, 5, 7), dtype, device, layout).requires_grad_()
    model_out = randn((6, 4, 5, 7), dtype, device, layout).requires_grad_()
    eps_uncond, eps_cond = model_out.chunk(2)
    a, b = torch.rand(3, device=device), 0.4
    with sk.use_backend(backend):
        out = guided_step(x, eps_uncond, eps_cond, a, b, W)
        assert_close_to_reference(out, truth(x, eps_uncond, eps_cond, a, b, W),
                                  eager(x, eps_uncond, eps_cond, a, b, W), backend=backend, device=device,
                                  atol=atol_for(dtype))
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
        grad = randn(out.shape, dtype, device)
        d_x, d_model_out = torch.autograd.grad(out, (x, model_out), grad)
    g = grad.double()
    a64 = a.double()[:, None, None, None]
    expected_out = torch.cat([0.4 * (1 - W) * g, 0.4 * W * g])
    same = torch.cat([(0.4 * (1 - W) * grad), (0.4 * W * grad)])
    assert_close_to_reference(d_x, a64 * g, a.to(dtype)[:, None, None, None] * grad, backend=backend,
                              device=device, atol=atol_for(dtype), name="d_x")
    assert_close_to_reference(d_model_out, expected_out, same, backend=backend, device=device,
                              atol=atol_for(dtype), name="d_model_out")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_any_layout(backend, device, layout, dtype):
    x, eps_uncond, eps_cond = three_in_layout((3, 6, 5, 7), dtype, device, layout)
    a, b = make_coefs("per_sample", x)
    with sk.use_backend(backend):
        out = guided_step(x, eps_uncond, eps_cond, a, b, W)
    assert_close_to_reference(out, truth(x, eps_uncond, eps_cond, a, b, W), eager(x, eps_uncond, eps_cond, a, b, W),
                              backend=backend, device=device, atol=atol_for(dtype))
    if layout == "channels_last":  # a dense layout is kept, not copied to contiguous
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tensor_overrides_scalar(backend, device):
    x, eps_uncond, eps_cond = (torch.randn(2, 9, device=device) for _ in range(3))
    a, b = torch.tensor([0.5, 2.0], device=device), torch.tensor(-0.25, device=device)
    w = torch.tensor(W, device=device)
    with sk.use_backend(backend):
        out = gs.guided_step_op(x, eps_uncond, eps_cond, a, b, w, 100.0, 100.0, 100.0, backend)
    torch.testing.assert_close(out, gs.reference(x, eps_uncond, eps_cond, a, b, W))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_tensor_w_matches_float_w(backend, device, dtype):
    """A 0-d tensor guidance scale gives what the float gives, forward and backward."""
    x, eps_uncond, eps_cond = (randn((3, 4, 5), dtype, device).requires_grad_() for _ in range(3))
    a, b = make_coefs("per_sample", x)
    w = torch.tensor(W, device=device)
    with sk.use_backend(backend):
        out_t = guided_step(x, eps_uncond, eps_cond, a, b, w)
        out_f = guided_step(x, eps_uncond, eps_cond, a, b, W)
        g = torch.randn_like(out_t)
        grads_t = torch.autograd.grad(out_t, (x, eps_uncond, eps_cond), g)
        grads_f = torch.autograd.grad(out_f, (x, eps_uncond, eps_cond), g)
    torch.testing.assert_close(out_t, out_f, rtol=0, atol=0)
    for got, expected in zip(grads_t, grads_f):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_tensor_w(backend, device):
    """fp64 gradcheck through a, b and the guidance scale w as tensors."""
    x, eps_uncond, eps_cond = (torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
                               for _ in range(3))
    a = torch.rand(2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.rand((), dtype=torch.float64, device=device, requires_grad=True)
    w = torch.tensor(W, dtype=torch.float64, device=device, requires_grad=True)
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(guided_step, (x, eps_uncond, eps_cond, a, b, w))


def test_compiled_loop_with_changing_tensor_coefficients_compiles_once():
    """A 50-step sampling loop whose a, b and w change every step, passed as 0-d
    tensors, is one dynamo frame: no recompiles."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(guided_step, fullgraph=True, backend=counter)
    x = torch.randn(2, 4, 8)
    expected = x.clone()
    for i in range(50):
        eps_uncond, eps_cond = torch.randn_like(x), torch.randn_like(x)
        a, b, w = torch.tensor(1.0 - i / 100), torch.tensor(-0.01 * (i + 1)), torch.tensor(1.0 + i / 10)
        x = step(x, eps_uncond, eps_cond, a, b, w)
        expected = gs.reference(expected, eps_uncond, eps_cond, a, b, w)
    assert counter.frame_count == 1, f"{counter.frame_count} frames compiled for 50 steps"
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
# The larger shape spans several parallel tasks of the CPU kernel, one sample or three.
@pytest.mark.parametrize("coef_kind,shape", [(kind, (2, 3, 5, 7)) for kind in COEF_KINDS]
                         + [("float", (3, 11001)), ("per_sample", (3, 11001))], ids=str)
def test_backward_matches_autograd(backend, device, dtype, coef_kind, shape):
    x, eps_uncond, eps_cond = (randn(shape, dtype, device).requires_grad_() for _ in range(3))
    a, b = make_coefs(coef_kind, x, requires_grad=True)
    grad = randn(shape, dtype, device)
    names = ["x", "eps_uncond", "eps_cond"] + [n for n, c in (("a", a), ("b", b)) if isinstance(c, torch.Tensor)]
    with sk.use_backend(backend):
        out = guided_step(x, eps_uncond, eps_cond, a, b, W)
    inputs = [x, eps_uncond, eps_cond, a, b]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor)]
    ours = torch.autograd.grad(out, leaves, grad)
    # Autograd through the fp64 reference is the truth; autograd through the eager
    # composite in the inputs' dtype sets the tolerance.
    exact_inputs = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    exact = torch.autograd.grad(gs.reference(*exact_inputs, W), [t for t in exact_inputs if isinstance(t, torch.Tensor)],
                                grad.double())
    same_inputs = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    same = torch.autograd.grad(eager(*same_inputs, W), [t for t in same_inputs if isinstance(t, torch.Tensor)], grad)
    for name, o, e, s, leaf in zip(names, ours, exact, same, leaves):
        assert o.shape == leaf.shape and o.dtype == leaf.dtype, name
        # da/db sum many products: their rounding grows with the sample size.
        atol = atol_for(dtype) * (shape[-1] if name in ("a", "b") else 1)
        assert_close_to_reference(o, e, s, backend=backend, device=device, atol=atol, name=f"d_{name}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (5,)], ids=str)
def test_empty_and_1d_inputs(backend, device, shape):
    x, eps_uncond, eps_cond = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    a, b = torch.rand(shape[0], device=device, requires_grad=True), torch.rand((), device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    with sk.use_backend(backend):
        out = guided_step(x, eps_uncond, eps_cond, a, b, W)
        ours = torch.autograd.grad(out, (x, eps_uncond, eps_cond, a, b), grad)
    exact = torch.autograd.grad(gs.reference(x, eps_uncond, eps_cond, a, b, W), (x, eps_uncond, eps_cond, a, b), grad)
    torch.testing.assert_close(out, eager(x, eps_uncond, eps_cond, a, b, W))
    for o, e in zip(ours, exact):
        torch.testing.assert_close(o, e)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_fp64(backend, device):
    x, eps_uncond, eps_cond = (torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
                               for _ in range(3))
    a = torch.rand(2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.rand((2, 1, 1), dtype=torch.float64, device=device, requires_grad=True)
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: guided_step(*t, W), (x, eps_uncond, eps_cond, a, b))
        assert torch.autograd.gradcheck(lambda x, u, c: guided_step(x, u, c, 0.7, -1.3, W), (x, eps_uncond, eps_cond))
        assert torch.autograd.gradcheck(lambda u, a0, b0: guided_step(x.detach(), u, eps_cond.detach(), a0, b0, 2.0),
                                        (eps_uncond, a[0].detach().requires_grad_(), b[0, 0, 0].detach().requires_grad_()))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_only_requested_gradients(backend, device):
    x = torch.randn(2, 8, device=device, requires_grad=True)
    eps_uncond, eps_cond = torch.randn(2, 8, device=device), torch.randn(2, 8, device=device, requires_grad=True)
    a = torch.tensor([0.5, 0.25], device=device)
    with sk.use_backend(backend):
        d_x, d_cond = torch.autograd.grad(guided_step(x, eps_uncond, eps_cond, a, 2.0, W).sum(), (x, eps_cond))
        (d_x_only,) = torch.autograd.grad(guided_step(x, eps_uncond, eps_cond, 3.0, 2.0, W).sum(), x)
    torch.testing.assert_close(d_x, a[:, None].expand(2, 8))
    torch.testing.assert_close(d_cond, torch.full((2, 8), 2.0 * W, device=device))
    torch.testing.assert_close(d_x_only, torch.full((2, 8), 3.0, device=device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_plain_ddim_step_when_w_is_one(backend, device):
    """w=1 ignores eps_uncond; w=0 ignores eps_cond (bit for bit in fp32 math)."""
    x, eps_uncond, eps_cond = (torch.randn(2, 64, device=device) for _ in range(3))
    with sk.use_backend(backend):
        cond_only = guided_step(x, eps_uncond, eps_cond, 0.5, 0.25, 1.0)
        uncond_only = guided_step(x, eps_uncond, eps_cond, 0.5, 0.25, 0.0)
    torch.testing.assert_close(cond_only, 0.5 * x + 0.25 * eps_cond)
    torch.testing.assert_close(uncond_only, 0.5 * x + 0.25 * eps_uncond)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    if sk.backends.unavailable_reasons(backend, "cpu", torch.float32):
        pytest.skip(f"{backend} backend unavailable")
    x, eps_uncond, eps_cond = (torch.randn(2, 3, 5, requires_grad=True) for _ in range(3))
    a, b = torch.rand(2, requires_grad=True), torch.rand((), requires_grad=True)
    w = torch.tensor(W, requires_grad=True)
    with sk.use_backend(backend):
        torch.library.opcheck(gs.guided_step_op, (x, eps_uncond, eps_cond, a, b, None, 0.0, 0.0, W, backend))
        torch.library.opcheck(gs.guided_step_op, (x, eps_uncond, eps_cond, None, None, None, 0.9, -0.1, W, backend))
        torch.library.opcheck(gs.guided_step_op, (x.detach(), eps_uncond, eps_cond, None, b, None, 0.9, 0.0, W, backend))
        torch.library.opcheck(gs.guided_step_op, (x, eps_uncond, eps_cond, a, None, w, 0.0, 0.9, 0.0, backend))
        torch.library.opcheck(gs.guided_step_backward_op, (torch.randn(2, 3, 5), a.detach(), None, None, 0.0, 0.3, W,
                                                           True, False, True, backend))


@pytest.mark.skipif(bool(sk.backends.unavailable_reasons("cpu", "cpu", torch.float32)), reason="no C++ ext")
def test_ext_ops_check_their_arguments():
    """Direct calls of the extension ops (below the Python checks) fail clearly."""
    ext = torch.ops.shortcut_kernels_ext
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="`eps_cond` has shape"):
        ext.guided_step_forward(x, x, torch.randn(2, 4), None, None, None, 1.0, 1.0, W)
    with pytest.raises(RuntimeError, match="`a` must be Float"):
        ext.guided_step_forward(x, x, x, torch.rand(2, dtype=torch.float64), None, None, 1.0, 1.0, W)
    with pytest.raises(RuntimeError, match="`b` must be 0-d or have shape"):
        ext.guided_step_backward(x, None, torch.rand(3), None, 1.0, 1.0, W, True, True, True)
    with pytest.raises(RuntimeError, match="`w` must be 0-d"):
        ext.guided_step_forward(x, x, x, None, None, torch.rand(2), 1.0, 1.0, W)


def test_bad_inputs_name_the_argument():
    x, eps_uncond, eps_cond = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="`eps_cond` has shape"):
        guided_step(x, eps_uncond, torch.randn(2, 4), 1.0, 1.0, W)
    with pytest.raises(TypeError, match="`eps_uncond` has dtype"):
        guided_step(x, eps_uncond.double(), eps_cond, 1.0, 1.0, W)
    with pytest.raises(ValueError, match="`eps_cond` is on meta"):
        guided_step(x, eps_uncond, torch.randn(2, 3, device="meta"), 1.0, 1.0, W)
    with pytest.raises(ValueError, match="`a` must be a 0-d tensor or have one value per sample"):
        guided_step(x, eps_uncond, eps_cond, torch.rand(3), 1.0, W)
    with pytest.raises(ValueError, match="`b` must be a 0-d tensor or have one value per sample"):
        guided_step(x, eps_uncond, eps_cond, 1.0, torch.rand(2, 3), W)
    with pytest.raises(ValueError, match="`b` is on meta"):
        guided_step(x, eps_uncond, eps_cond, 1.0, torch.rand(2, device="meta"), W)
    with pytest.raises(TypeError, match="`x` must be float16, bfloat16"):
        guided_step(torch.ones(2, 3, dtype=torch.int64), eps_uncond, eps_cond, 1.0, 1.0, W)
    with pytest.raises(TypeError, match="`a` must be float16"):
        guided_step(x, eps_uncond, eps_cond, torch.ones(2, dtype=torch.int32), 1.0, W)
    with pytest.raises(TypeError, match="`b` must be a float or a tensor"):
        guided_step(x, eps_uncond, eps_cond, 1.0, "0.5", W)
    with pytest.raises(TypeError, match="`a` must be a float or a tensor"):
        guided_step(x, eps_uncond, eps_cond, None, 1.0, W)
    with pytest.raises(TypeError, match="`w` must be a float or a 0-d tensor"):
        guided_step(x, eps_uncond, eps_cond, 1.0, 1.0, "7.5")
    with pytest.raises(ValueError, match="`w` .* one-value tensor"):
        guided_step(x, eps_uncond, eps_cond, 1.0, 1.0, torch.tensor([W, W]))
    with pytest.raises(TypeError, match="`eps_uncond` must be a torch.Tensor"):
        guided_step(x, [1.0], eps_cond, 1.0, 1.0, W)


def test_forced_backend_that_cannot_serve_says_why():
    x = torch.randn(2, 3)
    with sk.use_backend("cuda"), pytest.raises(sk.BackendUnavailable, match="runs CUDA tensors"):
        guided_step(x, x, x, 1.0, 1.0, W)
