"""Shared pieces of the op tests: which backends run here, inputs, tolerances."""
from __future__ import annotations

import pytest
import torch

import shortcut_kernels  # noqa: F401  (registers the ops, loads the extension)
from shortcut_kernels import backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def backend_params():
    """(backend, device) pairs: every backend on CPU tensors, GPU ones marked `gpu`."""
    params = [pytest.param("torch", "cpu", id="torch-cpu"),
              pytest.param("cpu", "cpu", id="cpu-cpu",
                           marks=pytest.mark.skipif(bool(backends.unavailable_reasons("cpu", "cpu", torch.float32)),
                                                    reason="C++ extension not built")),
              pytest.param("triton", "cpu", id="triton-interpret",
                           marks=pytest.mark.skipif(bool(backends.unavailable_reasons("triton", "cpu", torch.float32)),
                                                    reason="triton interpreter unavailable (GPU present or no triton)"))]
    for backend in ("cuda", "triton", "torch"):
        params.append(pytest.param(backend, "cuda", id=f"{backend}-gpu", marks=pytest.mark.gpu))
    return params


BACKENDS = backend_params()


def is_interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def randn(shape, dtype, device, layout="contiguous"):
    """A random tensor of `shape` in one of three layouts: contiguous, channels_last,
    or a strided (non-contiguous) view."""
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        return torch.randn(shape, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a twice-as-wide tensor
        wide = torch.randn(*shape[:-1], shape[-1] * 2, dtype=dtype, device=device)
        view = wide[..., ::2]
        assert not view.is_contiguous() or view.numel() <= 1
        return view
    raise ValueError(layout)


LAYOUTS = ["strided", "channels_last", "mixed"]


def three_in_layout(shape, dtype, device, layout):
    """Three 4-D tensors of `shape` in one layout, or "mixed": one channels_last, one
    contiguous and one transposed view (the wrappers must bring them to one layout)."""
    if layout == "mixed":
        transposed = (*shape[:2], shape[3], shape[2])
        return (randn(shape, dtype, device, "channels_last"), randn(shape, dtype, device),
                randn(transposed, dtype, device).transpose(2, 3))
    return tuple(randn(shape, dtype, device, layout) for _ in range(3))


def assert_close_to_reference(out, ref32, torch_same_dtype, *, backend="torch", device="cpu",
                              atol=1e-6, name="output"):
    """|out - ref32| <= 2*|torch_same_dtype - ref32| + atol (+1 ulp for the interpreter's
    truncating reduced-precision stores), elementwise."""
    out, ref32, same = out.double(), ref32.double(), torch_same_dtype.double()
    allowed = 2 * (same - ref32).abs() + atol
    if is_interpreted(backend, device) and torch_same_dtype.dtype in (torch.bfloat16, torch.float16):
        allowed = allowed + ref32.abs() * torch.finfo(torch_same_dtype.dtype).eps
    err = (out - ref32).abs()
    bad = err > allowed
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements off; worst error "
                           f"{err.max().item():.3g} where allowed {allowed[bad].min().item():.3g}")


def atol_for(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
