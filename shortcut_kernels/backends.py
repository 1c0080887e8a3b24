"""Which implementation serves an op call.

Four backends compute the same functions: `torch` (reference, runs everywhere), `cpu`
(C++ extension, CPU tensors), `cuda` (C++ extension, CUDA tensors) and `triton` (CUDA
tensors; CPU tensors too under TRITON_INTERPRET=1, for tests). `auto` takes the first
that can serve, in the order of AUTO_ORDER. `SHORTCUT_KERNELS_BACKEND=name`, or the
`use_backend(name)` context manager, forces one and raises BackendUnavailable (with the
reasons) when it cannot serve.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os

import torch

from . import _ext

BACKENDS = ("torch", "cpu", "triton", "cuda")
ENV_VAR = "SHORTCUT_KERNELS_BACKEND"
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("shortcut_backend", default=None)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve a call; the message lists why."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must not break the package
        return f"triton failed to import: {type(exc).__name__}: {exc}"
    return None


def unavailable_reasons(backend: str, device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Why `backend` cannot run an op on `device`/`dtype`; empty when it can."""
    device_type = torch.device(device).type
    return list(_reasons(backend, device_type, dtype, triton_interpret()))


@functools.lru_cache(maxsize=256)
def _reasons(backend: str, device_type: str, dtype: torch.dtype, interpret: bool) -> tuple:
    # Memoised: select() runs on every op call and must cost well under a microsecond.
    device = torch.device(device_type)
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'"]
    reasons = []
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype} is not one of float16, bfloat16, float32, float64")
    if backend == "torch":
        return tuple(reasons)
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and interpret):
            reasons.append(f"triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device.type}")
        error = _triton_import_error()
        if error:
            reasons.append(error)
        return tuple(reasons)
    # The C++ extension: `cpu` serves CPU tensors, `cuda` CUDA tensors.
    if device.type != backend:
        reasons.append(f"the {backend} backend runs {backend.upper()} tensors, got {device.type}")
    if not _ext.load():
        reasons.append(f"the C++ extension shortcut_kernels._C did not load ({_ext.load_error()})")
    elif not _ext.has_kernel("gated_blend_forward", backend.upper()):
        reasons.append(f"shortcut_kernels._C was built without {backend.upper()} kernels")
    return tuple(reasons)


def requested() -> str:
    """The backend asked for: use_backend(...) first, then the environment, else 'auto'."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"


_selected: dict = {}
# os.environ.get costs ~0.5 us (it encodes and decodes); its bytes mapping is what
# os.environ reads and writes through, so a lookup there sees every change at ~30 ns.
_ENV_BYTES = getattr(os.environ, "_data", None)
_ENV_KEYS = (ENV_VAR.encode(), b"TRITON_INTERPRET")


if isinstance(_ENV_BYTES, dict) and os.name == "posix":
    def _env_key() -> tuple:
        return (_ENV_BYTES.get(_ENV_KEYS[0]), _ENV_BYTES.get(_ENV_KEYS[1]))
else:
    def _env_key() -> tuple:
        return (os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"))


def select(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that serves a call on `device`/`dtype`."""
    return _memoised(torch.device(device).type, dtype)


def select_for(t: torch.Tensor) -> str:
    """select() for the device and dtype of `t`, without building a torch.device (this
    runs on every op call: _memoised inlined)."""
    device_type = "cuda" if t.is_cuda else ("cpu" if t.is_cpu else t.device.type)
    backend = _selected.get((_forced.get(), _env_key(), device_type, t.dtype))
    return backend if backend is not None else _memoised(device_type, t.dtype)


def _memoised(device_type: str, dtype: torch.dtype) -> str:
    # Runs on every op call: memoised on everything the answer depends on.
    key = (_forced.get(), _env_key(), device_type, dtype)
    backend = _selected.get(key)
    if backend is None:
        backend = _selected[key] = _select(torch.device(device_type), dtype)
    return backend


def _select(device: torch.device, dtype: torch.dtype) -> str:
    want = requested()
    interpret = triton_interpret()
    if want != "auto":
        reasons = _reasons(want, device.type, dtype, interpret)
        if reasons:
            raise BackendUnavailable(
                f"shortcut_kernels backend {want!r} (forced by use_backend() or {ENV_VAR}) cannot "
                f"run on {device} with {dtype}: " + "; ".join(reasons))
        return want
    for backend in AUTO_ORDER.get(device.type, ("torch",)):
        if not _reasons(backend, device.type, dtype, interpret):
            return backend
    return "torch"


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a `with` block (thread- and task-local)."""
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    token = _forced.set(None if name == "auto" else name)
    try:
        yield
    finally:
        _forced.reset(token)


def available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, list[str]]:
    """{backend: reasons it cannot serve} for every backend (empty list = available)."""
    return {b: unavailable_reasons(b, device, dtype) for b in BACKENDS}
