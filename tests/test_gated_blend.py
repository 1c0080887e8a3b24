"""gated_blend: every backend against the reference, gradients, opcheck, bad inputs."""
import pytest
import torch
from _helpers import BACKENDS, DTYPES, LAYOUTS, assert_close_to_reference, atol_for, randn, three_in_layout

import shortcut_kernels as sk
from shortcut_kernels.ops import gated_blend as gb

SHAPES = [(2, 3, 5, 7), (1, 17), (3, 1, 33, 9), (4, 130)]


def eager(fresh, cache, gate, residual=None):
    """What a user writes, in the inputs' own dtype."""
    g = gb._broadcast(gate.to(fresh.dtype), fresh)
    out = g * fresh + (1 - g) * cache
    return out if residual is None else residual + out


def truth(fresh, cache, gate, residual=None):
    return gb.reference(fresh.double(), cache.double(), gate.double(),
                        None if residual is None else residual.double())


def make_gate(kind, batch, device, requires_grad=False):
    gate = torch.rand((batch,) if kind == "per_sample" else (), device=device)
    return gate.requires_grad_(requires_grad)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("gate_kind", ["scalar", "per_sample"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_forward_matches_reference(backend, device, dtype, shape, gate_kind, with_residual):
    fresh, cache = randn(shape, dtype, device), randn(shape, dtype, device)
    residual = randn(shape, dtype, device) if with_residual else None
    gate = make_gate(gate_kind, shape[0], device)
    with sk.use_backend(backend):
        out = sk.gated_blend(fresh, cache, gate, residual)
    assert out.shape == fresh.shape and out.dtype == dtype and out.device == fresh.device
    assert_close_to_reference(out, truth(fresh, cache, gate, residual), eager(fresh, cache, gate, residual),
                              backend=backend, device=device, atol=atol_for(dtype))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_any_layout(backend, device, layout, dtype):
    fresh, cache, residual = three_in_layout((3, 6, 5, 7), dtype, device, layout)
    gate = make_gate("per_sample", 3, device)
    with sk.use_backend(backend):
        out = sk.gated_blend(fresh, cache, gate, residual)
    assert_close_to_reference(out, truth(fresh, cache, gate, residual), eager(fresh, cache, gate, residual),
                              backend=backend, device=device, atol=atol_for(dtype))
    if layout == "channels_last":  # a dense layout is kept, not copied to contiguous
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gate_kind", ["scalar", "per_sample"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 40000)], ids=str)
def test_backward_matches_autograd(backend, device, dtype, gate_kind, shape):
    fresh = randn(shape, dtype, device).requires_grad_()
    cache = randn(shape, dtype, device).requires_grad_()
    residual = randn(shape, dtype, device).requires_grad_()
    gate = make_gate(gate_kind, shape[0], device, requires_grad=True)
    grad = randn(shape, dtype, device)
    with sk.use_backend(backend):
        ours = torch.autograd.grad(sk.gated_blend(fresh, cache, gate, residual), (fresh, cache, gate, residual), grad)
    # Autograd through the fp64 reference is the truth; autograd through the eager
    # composite in the inputs' dtype sets the tolerance.
    leaves = [t.detach().double().requires_grad_() for t in (fresh, cache, gate, residual)]
    exact = torch.autograd.grad(gb.reference(*leaves), leaves, grad.double())
    leaves_same = [t.detach().requires_grad_() for t in (fresh, cache, gate, residual)]
    same = torch.autograd.grad(eager(*leaves_same), leaves_same, grad)
    for name, o, e, s in zip(("fresh", "cache", "gate", "residual"), ours, exact, same):
        assert o.shape == e.shape and o.dtype == s.dtype, name
        # d_gate sums many products: its rounding grows with the sample size.
        atol = atol_for(dtype) * (shape[-1] if name == "gate" else 1)
        assert_close_to_reference(o, e, s, backend=backend, device=device, atol=atol, name=f"d_{name}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_fp64(backend, device):
    fresh, cache, residual = (torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
                              for _ in range(3))
    gate = torch.rand(2, dtype=torch.float64, device=device, requires_grad=True)
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(sk.gated_blend, (fresh, cache, gate, residual))
        assert torch.autograd.gradcheck(lambda f, c, g: sk.gated_blend(f, c, g), (fresh, cache, gate[0]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_only_requested_gradients(backend, device):
    fresh = torch.randn(2, 8, device=device, requires_grad=True)
    cache = torch.randn(2, 8, device=device)
    gate = torch.rand(2, device=device)
    with sk.use_backend(backend):
        (d_fresh,) = torch.autograd.grad(sk.gated_blend(fresh, cache, gate).sum(), fresh)
    torch.testing.assert_close(d_fresh, gate[:, None].expand(2, 8))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_hard_gates_pick_exactly(backend, device):
    fresh, cache = torch.randn(2, 64, device=device), torch.randn(2, 64, device=device)
    with sk.use_backend(backend):
        out = sk.gated_blend(fresh, cache, torch.tensor([1.0, 0.0], device=device))
    assert torch.equal(out[0], fresh[0]) and torch.equal(out[1], cache[1])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    if sk.backends.unavailable_reasons(backend, "cpu", torch.float32):
        pytest.skip(f"{backend} backend unavailable")
    fresh, cache, residual = (torch.randn(2, 3, 5, requires_grad=True) for _ in range(3))
    gate = torch.rand(2, requires_grad=True)
    with sk.use_backend(backend):
        torch.library.opcheck(gb.gated_blend_op, (fresh, cache, gate, residual, backend))
        torch.library.opcheck(gb.gated_blend_op, (fresh, cache, torch.tensor(0.3), None, backend))


@pytest.mark.skipif(bool(sk.backends.unavailable_reasons("cpu", "cpu", torch.float32)), reason="no C++ ext")
def test_gate_gradient_is_deterministic_across_thread_counts():
    fresh, cache = torch.randn(3, 100_003), torch.randn(3, 100_003)
    gate = torch.rand(3, requires_grad=True)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            with sk.use_backend("cpu"):
                grads.append(torch.autograd.grad(sk.gated_blend(fresh, cache, gate).sum(), gate)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_bad_inputs_name_the_argument():
    fresh, cache = torch.randn(2, 3), torch.randn(2, 3)
    gate = torch.rand(2)
    with pytest.raises(ValueError, match="`cache` has shape"):
        sk.gated_blend(fresh, torch.randn(2, 4), gate)
    with pytest.raises(TypeError, match="`cache` has dtype"):
        sk.gated_blend(fresh, cache.double(), gate)
    with pytest.raises(ValueError, match="`residual` is on meta"):
        sk.gated_blend(fresh, cache, gate, torch.randn(2, 3, device="meta"))
    with pytest.raises(ValueError, match="`gate` must be a 0-d tensor or have one value per sample"):
        sk.gated_blend(fresh, cache, torch.rand(3))
    with pytest.raises(TypeError, match="`fresh` must be float16, bfloat16"):
        sk.gated_blend(torch.ones(2, 3, dtype=torch.int64), cache, gate)
    with pytest.raises(TypeError, match="`gate` must be float16"):
        sk.gated_blend(fresh, cache, torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="`gate` contains NaN"):
        sk.gated_blend(fresh, cache, torch.tensor([0.5, float("nan")]))
    with pytest.raises(TypeError, match="`cache` must be a torch.Tensor"):
        sk.gated_blend(fresh, [1.0], gate)


def test_forced_backend_that_cannot_serve_says_why():
    with sk.use_backend("cuda"), pytest.raises(sk.BackendUnavailable, match="runs CUDA tensors"):
        sk.gated_blend(torch.randn(2, 3), torch.randn(2, 3), torch.rand(2))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0, 4), (4,)], ids=str)
def test_empty_and_1d_data(backend, device, shape):
    fresh = torch.randn(shape, device=device, requires_grad=True)
    cache = torch.randn(shape, device=device, requires_grad=True)
    gate = torch.rand(shape[0], device=device, requires_grad=True)
    with sk.use_backend(backend):
        out = sk.gated_blend(fresh, cache, gate)
        grads = torch.autograd.grad(out.sum(), (fresh, cache, gate))
    torch.testing.assert_close(out, gb.reference(fresh, cache, gate))
    leaves = [t.detach().requires_grad_() for t in (fresh, cache, gate)]
    expected = torch.autograd.grad(gb.reference(*leaves).sum(), leaves)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
