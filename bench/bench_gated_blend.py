"""gated_blend: out = gate*fresh + (1-gate)*cache, per-sample gate (the SuperNet op)."""
import torch

import shortcut_kernels as sk

from ._recipe import OpBench, nbytes, parametrize, run_case, unet_dit_sizes


def make_inputs(shape, dtype, device):
    return dict(fresh=torch.randn(shape, dtype=dtype, device=device),
                cache=torch.randn(shape, dtype=dtype, device=device),
                gate=torch.rand(shape[0], dtype=torch.float32, device=device))


def eager(fresh, cache, gate):
    g = gate.to(fresh.dtype).view(-1, *([1] * (fresh.dim() - 1)))
    return g * fresh + (1 - g) * cache


def ours(fresh, cache, gate):
    return sk.gated_blend(fresh, cache, gate)


def fused_bytes(inputs, mode):
    n = nbytes(inputs["fresh"])
    # fwd: read fresh, cache; write out. bwd: read grad, fresh, cache; write d_fresh, d_cache.
    return 3 * n if mode == "fwd" else 8 * n


SPEC = OpBench("gated_blend", make_inputs, eager, ours, ("fresh", "cache", "gate"), fused_bytes)
SIZES = unet_dit_sizes(large_gpu=(16, 1280, 64, 64), large_cpu=(4, 1280, 64, 64))


@parametrize(SIZES)
def test_gated_blend(benchmark, shape, dtype, mode, provider):
    run_case(benchmark, SPEC, shape, dtype, mode, provider)
