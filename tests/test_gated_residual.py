"""gated_residual: every backend against the reference, the cache_out write, gradients,
opcheck, determinism of the gate gradient, bad inputs."""
import importlib

import pytest
import torch
from _helpers import BACKENDS, DTYPES, assert_close_to_reference, atol_for, is_interpreted, randn

import shortcut_kernels as sk

gr = importlib.import_module("shortcut_kernels.ops.gated_residual")
gated_residual = gr.gated_residual

# [B, N, C] tokens with odd sizes, [B, C], B=1, and a 4-d [B, H, W, C].
SHAPES = [(2, 7, 5), (1, 33, 9), (3, 16), (2, 3, 5, 12), (1, 1, 8)]


def eager(x, y, gate=None):
    """What a user writes (diffusers: x + gate.unsqueeze(1) * y), in the inputs' dtype."""
    if gate is None:
        return x + y
    return x + gr._broadcast(gate.to(x.dtype), x) * y


def truth(x, y, gate=None):
    return gr.reference(x.double(), y.double(), None if gate is None else gate.double())


def make_gate(kind, like, dtype=torch.float32, requires_grad=False):
    if kind == "none":
        return None
    batch, channels = like.shape[0], like.shape[-1]
    shape = (batch, channels) if kind == "BC" else (batch, 1, channels)
    return torch.randn(shape, dtype=dtype, device=like.device).requires_grad_(requires_grad)


def assert_cache(cache, y, gate, backend, device):
    """cache_out holds the delta gate*y rounded once to the storage dtype: bit for bit
    (1 ulp for the interpreter's truncating reduced-precision stores)."""
    expected = gr._delta(y, gate).to(y.dtype)
    lenient = is_interpreted(backend, device) and y.dtype in (torch.float16, torch.bfloat16)
    rtol = torch.finfo(y.dtype).eps if lenient else 0
    torch.testing.assert_close(cache, expected, atol=0, rtol=rtol)


def gate_kinds(shape):
    return ["none", "BC"] + (["B1C"] if len(shape) >= 3 else [])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_cache", [False, True])
def test_forward_matches_reference(backend, device, dtype, shape, with_cache):
    x, y = randn(shape, dtype, device), randn(shape, dtype, device)
    for kind in gate_kinds(shape):
        gate = make_gate(kind, x)
        cache = torch.full_like(x, float("nan")) if with_cache else None
        with sk.use_backend(backend):
            out = gated_residual(x, y, gate, cache)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert_close_to_reference(out, truth(x, y, gate), eager(x, y, gate),
                                  backend=backend, device=device, atol=atol_for(dtype))
        if with_cache:
            assert_cache(cache, y, gate, backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "channels_last", "transposed_tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_any_layout(backend, device, layout, dtype):
    shape = (3, 6, 5, 8)
    if layout == "transposed_tokens":  # [B, C, N] feature map seen as [B, N, C]
        x = randn((3, 8, 30), dtype, device).transpose(1, 2)
        y = randn((3, 30, 8), dtype, device)
        cache = torch.empty(3, 8, 30, dtype=dtype, device=device).transpose(1, 2)
    else:
        x, y = randn(shape, dtype, device, layout), randn(shape, dtype, device, layout)
        cache = randn(shape, dtype, device, layout)
    gate = make_gate("BC", x).t().contiguous().t()  # a non-contiguous gate too
    with sk.use_backend(backend):
        out = gated_residual(x, y, gate, cache)
    assert_close_to_reference(out, truth(x, y, gate), eager(x, y, gate),
                              backend=backend, device=device, atol=atol_for(dtype))
    # A non-contiguous cache_out is written through (the kernels' copy is copied back).
    assert_cache(cache, y, gate, backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gate_of_another_dtype(backend, device):
    x, y = randn((2, 9, 16), torch.bfloat16, device), randn((2, 9, 16), torch.bfloat16, device)
    for gate in (make_gate("BC", x, torch.bfloat16), make_gate("B1C", x, torch.float64)):
        with sk.use_backend(backend):
            out = gated_residual(x, y, gate)
        assert_close_to_reference(out, truth(x, y, gate), eager(x, y, gate),
                                  backend=backend, device=device, atol=atol_for(torch.bfloat16))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gate_kind", ["none", "BC", "B1C"])
@pytest.mark.parametrize("shape", [(2, 7, 5), (1, 3000, 24), (3, 20)], ids=str)
def test_backward_matches_autograd(backend, device, dtype, gate_kind, shape):
    if gate_kind == "B1C" and len(shape) < 3:
        pytest.skip("[B, 1, C] gates need token dims")
    x = randn(shape, dtype, device).requires_grad_()
    y = randn(shape, dtype, device).requires_grad_()
    gate = make_gate(gate_kind, x, requires_grad=True)
    grad = randn(shape, dtype, device)
    inputs = [t for t in (x, y, gate) if t is not None]
    with sk.use_backend(backend):
        ours = torch.autograd.grad(gated_residual(x, y, gate), inputs, grad)
    # Autograd through the fp64 reference is the truth; autograd through the eager
    # composite in the inputs' dtype sets the tolerance.
    exact_leaves = [t.detach().double().requires_grad_() for t in inputs]
    exact = torch.autograd.grad(gr.reference(*exact_leaves), exact_leaves, grad.double())
    same_leaves = [t.detach().requires_grad_() for t in inputs]
    same = torch.autograd.grad(eager(*same_leaves), same_leaves, grad)
    for name, o, e, s in zip(("x", "y", "gate"), ours, exact, same):
        assert o.shape == e.shape and o.dtype == s.dtype, name
        # d_gate sums over the tokens: its rounding grows with their number.
        tokens = x[0].numel() // shape[-1]
        atol = atol_for(dtype) * (tokens if name == "gate" else 1)
        assert_close_to_reference(o, e, s, backend=backend, device=device, atol=atol, name=f"d_{name}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_fp64(backend, device):
    x, y = (torch.randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    gate = torch.randn(2, 3, dtype=torch.float64, device=device, requires_grad=True)
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(gated_residual, (x, y, gate))
        assert torch.autograd.gradcheck(lambda a, b, g: gated_residual(a, b, g[:, None]), (x, y, gate))
        assert torch.autograd.gradcheck(lambda a, b: gated_residual(a, b), (x, y))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_only_requested_gradients(backend, device):
    x, y = torch.randn(2, 4, 8, device=device), torch.randn(2, 4, 8, device=device, requires_grad=True)
    gate = torch.randn(2, 8, device=device)
    with sk.use_backend(backend):
        (d_y,) = torch.autograd.grad(gated_residual(x, y, gate).sum(), y)
        (d_gate,) = torch.autograd.grad(gated_residual(x, y.detach(), gate.requires_grad_()).sum(), gate)
    torch.testing.assert_close(d_y, gate.detach()[:, None].expand(2, 4, 8))
    torch.testing.assert_close(d_gate, y.detach().sum(1))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_cache_out_with_grad(backend, device):
    """Training with a cache: out is differentiable, the cache gets the detached delta."""
    x, y = torch.randn(2, 5, 8, device=device, requires_grad=True), torch.randn(2, 5, 8, device=device)
    gate = torch.randn(2, 8, device=device, requires_grad=True)
    cache = torch.empty(2, 5, 8, device=device)
    with sk.use_backend(backend):
        out = gated_residual(x, y, gate, cache)
        d_x, d_gate = torch.autograd.grad(out.sum(), (x, gate))
    assert not cache.requires_grad
    torch.testing.assert_close(cache, gate.detach()[:, None] * y, atol=0, rtol=0)
    torch.testing.assert_close(d_x, torch.ones_like(x))
    torch.testing.assert_close(d_gate, y.sum(1))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 4), (2, 0, 4), (2, 3, 0), (2, 4)], ids=str)
def test_empty_data(backend, device, shape):
    x, y = (torch.randn(shape, device=device, requires_grad=True) for _ in range(2))
    gate = torch.randn(shape[0], shape[-1], device=device, requires_grad=True)
    cache = torch.empty(shape, device=device)
    with sk.use_backend(backend):
        out = gated_residual(x, y, gate)
        grads = torch.autograd.grad(out.sum(), (x, y, gate))
        with torch.no_grad():
            gated_residual(x, y, gate, cache)
    torch.testing.assert_close(out, gr.reference(x, y, gate))
    leaves = [t.detach().requires_grad_() for t in (x, y, gate)]
    expected = torch.autograd.grad(gr.reference(*leaves).sum(), leaves)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(cache, gr._delta(y.detach(), gate.detach()))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    if sk.backends.unavailable_reasons(backend, "cpu", torch.float32):
        pytest.skip(f"{backend} backend unavailable")
    x, y = (torch.randn(2, 3, 5, requires_grad=True) for _ in range(2))
    gate = torch.randn(2, 5, requires_grad=True)
    with sk.use_backend(backend):
        torch.library.opcheck(gr.gated_residual_op, (x, y, gate, backend))
        torch.library.opcheck(gr.gated_residual_op, (x, y, gate[:, None].detach(), backend))
        torch.library.opcheck(gr.gated_residual_op, (x, y, None, backend))
        torch.library.opcheck(gr.gated_residual_cache_op, (x.detach(), y.detach(), gate.detach(), torch.empty(2, 3, 5), backend))
        torch.library.opcheck(gr.gated_residual_cache_op, (x.detach(), y.detach(), None, torch.empty(2, 3, 5), backend))


def test_compile_cache_out():
    """The mutating inference form under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()

    def step(x, y, gate, cache):
        return gated_residual(x, y, gate, cache) * 2

    x, y, gate = torch.randn(2, 6, 8), torch.randn(2, 6, 8), torch.randn(2, 8)
    cache = torch.zeros(2, 6, 8)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y, gate, cache)
    torch.testing.assert_close(out, 2 * gr.reference(x, y, gate))
    torch.testing.assert_close(cache, gate[:, None] * y)


@pytest.mark.skipif(bool(sk.backends.unavailable_reasons("cpu", "cpu", torch.float32)), reason="no C++ ext")
def test_gate_gradient_is_deterministic_across_thread_counts():
    x, y = torch.randn(3, 20_011, 24), torch.randn(3, 20_011, 24)
    gate = torch.randn(3, 24, requires_grad=True)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            with sk.use_backend("cpu"):
                grads.append(torch.autograd.grad(gated_residual(x, y, gate).sum(), gate)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_bad_inputs_name_the_argument():
    x, y, gate = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="`y` has shape"):
        gated_residual(x, torch.randn(2, 3, 5), gate)
    with pytest.raises(TypeError, match="`y` has dtype"):
        gated_residual(x, y.double(), gate)
    with pytest.raises(ValueError, match="`gate` must have shape"):
        gated_residual(x, y, torch.randn(2, 3))
    with pytest.raises(ValueError, match="`gate` must have shape"):
        gated_residual(x, y, torch.randn(4))
    with pytest.raises(ValueError, match="`gate` must have shape"):
        gated_residual(x[:, 0], y[:, 0], torch.randn(2, 1, 4))  # [B, C] data: no token dims
    with pytest.raises(ValueError, match="`gate` is on meta"):
        gated_residual(x, y, torch.randn(2, 4, device="meta"))
    with pytest.raises(TypeError, match="`gate` must be float16"):
        gated_residual(x, y, torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="`x` must be float16, bfloat16"):
        gated_residual(torch.ones(2, 3, 4, dtype=torch.int64), y, gate)
    with pytest.raises(ValueError, match="`cache_out` has shape"):
        gated_residual(x, y, gate, torch.empty(2, 3))
    with pytest.raises(TypeError, match="`cache_out` has dtype"):
        gated_residual(x, y, gate, torch.empty(2, 3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="`cache_out` is on meta"):
        gated_residual(x, y, gate, torch.empty(2, 3, 4, device="meta"))
    with pytest.raises(ValueError, match="`cache_out` must not require grad"):
        gated_residual(x, y, gate, torch.empty(2, 3, 4, requires_grad=True))
    with pytest.raises(TypeError, match="`y` must be a torch.Tensor"):
        gated_residual(x, 1.0, gate)


@pytest.mark.skipif(bool(sk.backends.unavailable_reasons("cpu", "cpu", torch.float32)), reason="no C++ ext")
def test_extension_checks_direct_calls():
    ext = torch.ops.shortcut_kernels_ext
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="`gate` must be Float"):
        ext.gated_residual_forward(x, y, torch.randn(2, 4, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match=r"`gate` must have shape \[B, C\]"):
        ext.gated_residual_forward(x, y, torch.randn(2, 3), None)
    with pytest.raises(RuntimeError, match="`cache_out` has shape"):
        ext.gated_residual_forward(x, y, None, torch.empty(3))
    with pytest.raises(RuntimeError, match="`x` must be contiguous"):
        ext.gated_residual_forward(x.transpose(1, 2), y.transpose(1, 2), None, None)
