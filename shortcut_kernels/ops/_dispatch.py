"""How a public op call reaches an implementation: two call paths, one backward formula.

- Eager calls go through the op's torch.autograd.Function (`differentiable`): its forward
  calls the chosen backend's kernel directly, and its backward calls the backward kernel
  of that same backend, saved on the autograd context (autograd may run the backward on
  another thread, where `use_backend` is not in force).
- Under torch.compile the graph holds the registered custom op
  (torch.ops.shortcut_kernels.<op>). The backend is an argument of the op, chosen when
  the function is traced: `use_backend` is guarded (changing it recompiles; on a torch whose
  dynamo cannot trace context variables, through the process-wide value it keeps),
  SHORTCUT_KERNELS_BACKEND is read once.

Both paths run the same `backward(ctx, kernels, *grads)` formula; `kernels` is the
backward implementation called directly, or the registered backward op when the gradient
must itself be differentiable (create_graph=True, or compiled code).

`backend_impl` maps backend names to an op's implementations: every op module lists its
torch implementation; the C++ and Triton ones are found by name
(`shortcut_kernels_ext::<op>_<stage>` and `shortcut_kernels.triton.<op>.<op>_<stage>`)
and imported only when first used, so neither is needed to import the package.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .. import _ext, backends


def select_backend(t: torch.Tensor) -> str:
    """The backend that serves a call on `t`: use_backend(), the environment, or auto."""
    if torch.compiler.is_compiling():
        # Read here, where dynamo guards on it: the context variable, or on a torch whose dynamo
        # cannot trace ContextVar.get the process-wide value use_backend() keeps beside it.
        forced = backends.forced() if _dynamo_traces_context_variables() else backends.forced_in_process
        return _backend_when_traced(forced, t.device.type, t.dtype)
    return backends.select_for(t)


@torch.compiler.assume_constant_result
def _dynamo_traces_context_variables() -> bool:
    from torch._dynamo import variables

    return hasattr(variables, "ContextVarVariable")


@torch.compiler.assume_constant_result
def _backend_when_traced(forced, device_type: str, dtype: torch.dtype) -> str:
    return backends.resolve(forced, device_type, dtype)


def differentiable(op, name: str, forward, setup_context, backward, backward_kernels, backward_op) -> type:
    """Attaches autograd to the registered `op` and returns the eager Function of the op.

    `forward(*inputs)` runs the kernels (inputs end with the backend name);
    `setup_context(ctx, inputs, output)` saves what the backward needs, `ctx.backend`
    included; `backward(ctx, kernels, *grads)` returns the gradients of the differentiable
    inputs (the backend and any trailing argument get None)."""

    def padded(ctx, kernels, grads):
        got = backward(ctx, kernels, *grads)
        return tuple(got) + (None,) * (ctx.num_inputs - len(got))

    def save(ctx, inputs, output):
        ctx.num_inputs = len(inputs)
        setup_context(ctx, inputs, output)

    op.register_autograd(lambda ctx, *grads: padded(ctx, backward_op, grads), setup_context=save)

    def fn_forward(ctx, *inputs):
        output = forward(*inputs)
        save(ctx, inputs, output)
        return output

    def fn_backward(ctx, *grads):
        # The engine enables grad mode inside backward exactly when create_graph=True: then
        # the registered backward op keeps the terms that are g itself differentiable.
        return padded(ctx, backward_op if torch.is_grad_enabled() else backward_kernels, grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fn_forward),
        "backward": staticmethod(fn_backward),
        "kernels": staticmethod(forward),  # the forward alone: see `eager`
    })


def eager(function: type, *inputs):
    """An eager call: the Function when autograd records a graph, else its forward alone.

    With no graph to record (no grad mode, inference mode, or no input requiring grad) the
    Function's context, setup and node are pure host cost, and at the activation sizes of a
    sampling step the host side sets an op's time on a GPU. Forward-mode AD keeps the Function,
    which raises there rather than dropping the tangents."""
    if (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs)) \
            or _forward_ad_active():
        return function.apply(*inputs)
    return function.kernels(*inputs)


def _forward_ad_active() -> bool:
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def call(op, function: type, *inputs):
    """The registered op under torch.compile, the eager Function (or its forward) otherwise."""
    if torch.compiler.is_compiling():
        return op(*inputs)
    return eager(function, *inputs)


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
