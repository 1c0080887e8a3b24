"""torch.compile(fullgraph=True) over a function that uses all four ops, forward and
backward, against the same function in eager mode."""
import pytest
import torch

import shortcut_kernels as sk


def block_step(x, fresh, cache, gate, y, ada_gate, eps_u, eps_c):
    """A toy step that touches every op the way DiP-GO / SDO do."""
    h = sk.gated_blend(fresh, cache, gate)                   # SuperNet block output
    h = sk.gated_residual(h.flatten(2).transpose(1, 2), y, ada_gate)  # DiT-style residual
    h = sk.cache_residual(h, [y, y * 0.5])                   # two pruned blocks reused
    eps = h.transpose(1, 2).reshape_as(x)
    return sk.guided_step(x, eps_u + eps, eps_c, 0.98, -0.1, 3.0)


def make_inputs(requires_grad):
    b, c, hgt, wid = 2, 8, 4, 5
    x = torch.randn(b, c, hgt, wid)
    fresh, cache = torch.randn(b, c, hgt, wid), torch.randn(b, c, hgt, wid)
    gate = torch.rand(b)
    y = torch.randn(b, hgt * wid, c)
    ada_gate = torch.randn(b, c)
    eps_u, eps_c = torch.randn(b, c, hgt, wid), torch.randn(b, c, hgt, wid)
    inputs = [x, fresh, cache, gate, y, ada_gate, eps_u, eps_c]
    return [t.requires_grad_(requires_grad) for t in inputs]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compile_fullgraph_matches_eager(backend):
    if sk.backends.unavailable_reasons(backend, "cpu", torch.float32):
        pytest.skip(f"{backend} backend unavailable")
    torch._dynamo.reset()
    compiled = torch.compile(block_step, fullgraph=True, backend="inductor")
    inputs = make_inputs(requires_grad=True)
    with sk.use_backend(backend):
        expected = block_step(*inputs)
        grads_expected = torch.autograd.grad(expected.square().sum(), inputs)
        got = compiled(*inputs)
        grads_got = torch.autograd.grad(got.square().sum(), inputs)
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads_got, grads_expected):
        torch.testing.assert_close(g, e)


def test_compiled_graph_keeps_our_ops():
    """The ops appear as single nodes in the traced graph (no graph breaks, no decomposition)."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    recorder = EagerAndRecordGraphs()
    torch.compile(block_step, fullgraph=True, backend=recorder)(*make_inputs(requires_grad=False))
    assert len(recorder.graphs) == 1
    code = recorder.graphs[0].code
    for op in ("gated_blend", "gated_residual", "cache_residual", "guided_step"):
        assert f"shortcut_kernels.{op}" in code, op


# ---- every op on channels_last, mixed and transposed inputs ---------------------------
# The fake (meta) functions must promise exactly the strides the kernels return:
# Inductor plans the code around the output with those strides.

LAYOUT_CASES = ["contiguous", "channels_last", "mixed", "transposed"]
SHAPE = (2, 6, 4, 5)


def _in_layout(layout, count, shape=SHAPE):
    """`count` 4-D tensors: all contiguous, all channels_last, mixed (channels_last,
    contiguous, transposed view, ...), or all transposed views (dense, not contiguous)."""
    def one(kind):
        if kind == "channels_last":
            return torch.randn(shape).to(memory_format=torch.channels_last)
        if kind == "transposed":
            return torch.randn(*shape[:2], shape[3], shape[2]).transpose(2, 3)
        return torch.randn(shape)
    kinds = (["channels_last", "contiguous", "transposed"] * count)[:count] if layout == "mixed" else [layout] * count
    return [one(kind) for kind in kinds]


def _op_case(op, layout):
    """(public call on leaves, registered op, its arguments without the backend)."""
    ops = torch.ops.shortcut_kernels
    if op == "gated_blend":
        fresh, cache, residual = _in_layout(layout, 3)
        gate = torch.rand(SHAPE[0])
        return sk.gated_blend, ops.gated_blend, [fresh, cache, gate, residual]
    if op == "gated_residual":
        x, y = _in_layout(layout, 2)
        gate = torch.randn(SHAPE[0], SHAPE[-1])
        return sk.gated_residual, ops.gated_residual, [x, y, gate]
    if op == "cache_residual":
        x, c0, c1 = _in_layout(layout, 3)
        return (lambda x_, a, b: sk.cache_residual(x_, [a, b])), \
            (lambda x_, a, b, backend: ops.cache_residual(x_, [a, b], backend)), [x, c0, c1]
    x, u, c = _in_layout(layout, 3)
    a, b, w = torch.rand(SHAPE[0]), torch.tensor(-0.3), torch.tensor(2.0)
    return (sk.guided_step, (lambda *args: ops.guided_step(*args[:6], 1.0, 1.0, 1.0, args[6])),
            [x, u, c, a, b, w])


def _backends():
    return [b for b in ("cpu", "torch") if not sk.backends.unavailable_reasons(b, "cpu", torch.float32)]


@pytest.mark.parametrize("layout", LAYOUT_CASES)
@pytest.mark.parametrize("op", ["gated_blend", "gated_residual", "cache_residual", "guided_step"])
def test_opcheck_layouts(op, layout):
    """opcheck (schema, fake vs real strides, autograd registration, AOT dispatch) on
    every layout, for each backend that runs here."""
    _, registered, args = _op_case(op, layout)
    leaves = [t.requires_grad_() for t in args]
    for backend in _backends():
        with sk.use_backend(backend):
            if op == "cache_residual":
                torch.library.opcheck(torch.ops.shortcut_kernels.cache_residual,
                                      (leaves[0], leaves[1:], backend))
            elif op == "guided_step":
                torch.library.opcheck(torch.ops.shortcut_kernels.guided_step,
                                      (*leaves[:6], 1.0, 1.0, 1.0, backend))
            else:
                torch.library.opcheck(registered, (*leaves, backend))


@pytest.mark.parametrize("layout", ["channels_last", "mixed", "transposed"])
def test_compile_layouts(layout):
    """torch.compile(fullgraph=True, inductor) of all four ops on one layout (with the
    backend `auto` picks): values and gradients as in eager mode. Each op's output is
    read by Inductor code planned from the fake strides."""
    cases = [_op_case(op, layout) for op in ("gated_blend", "gated_residual", "cache_residual", "guided_step")]
    sizes = [len(args) for _, _, args in cases]

    def fn(*inputs):
        total, start = 0, 0
        for (public, _, _), size in zip(cases, sizes):
            total = total + (public(*inputs[start:start + size]) * 2).sum(dim=(1, 3))
            start += size
        return total

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    leaves = [t.detach().clone().requires_grad_() for _, _, args in cases for t in args]
    expected = fn(*leaves)
    grads_expected = torch.autograd.grad(expected.square().sum(), leaves)
    got = compiled(*leaves)
    grads_got = torch.autograd.grad(got.square().sum(), leaves)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # sums of fp32 terms
    for g, e in zip(grads_got, grads_expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("traces_context_variables", [True, False], ids=["contextvar", "process-wide"])
def test_use_backend_is_guarded_under_compile(monkeypatch, traces_context_variables):
    """The backend chosen by use_backend() is baked into the traced graph and guarded:
    switching it recompiles. `process-wide`: the path for a torch whose dynamo cannot trace
    ContextVar.get (2.11; seen failing on the GPU machine), which reads the value use_backend()
    keeps beside the context variable."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    from shortcut_kernels.ops import _dispatch

    if not traces_context_variables:
        monkeypatch.setattr(_dispatch, "_dynamo_traces_context_variables", lambda: False)
    elif not _dispatch._dynamo_traces_context_variables():
        pytest.skip("this torch's dynamo cannot trace ContextVar.get")
    torch._dynamo.reset()
    recorder = EagerAndRecordGraphs()
    compiled = torch.compile(block_step, fullgraph=True, backend=recorder)
    inputs = make_inputs(requires_grad=False)
    backends = [b for b in ("torch", "cpu") if not sk.backends.unavailable_reasons(b, "cpu", torch.float32)]
    for backend in backends:
        with sk.use_backend(backend):
            torch.testing.assert_close(compiled(*inputs), block_step(*inputs))
    assert sk.backends.forced_in_process is None  # restored on leaving the block
    assert len(recorder.graphs) == len(backends)  # one graph per backend: guarded
    for graph, backend in zip(recorder.graphs, backends):
        assert f"'{backend}'" in graph.code and f"'{({'torch', 'cpu'} - {backend}).pop()}'" not in graph.code
