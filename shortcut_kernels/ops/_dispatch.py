"""How a public op call reaches an implementation.

`call_path` picks between the registered custom op (torch.compile), an eager autograd
Function and a direct call; `fast_kernel` lets a direct call skip the Python checks.
`backend_impl` maps backend names to an op's implementations: every op module lists its
torch implementation; the C++ and Triton ones are found by name
(`shortcut_kernels_ext::<op>_<stage>` and `shortcut_kernels.triton.<op>.<op>_<stage>`)
and imported only when first used, so neither is needed to import the package.
"""
from __future__ import annotations

import importlib

import torch

from .. import _ext, _validate as V, backends


def select_backend(t: torch.Tensor) -> str:
    return backends.select_for(t)


COMPILE, AUTOGRAD, DIRECT = "compile", "autograd", "direct"


def call_path(*tensors) -> str:
    """How a public op function runs a call:

    COMPILE   under torch.compile: the registered custom op, so the graph holds the op;
    AUTOGRAD  in eager mode when an input requires grad: the op's eager_autograd Function
              (forward+backward of a small tensor: ~52 us through the custom op's
              autograd, ~35 us through a Function with the same context and backward);
    DIRECT    otherwise: the implementation itself, no dispatcher round trip.
    """
    if torch.compiler.is_compiling():
        return COMPILE
    if torch.is_grad_enabled():
        for t in tensors:  # a plain loop: any() with a generator costs ~0.3 us more
            if isinstance(t, torch.Tensor) and t.requires_grad:  # non-tensors: checked later
                return AUTOGRAD
    return DIRECT


def fast_kernel(forward: "backend_impl", *tensors, nan_checked: bool = False):
    """The C++ forward a public op may call straight away, or None.

    A call qualifies when nothing needs autograd or tracing (DIRECT) and the extension
    serves it. The caller then passes its arguments unchecked and unconverted: the C++
    op checks everything itself, and when it refuses (a wrong input, or one that only
    needs converting, such as a strided view) the caller falls back to the full path,
    which raises the friendly error or converts. This saves 2-6 us per call: the Python
    checks cost more right after a kernel has streamed megabytes through the caches.
    A refusal costs ~10 us (a C++ exception), so callers take this path only with
    coefficients already in the kernel's form.
    `nan_checked`: the op checks its gate for NaN, which the CUDA kernel leaves to the
    Python path when SHORTCUT_KERNELS_CHECK_NAN=1.
    """
    ref = tensors[0]
    if type(ref) is not torch.Tensor or call_path(*tensors) != DIRECT:
        return None
    try:
        backend = backends.select_for(ref)
    except backends.BackendUnavailable:
        return None  # the full path checks the arguments first, then says why
    if backend == "cpu" or (backend == "cuda" and not (nan_checked and V.nan_checks_enabled(ref))):
        return forward[backend]
    return None


def eager_autograd(name: str, forward, setup_context, backward, registered_backward) -> type:
    """A torch.autograd.Function for eager calls of a custom op: `forward(*inputs)` is the
    op's implementation and `setup_context(ctx, inputs, output)` the one registered with
    the op. `backward(ctx, *grads)` calls the backward implementation directly;
    `registered_backward` is the op's registered autograd formula, which goes through the
    backward custom op. It runs when the gradient itself must be differentiable
    (create_graph=True): then the terms that are g itself stay differentiable and the
    others raise, exactly as through the custom op, instead of being cut off."""

    def fn_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def fn_backward(ctx, *grads):
        # The engine enables grad mode inside backward exactly when create_graph=True.
        return (registered_backward if torch.is_grad_enabled() else backward)(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fn_forward),
        "backward": staticmethod(fn_backward),
    })


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
