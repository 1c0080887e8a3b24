"""Which implementation serves an op call.

Four backends compute the same functions: `torch` (reference, runs everywhere), `cpu`
(C++ extension, CPU tensors), `cuda` (C++ extension, CUDA tensors) and `triton` (CUDA
tensors; CPU tensors too under TRITON_INTERPRET=1, for tests). `auto` takes the first
that can serve, in the order of AUTO_ORDER, except that CUDA tensors stay on `torch`
until a GPU run of the test suite is recorded (gpu_unvalidated_reason).
`SHORTCUT_KERNELS_BACKEND=name`, or the `use_backend(name)` context manager, forces one
and raises BackendUnavailable (with the reasons) when it cannot serve.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import json
import os
from pathlib import Path

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


# What the innermost use_backend() of the process forces: read instead of the context variable
# when torch.compile traces an op on a torch whose dynamo cannot trace ContextVar.get (2.11).
forced_in_process: str | None = None


def forced() -> str | None:
    """The backend forced by use_backend() in this thread/task, or None."""
    return _forced.get()


def requested() -> str:
    """The backend asked for: use_backend(...) first, then the environment, else 'auto'."""
    name = _forced.get()
    return name if name is not None else _env_backend(os.environ.get(ENV_VAR))


def _env_backend(value: str | None) -> str:
    return (value or "auto").strip().lower() or "auto"


def select(device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend that serves a call on `device`/`dtype`."""
    return resolve(_forced.get(), torch.device(device).type, dtype)


def select_for(t: torch.Tensor) -> str:
    """select() for the device and dtype of `t` (runs on every eager op call)."""
    return resolve(_forced.get(), t.device.type, t.dtype)


_selected: dict = {}


def resolve(forced: str | None, device_type: str, dtype: torch.dtype) -> str:
    """The backend for a call, given what use_backend() forces. Memoised on everything the
    answer depends on (the environment read costs ~1 us of the ~3 us of a call)."""
    key = (forced, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"), device_type, dtype)
    backend = _selected.get(key)
    if backend is None:
        want = forced if forced is not None else _env_backend(key[1])
        backend = _selected[key] = _select(want, device_type, dtype)
    return backend


def _select(want: str, device_type: str, dtype: torch.dtype) -> str:
    interpret = triton_interpret()
    if want != "auto":
        reasons = _reasons(want, device_type, dtype, interpret)
        if reasons:
            raise BackendUnavailable(
                f"shortcut_kernels backend {want!r} (forced by use_backend() or {ENV_VAR}) cannot "
                f"run on {device_type} with {dtype}: " + "; ".join(reasons))
        return want
    if device_type == "cuda" and gpu_unvalidated_reason():
        return "torch"
    for backend in AUTO_ORDER.get(device_type, ("torch",)):
        if not _reasons(backend, device_type, dtype, interpret):
            return backend
    return "torch"


# ---- GPU validation ------------------------------------------------------------------
# The CUDA and Triton kernels serve `auto` only once a GPU run of the test suite is on
# record: written by `python -m shortcut_kernels.gpu_record` (`make gpu`).
GPU_RECORD = Path(__file__).with_name("gpu_validation.json")


def gpu_record() -> dict | None:
    """The recorded GPU run of the test suite, or None."""
    try:
        return json.loads(GPU_RECORD.read_text())
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def gpu_unvalidated_reason() -> str | None:
    """Why `auto` keeps CUDA tensors on the torch reference; None once a passing GPU run
    of the suite is recorded."""
    record = gpu_record()
    if record is not None and record.get("result") == "passed":
        return None
    what = (f"the recorded GPU run did not pass ({record.get('result')!r})" if record is not None
            else f"no GPU run of the test suite is recorded ({GPU_RECORD.name} is missing)")
    return (f"{what}: `auto` runs CUDA tensors on the torch reference, not on the unrun CUDA "
            f"and Triton kernels; use_backend('cuda'|'triton') or {ENV_VAR} still forces them, "
            f"and `make gpu` on a GPU machine records a run")


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a `with` block (thread- and task-local)."""
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    global forced_in_process
    value, previous = (None if name == "auto" else name), forced_in_process
    token = _forced.set(value)
    forced_in_process = value
    try:
        yield
    finally:
        _forced.reset(token)
        forced_in_process = previous


def gpu_status() -> str:
    """One line for `info`: whether `auto` may use the CUDA and Triton kernels, and why."""
    reason = gpu_unvalidated_reason()
    if reason:
        return f"GPU kernels not validated: {reason}"
    record = gpu_record()
    return (f"GPU kernels validated: test suite passed on {record.get('gpu')} with torch "
            f"{record.get('torch')} ({record.get('date')})")


def available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, list[str]]:
    """{backend: reasons it cannot serve} for every backend (empty list = available)."""
    return {b: unavailable_reasons(b, device, dtype) for b in BACKENDS}
