"""handle.compile(): fullgraph (no graph breaks), one compile per distinct keep-pattern, equal to eager."""
import pytest
import torch

from shortcut_kernels.dipgo import accelerate, deepcache, fora, skip_steps

from _dipgo_models import call_kwargs, tiny_dit, tiny_sd15_unet


pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)


def _run(model, calls, runs=2):
    with torch.no_grad():
        return [model(**call_kwargs(model, i)).sample for _ in range(runs) for i in range(calls)]


@pytest.mark.parametrize("make,build,backend", [
    (tiny_dit, lambda m: fora(m, 7, 3), "counting"),
    (tiny_dit, lambda m: skip_steps(m, 7, compute=[0, 1, 4]), "aot_eager"),
    (tiny_sd15_unet, lambda m: deepcache(m, 7, 3, 2), "counting"),
], ids=["dit-fora", "dit-skip-aot", "unet-deepcache"])
def test_compile_fullgraph_once_per_pattern(make, build, backend):
    torch._dynamo.reset()
    model = make()
    s = build(model)
    with accelerate(model, s):
        eager = _run(model, s.calls)
    graphs = []

    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward

    def aot(gm, inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import nop

        return aot_autograd(fw_compiler=nop)(gm, inputs)

    with accelerate(model, s) as h:
        h.compile(backend=counting if backend == "counting" else aot)  # fullgraph=True: a break raises
        got = _run(model, s.calls)
    # call 0 of a run is eager; every other distinct pattern compiles exactly once, across runs too
    assert len(graphs) == len(set(s.modes[1:]))
    for a, b in zip(got, eager):
        if backend == "counting":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "forward" not in model.__dict__  # remove() dropped the compiled forward
