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
