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
