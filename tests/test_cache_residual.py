"""cache_residual: every backend against the reference (one to many caches, one rounding),
layouts, gradients, opcheck, bad inputs."""
import importlib

import pytest
import torch
from _helpers import BACKENDS, DTYPES, LAYOUTS, assert_close_to_reference, atol_for, randn, three_in_layout

import shortcut_kernels as sk

cr = importlib.import_module("shortcut_kernels.ops.cache_residual")
cache_residual = cr.cache_residual

SHAPES = [(2, 3, 5, 7), (1, 17), (3, 1, 33, 9), (2, 77, 24)]


def eager(x, caches):
    """What a user writes: one addition per cache, each rounded to the inputs' dtype."""
    out = x
    for cache in caches:
        out = out + cache
    return out


def truth(x, caches):
    return cr.reference(x.double(), [c.double() for c in caches])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("num_caches", [1, 2, 5, 11])  # 11: more than one launch's worth on GPUs
def test_forward_matches_reference(backend, device, dtype, shape, num_caches):
    x = randn(shape, dtype, device)
    caches = [randn(shape, dtype, device) for _ in range(num_caches)]
    with sk.use_backend(backend):
        out = cache_residual(x, caches)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert_close_to_reference(out, truth(x, caches), eager(x, caches),
                              backend=backend, device=device, atol=atol_for(dtype))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("num_caches", [6, 10])  # several launches on GPUs
def test_one_rounding_for_long_sums(backend, device, num_caches):
    """A bf16 running sum loses every small term; the fp32 sum keeps them all and lands
    exactly on a bf16 value (1 + k*2^-9 with k = 4 or 8)."""
    x = torch.full((4, 64), 1.0, dtype=torch.bfloat16, device=device)
    small = torch.full_like(x, 2.0 ** -9)  # a quarter of an ulp of 1 in bf16
    big, minus_big = torch.full_like(x, 256.0), torch.full_like(x, -256.0)
    caches = [small] * (num_caches - 2) + [big, minus_big]
    with sk.use_backend(backend):
        out = cache_residual(x, caches)
    expected = 1 + (num_caches - 2) * 2.0 ** -9
    assert torch.equal(out, torch.full_like(x, expected))
    assert not torch.equal(eager(x, caches), out)  # what separate additions would give


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_any_layout(backend, device, layout, dtype):
    x, *caches = three_in_layout((3, 6, 5, 7), dtype, device, layout)
    with sk.use_backend(backend):
        out = cache_residual(x, caches)
    assert_close_to_reference(out, truth(x, caches), eager(x, caches),
                              backend=backend, device=device, atol=atol_for(dtype))
    if layout == "channels_last":  # a dense layout is kept, not copied to contiguous
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_single_tensor_and_tuple(backend, device):
    x, c = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device)
    with sk.use_backend(backend):
        torch.testing.assert_close(cache_residual(x, c), x + c)
        torch.testing.assert_close(cache_residual(x, (c, c)), x + c + c)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_every_grad_is_g(backend, device, dtype):
    x = randn((2, 9, 4), dtype, device).requires_grad_()
    caches = [randn((2, 9, 4), dtype, device).requires_grad_() for _ in range(3)]
    frozen = randn((2, 9, 4), dtype, device)  # a cache without grad in the middle
    grad = randn((2, 9, 4), dtype, device)
    with sk.use_backend(backend):
        out = cache_residual(x, [caches[0], frozen, caches[1], caches[2]])
        grads = torch.autograd.grad(out, [x, *caches], grad)
    for g in grads:
        assert g.dtype == dtype and torch.equal(g, grad)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_fp64(backend, device):
    x, a, b = (torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, a, b: cache_residual(x, [a, b, a]), (x, a, b))
        assert torch.autograd.gradcheck(lambda x, a: cache_residual(x, a), (x, a))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0, 4), (4,), ()], ids=str)
def test_empty_and_tiny_data(backend, device, shape):
    x, a, b = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    with sk.use_backend(backend):
        out = cache_residual(x, [a, b])
        grads = torch.autograd.grad(out.sum(), (x, a, b))
    torch.testing.assert_close(out, x + a + b)
    for g in grads:
        torch.testing.assert_close(g, torch.ones_like(x))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck(backend):
    if sk.backends.unavailable_reasons(backend, "cpu", torch.float32):
        pytest.skip(f"{backend} backend unavailable")
    x, a, b = (torch.randn(2, 3, 5, requires_grad=True) for _ in range(3))
    cl = [torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last) for _ in range(2)]
    with sk.use_backend(backend):
        torch.library.opcheck(cr.cache_residual_op, (x, [a, b], backend))
        torch.library.opcheck(cr.cache_residual_op, (x, [a.detach()], backend))
        torch.library.opcheck(cr.cache_residual_op, (cl[0], [cl[1], torch.randn(2, 3, 4, 5)], backend))


def test_bad_inputs_name_the_argument():
    x, c = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"`caches\[1\]` has shape"):
        cache_residual(x, [c, torch.randn(2, 4)])
    with pytest.raises(TypeError, match=r"`caches\[0\]` has dtype"):
        cache_residual(x, [c.double()])
    with pytest.raises(ValueError, match=r"`caches\[2\]` is on meta"):
        cache_residual(x, [c, c, torch.randn(2, 3, device="meta")])
    with pytest.raises(TypeError, match=r"`caches\[1\]` must be a torch.Tensor"):
        cache_residual(x, [c, 1.0])
    with pytest.raises(TypeError, match=r"`caches\[0\]` must be float16"):
        cache_residual(x, [torch.ones(2, 3, dtype=torch.int32)])
    with pytest.raises(TypeError, match="`x` must be float16, bfloat16"):
        cache_residual(torch.ones(2, 3, dtype=torch.int64), [c])
    with pytest.raises(ValueError, match="at least one tensor"):
        cache_residual(x, [])
    with pytest.raises(TypeError, match="`caches` must be a tensor or a list/tuple"):
        cache_residual(x, None)


@pytest.mark.skipif(bool(sk.backends.unavailable_reasons("cpu", "cpu", torch.float32)), reason="no C++ ext")
def test_extension_checks_direct_calls():
    ext = torch.ops.shortcut_kernels_ext
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="at least one tensor"):
        ext.cache_residual_forward(x, [])
    with pytest.raises(RuntimeError, match=r"`caches\[1\]` has shape"):
        ext.cache_residual_forward(x, [x, torch.randn(3)])
    with pytest.raises(RuntimeError, match=r"`caches\[0\]` must (have the same strides|share the dense layout)"):
        ext.cache_residual_forward(x, [torch.randn(3, 2).t()])


# ---- weighted: out = x + w[0]*caches[0] + ... + w[K-1]*caches[K-1] ---------------------

def eager_weighted(x, caches, weights):
    """What a user writes: one multiply-add per cache, each rounded to the inputs' dtype."""
    out = x
    for w, cache in zip(weights.to(x.dtype), caches):
        out = out + w * cache
    return out


def truth_weighted(x, caches, weights):
    """fp64 truth of the definition: the weights as the op uses them (in x's accumulation dtype)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return cr.reference(x.double(), [c.double() for c in caches], weights.to(acc).double())


def random_weights(num_caches, device, dtype=torch.float32):
    """Weights like a forecast's: of either sign, some above 1."""
    return (torch.randn(num_caches, dtype=torch.float64) * 1.5).to(dtype).to(device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("num_caches", [1, 2, 3, 4, 5, 11])  # every streaming count, blocked, several launches
def test_weighted_forward_matches_reference(backend, device, dtype, shape, num_caches):
    x = randn(shape, dtype, device)
    caches = [randn(shape, dtype, device) for _ in range(num_caches)]
    weights = random_weights(num_caches, device)
    with sk.use_backend(backend):
        out = cache_residual(x, caches, weights=weights)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert_close_to_reference(out, truth_weighted(x, caches, weights), eager_weighted(x, caches, weights),
                              backend=backend, device=device, atol=atol_for(dtype) * 4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("num_caches", [2, 5, 11])
def test_unit_weights_are_the_plain_sum_bit_for_bit(backend, device, num_caches):
    x = randn((3, 40), torch.bfloat16, device)
    caches = [randn((3, 40), torch.bfloat16, device) for _ in range(num_caches)]
    with sk.use_backend(backend):
        plain = cache_residual(x, caches)
        ones = cache_residual(x, caches, weights=torch.ones(num_caches, device=device))
    assert torch.equal(plain, ones)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("weights_dtype", DTYPES, ids=str)
def test_weights_of_any_float_dtype_are_used_in_the_accumulation_dtype(backend, device, weights_dtype):
    x = randn((2, 33), torch.float32, device)
    caches = [randn((2, 33), torch.float32, device) for _ in range(3)]
    weights = random_weights(3, device, weights_dtype)
    with sk.use_backend(backend):
        got = cache_residual(x, caches, weights=weights)
        want = cache_residual(x, caches, weights=weights.float())
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("num_caches", [6, 10])  # blocked on the CPU, several launches on GPUs
def test_weighted_one_rounding_for_long_sums(backend, device, num_caches):
    """As the unweighted test: small weighted terms (0.5 * 2^-8 = 2^-9, a quarter of an ulp of 1
    in bf16) survive the fp32 sum, and the result lands exactly on a bf16 value."""
    x = torch.full((4, 64), 1.0, dtype=torch.bfloat16, device=device)
    small = torch.full_like(x, 2.0 ** -8)
    big, minus_big = torch.full_like(x, 128.0), torch.full_like(x, -256.0)
    caches = [small] * (num_caches - 2) + [big, minus_big]
    weights = torch.tensor([0.5] * (num_caches - 2) + [2.0, 1.0], device=device)
    with sk.use_backend(backend):
        out = cache_residual(x, caches, weights=weights)
    assert torch.equal(out, torch.full_like(x, 1 + (num_caches - 2) * 2.0 ** -9))
    assert not torch.equal(eager_weighted(x, caches, weights), out)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_weighted_any_layout(backend, device, layout):
    x, *caches = three_in_layout((3, 6, 5, 7), torch.float32, device, layout)
    weights = random_weights(2, device)
    with sk.use_backend(backend):
        out = cache_residual(x, caches, weights)
    assert_close_to_reference(out, truth_weighted(x, caches, weights), eager_weighted(x, caches, weights),
                              backend=backend, device=device, atol=1e-5)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def _autograd_reference(x, caches, weights):
    """The definition in plain differentiable torch, fp32 (fp64 for fp64) math."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(acc)
    for k, cache in enumerate(caches):
        out = out + weights.to(acc)[k] * cache.to(acc)
    return out.to(x.dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weights_grad", [True, False])
def test_weighted_gradients_match_autograd(backend, device, dtype, weights_dtype, weights_grad):
    shape = (2, 9, 4)
    x = randn(shape, dtype, device).requires_grad_()
    caches = [randn(shape, dtype, device).requires_grad_() for _ in range(4)]
    frozen = randn(shape, dtype, device)  # a cache without grad in the middle
    weights = random_weights(5, device, weights_dtype).requires_grad_(weights_grad)
    grad = randn(shape, dtype, device)
    order = [caches[0], frozen, caches[1], caches[2], caches[3]]
    leaves = [x, *caches] + ([weights] if weights_grad else [])
    with sk.use_backend(backend):
        got = torch.autograd.grad(cache_residual(x, order, weights), leaves, grad)
    want = torch.autograd.grad(_autograd_reference(x, order, weights), leaves, grad)
    assert torch.equal(got[0], grad)  # dx = g
    for g, w, leaf in zip(got, want, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        torch.testing.assert_close(g, w, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_weighted_gradcheck_fp64(backend, device):
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
    x, a, b, w3, w1 = leaf(2, 3, 4), leaf(2, 3, 4), leaf(2, 3, 4), leaf(3), leaf(1)
    with sk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, a, b, w: cache_residual(x, [a, b, a], w), (x, a, b, w3))
        assert torch.autograd.gradcheck(lambda x, a, w: cache_residual(x, a, w), (x, a, w1))
        assert torch.autograd.gradgradcheck(lambda x, a, b, w: cache_residual(x, [a, b, a], w), (x, a, b, w3))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (4,), ()], ids=str)
def test_weighted_empty_and_tiny_data(backend, device, shape):
    x, a, b = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    w = torch.tensor([0.5, -2.0], device=device, requires_grad=True)
    with sk.use_backend(backend):
        out = cache_residual(x, [a, b], w)
        dx, da, db, dw = torch.autograd.grad(out.sum(), (x, a, b, w))
    torch.testing.assert_close(out, x + 0.5 * a - 2 * b)
    torch.testing.assert_close(dx, torch.ones_like(x))
    torch.testing.assert_close(da, torch.full_like(a, 0.5))
    torch.testing.assert_close(dw, torch.stack([a.sum(), b.sum()]).detach())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck_weighted(backend):
    if sk.backends.unavailable_reasons(backend, "cpu", torch.float32):
        pytest.skip(f"{backend} backend unavailable")
    x, a, b = (torch.randn(2, 3, 5, requires_grad=True) for _ in range(3))
    w = torch.randn(2, requires_grad=True)
    cl = [torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last) for _ in range(2)]
    with sk.use_backend(backend):
        torch.library.opcheck(cr.cache_residual_op, (x, [a, b], backend, w))
        torch.library.opcheck(cr.cache_residual_op, (x, [a.detach()], backend, w.detach()[:1].double()))
        torch.library.opcheck(cr.cache_residual_op, (cl[0], [cl[1], torch.randn(2, 3, 4, 5)], backend, w.detach()))


def test_bad_weights_name_the_argument():
    x, c = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"`weights` must have shape \[2\]"):
        cache_residual(x, [c, c], torch.ones(3))
    with pytest.raises(ValueError, match=r"`weights` must have shape \[2\]"):
        cache_residual(x, [c, c], torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"`weights` must have shape \[1\]"):
        cache_residual(x, c, torch.tensor(1.0))
    with pytest.raises(TypeError, match="`weights` must be a floating-point tensor"):
        cache_residual(x, [c, c], torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="`weights` is on meta"):
        cache_residual(x, [c, c], torch.ones(2, device="meta"))
    with pytest.raises(TypeError, match="`weights` must be a 1-D tensor"):
        cache_residual(x, [c, c], [1.0, 2.0])


@pytest.mark.skipif(bool(sk.backends.unavailable_reasons("cpu", "cpu", torch.float32)), reason="no C++ ext")
def test_extension_checks_weights_of_direct_calls():
    ext = torch.ops.shortcut_kernels_ext
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"`weights` must have shape \[2\]"):
        ext.cache_residual_forward(x, [x, x], torch.ones(3))
    with pytest.raises(RuntimeError, match="`weights` must be Float"):
        ext.cache_residual_forward(x, [x, x], torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="`weights` must be contiguous"):
        ext.cache_residual_forward(x, [x, x], torch.ones(4)[::2])
    torch.testing.assert_close(ext.cache_residual_forward(x, [x, x], torch.tensor([2.0, -1.0])), 2 * x)


# ---- torch.compile with weights: tensor inputs of one graph ------------------------------

def _compile_backends():
    return [b for b in ("cpu", "torch") if not sk.backends.unavailable_reasons(b, "cpu", torch.float32)]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compile_weighted_fullgraph_matches_eager_and_does_not_recompile(backend):
    if backend not in _compile_backends():
        pytest.skip(f"{backend} backend unavailable")
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(x, a, b, w):
        return cache_residual(x * 2, [a, b], w).square()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)  # a graph break raises
    x, a, b = (torch.randn(2, 8, 5, requires_grad=True) for _ in range(3))
    with sk.use_backend(backend):
        for values in ([1.5, -0.5], [3.0, -2.0], [-0.25, 1.25]):  # new values: the same graph
            w = torch.tensor(values, requires_grad=True)
            got = compiled(x, a, b, w)
            want = fn(x, a, b, w)
            torch.testing.assert_close(got, want)
            for g, e in zip(torch.autograd.grad(got.sum(), (x, a, b, w)),
                            torch.autograd.grad(want.sum(), (x, a, b, w))):
                torch.testing.assert_close(g, e)
    assert counter.frame_count == 1
    with sk.use_backend(backend), torch.no_grad():  # inductor too
        torch._dynamo.reset()
        w = torch.tensor([0.5, 2.0])
        inductor = torch.compile(fn, fullgraph=True, backend="inductor")
        torch.testing.assert_close(inductor(x, a, b, w), fn(x, a, b, w))


def test_compiled_graph_keeps_the_weighted_op():
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    recorder = EagerAndRecordGraphs()
    x, a, b = (torch.randn(2, 8) for _ in range(3))
    torch.compile(lambda x, a, b, w: cache_residual(x, [a, b], w), fullgraph=True, backend=recorder)(
        x, a, b, torch.tensor([0.5, 1.5]))
    assert len(recorder.graphs) == 1 and "shortcut_kernels.cache_residual" in recorder.graphs[0].code
