"""The backends of one device against each other, on the same inputs: CUDA vs Triton vs
torch on a GPU (`gpu` params, skipped without one), cpu vs torch (and Triton's
interpreter) here. Also per backend: opcheck, torch.compile(fullgraph=True), and the gate
gradient bit for bit across runs and across aligned and offset views of the same data."""
import pytest
import torch

import shortcut_kernels as sk
from shortcut_kernels import backends

from _helpers import atol_for

OPS = ["gated_blend", "gated_residual", "cache_residual", "guided_step"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _params(names, device, gpu):
    marks = [pytest.mark.gpu] if gpu else [pytest.mark.skipif(
        bool(backends.unavailable_reasons(names[0], device, torch.float32)), reason=f"{names[0]} unavailable")]
    return pytest.param(names, device, id=f"{'-'.join(names)}-{device}", marks=marks)


# (backends compared, first = the one checked against the others), device
GROUPS = [_params(("cuda", "triton", "torch"), "cuda", gpu=True),
          _params(("cpu", "torch"), "cpu", gpu=False)]
SINGLE = ([pytest.param(b, "cuda", id=f"{b}-gpu", marks=pytest.mark.gpu) for b in ("cuda", "triton")]
          + [pytest.param("cpu", "cpu", id="cpu-cpu", marks=pytest.mark.skipif(
              bool(backends.unavailable_reasons("cpu", "cpu", torch.float32)), reason="no C++ extension"))])


def _inputs(op, dtype, device, shape=(3, 8, 6, 10)):
    def rnd(*s):
        return torch.randn(*s, dtype=dtype, device=device)
    if op == "gated_blend":
        return [rnd(*shape), rnd(*shape), torch.rand(shape[0], device=device), rnd(*shape)]
    if op == "gated_residual":
        return [rnd(*shape), rnd(*shape), torch.randn(shape[0], shape[-1], device=device)]
    if op == "cache_residual":
        return [rnd(*shape), rnd(*shape), rnd(*shape)]
    return [rnd(*shape), rnd(*shape), rnd(*shape), torch.rand(shape[0], device=device),
            torch.tensor(-0.3, device=device), torch.tensor(4.0, device=device)]


def _call(op, inputs):
    if op == "cache_residual":
        return sk.cache_residual(inputs[0], inputs[1:])
    return getattr(sk, op)(*inputs)


def _forward_backward(op, backend, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with sk.use_backend(backend):
        out = _call(op, leaves)
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("names,device", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_backends_agree(names, device, dtype, op):
    inputs = _inputs(op, dtype, device)
    results = {name: _forward_backward(op, name, inputs) for name in names}
    first, *others = names
    tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=10 * atol_for(dtype))
    for other in others:
        torch.testing.assert_close(results[first][0], results[other][0], **tol,
                                   msg=lambda m: f"{op} {first} vs {other}: {m}")
        for i, (g1, g2) in enumerate(zip(results[first][1], results[other][1])):
            # reduced gradients (gates, coefficients) sum many terms: a looser relative bound
            rel = tol["rtol"] if g1.shape == inputs[0].shape else 1e-3 if dtype != torch.float64 else 1e-10
            torch.testing.assert_close(g1.float(), g2.float(), rtol=rel, atol=tol["atol"] * 10,
                                       msg=lambda m: f"{op} grad {i} {first} vs {other}: {m}")


@pytest.mark.parametrize("backend,device", SINGLE)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(backend, device, op):
    ops = torch.ops.shortcut_kernels
    leaves = [t.requires_grad_() for t in _inputs(op, torch.float32, device, shape=(2, 3, 4, 5))]
    with sk.use_backend(backend):
        if op == "cache_residual":
            torch.library.opcheck(ops.cache_residual, (leaves[0], leaves[1:], backend))
        elif op == "guided_step":
            torch.library.opcheck(ops.guided_step, (*leaves, 1.0, 1.0, 1.0, backend))
        else:
            torch.library.opcheck(getattr(ops, op), (*leaves, backend))


@pytest.mark.parametrize("backend,device", [p for p in SINGLE if p.values[1] == "cuda"])
def test_compile_fullgraph(backend, device):
    from test_compile import block_step, make_inputs

    torch._dynamo.reset()
    inputs = [t.detach().to(device).requires_grad_() for t in make_inputs(requires_grad=False)]
    with sk.use_backend(backend):
        expected = block_step(*inputs)
        grads_expected = torch.autograd.grad(expected.square().sum(), inputs)
        got = torch.compile(block_step, fullgraph=True)(*inputs)
        grads_got = torch.autograd.grad(got.square().sum(), inputs)
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads_got, grads_expected):
        torch.testing.assert_close(g, e)


def _offset_copy(t):
    """The same values in storage that starts one element later (misaligned for vector loads)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("backend,device", SINGLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["gated_blend", "gated_residual"])
def test_gate_gradient_bit_for_bit(backend, device, dtype, op):
    """The gate gradient is a reduction: the same bits on every run, and from aligned and
    offset (misaligned) views of the same data."""
    shape = (3, 40_003) if op == "gated_blend" else (3, 5_003, 24)
    x, y = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
    gate = torch.rand(3, device=device) if op == "gated_blend" else torch.randn(3, 24, device=device)

    def d_gate(a, b):
        g = gate.clone().requires_grad_()
        with sk.use_backend(backend):
            out = getattr(sk, op)(a, b, g)
        return torch.autograd.grad(out, g, torch.ones_like(out))[0]

    runs = [d_gate(x, y), d_gate(x, y), d_gate(_offset_copy(x), _offset_copy(y))]
    assert runs[2].data_ptr() != runs[0].data_ptr()
    for other in runs[1:]:
        assert torch.equal(runs[0], other)
