"""Maps backend names to an op's implementations.

Every op module lists its torch implementation; the C++ and Triton ones are found by
name (`shortcut_kernels_ext::<op>_<stage>` and `shortcut_kernels.triton.<op>.<op>_<stage>`)
and imported only when first used, so neither is needed to import the package.
"""
from __future__ import annotations

import importlib

import torch

from .. import _ext, backends


def select_backend(t: torch.Tensor) -> str:
    return backends.select(t.device, t.dtype)


def use_registered_op(*tensors) -> bool:
    """True when a call must go through the registered custom op: autograd needs it, and
    torch.compile must see the op, not its implementation. Otherwise the public
    functions call the implementation directly and skip the dispatcher round trip
    (several microseconds per call, which matters at UNet sizes on a GPU)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class backend_impl(dict):
    """{backend: callable} for one stage ("forward"/"backward") of one op, filled lazily."""

    def __init__(self, op: str, stage: str, torch_impl):
        super().__init__(torch=torch_impl)
        self.op, self.stage = op, stage

    def __missing__(self, backend: str):
        name = f"{self.op}_{self.stage}"
        if backend in ("cpu", "cuda"):
            _ext.load()
            impl = _ext.ext_op(name)
        elif backend == "triton":
            impl = getattr(importlib.import_module(f"shortcut_kernels.triton.{self.op}"), name)
        else:
            raise KeyError(backend)
        self[backend] = impl
        return impl
