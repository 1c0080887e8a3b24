"""Input checks and layout normalisation shared by every op.

Errors name the op and the argument, so a user sees e.g.
"gated_blend: `cache` has shape (2, 4) but `fresh` has shape (2, 3)".
"""
from __future__ import annotations

import os

import torch

from .backends import SUPPORTED_DTYPES

_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for every storage type but fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(t, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: `{name}` must be {_DTYPE_NAMES}, got {t.dtype}")


def check_like(ref: torch.Tensor, ref_name: str, t, name: str, op: str) -> None:
    """`t` must match `ref` in shape, dtype and device."""
    check_tensor(t, name, op)
    if t.shape != ref.shape:
        raise ValueError(f"{op}: `{name}` has shape {tuple(t.shape)} but `{ref_name}` has shape {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `{ref_name}` has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}")


def check_per_sample_shape(coef, name: str, ref: torch.Tensor, op: str) -> None:
    """A coefficient that is one value, or one value per sample (shape [B] or [B,1,...,1])."""
    check_tensor(coef, name, op)
    if coef.device != ref.device:
        raise ValueError(f"{op}: `{name}` is on {coef.device} but the data is on {ref.device}")
    shape, ref_shape = coef.shape, ref.shape
    if not shape or shape == (1,):
        return
    if ref_shape and shape[0] == ref_shape[0] and len(shape) <= len(ref_shape) and coef.numel() == shape[0]:
        return
    batch = ref_shape[0] if ref_shape else None
    raise ValueError(f"{op}: `{name}` must be a 0-d tensor or have one value per sample "
                     f"(shape [{batch}]), got shape {tuple(shape)}")


def per_sample(coef: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Shape-checked coefficient -> contiguous acc-dtype tensor, 0-d or [B]."""
    acc = acc_dtype(ref.dtype)
    if coef.dtype == acc and coef.dim() == 1 and coef.is_contiguous() and coef.numel() > 1:
        return coef  # the common case, no new tensor (kernels run below autograd)
    coef = coef.detach().to(acc)
    if coef.numel() == 1:
        return coef.reshape(())  # one value for all samples (or the only sample)
    return coef.reshape(-1).contiguous()


def nan_checks_enabled(t: torch.Tensor) -> bool:
    """NaN checks cost a device sync on GPUs: always on for CPU tensors, opt-in on CUDA
    (SHORTCUT_KERNELS_CHECK_NAN=1), never while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    if os.environ.get("SHORTCUT_KERNELS_CHECK_NAN", "0") != "1":  # first: the default, and cheaper
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_no_nan(coef: torch.Tensor, name: str, op: str) -> None:
    if nan_checks_enabled(coef) and bool(torch.isnan(coef).any()):
        raise ValueError(f"{op}: `{name}` contains NaN; a NaN gate would silently poison the output")


def _layout_formats(t: torch.Tensor) -> set:
    formats = set()
    if t.is_contiguous():
        formats.add(torch.contiguous_format)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        formats.add(torch.channels_last)
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        formats.add(torch.channels_last_3d)
    return formats


def dense(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The kernels walk tensors as flat arrays with the batch outermost. Tensors already
    sharing such a layout (contiguous, or all channels_last) pass as they are; anything
    else (transposed, sliced, expanded) is copied to contiguous once."""
    for t in tensors:  # the common case, checked first and cheaply
        if t is not None and not t.is_contiguous():
            break
    else:
        return tensors
    present = [t for t in tensors if t is not None]
    common = None
    for t in present:
        common = _layout_formats(t) if common is None else common & _layout_formats(t)
    if common:
        return list(tensors)
    return [t.contiguous() if t is not None else None for t in tensors]


def in_layout_of(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`out` with the strides of torch.empty_like(ref), what the kernels return and the
    registered ops' fake functions promise (torch.compile trusts the promise). Only the
    torch reference may differ (its ops pick strides of their own); it is copied then."""
    if out.stride() == ref.stride() or out.numel() == 0:
        return out
    return torch.empty_like(ref, dtype=out.dtype).copy_(out)
