"""Loads the compiled extension `shortcut_kernels._C` if it is there.

A CPU-only wheel, a source checkout that was never built or a broken build must all
still import: the error is kept for `python -m shortcut_kernels info` and the other
backends serve instead.
"""
from __future__ import annotations

import importlib

import torch

EXT_NAMESPACE = "shortcut_kernels_ext"

_module = None
_load_error: str | None = None
_loaded = False


def load() -> bool:
    """Imports `_C` once (its static initialisers register the C++ kernels)."""
    global _module, _load_error, _loaded
    if not _loaded:
        _loaded = True
        try:
            _module = importlib.import_module("shortcut_kernels._C")
        except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
            _load_error = f"{type(exc).__name__}: {exc}"
    return _module is not None


def load_error() -> str | None:
    load()
    return _load_error


def ext_op_names() -> list[str]:
    """Qualified names of every op the C++ extension defined."""
    if not load():
        return []
    prefix = EXT_NAMESPACE + "::"
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True when the extension registered a kernel of `op_name` for CPU or CUDA."""
    if not load():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{EXT_NAMESPACE}::{op_name}", dispatch_key)


def ext_op(op_name: str):
    """The op as `_C` exports it (a direct call, ~1 us cheaper than torch.ops), else the
    torch.ops one. Both run the same registered kernels."""
    direct = getattr(_module, op_name, None) if load() else None
    return direct if direct is not None else getattr(getattr(torch.ops, EXT_NAMESPACE), op_name)
