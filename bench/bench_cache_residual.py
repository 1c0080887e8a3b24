"""cache_residual: out = x + sum(caches), a run of two pruned blocks at inference."""
import torch

import shortcut_kernels as sk

from ._recipe import OpBench, nbytes, parametrize, run_case, unet_dit_sizes


def make_inputs(shape, dtype, device):
    return dict(x=torch.randn(shape, dtype=dtype, device=device),
                cache_a=torch.randn(shape, dtype=dtype, device=device),
                cache_b=torch.randn(shape, dtype=dtype, device=device))


def eager(x, cache_a, cache_b):
    return x + cache_a + cache_b


def ours(x, cache_a, cache_b):
    return sk.cache_residual(x, [cache_a, cache_b])


def fused_bytes(inputs, mode):
    # read x and both caches, write out; the backward moves nothing (every grad is g).
    return 4 * nbytes(inputs["x"])


SPEC = OpBench("cache_residual", make_inputs, eager, ours, ("x", "cache_a", "cache_b"), fused_bytes)
SIZES = unet_dit_sizes(large_gpu=(16, 1280, 64, 64), large_cpu=(4, 1280, 64, 64))


@parametrize(SIZES)
def test_cache_residual(benchmark, shape, dtype, mode, provider):
    run_case(benchmark, SPEC, shape, dtype, mode, provider)
