"""cache_residual: out = x + sum(caches), a run of two pruned blocks at inference; and with
weights, out = x + sum(w[k] * caches[k]), an order-2 forecast of a transformer block."""
import torch

import shortcut_kernels as sk

from ._recipe import TINY, OpBench, nbytes, parametrize, run_case, unet_dit_sizes


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


# ---- weighted: a transformer block's order-2 forecast (x and three cached residuals) -------

def make_weighted_inputs(shape, dtype, device):
    return dict(x=torch.randn(shape, dtype=dtype, device=device),
                cache_a=torch.randn(shape, dtype=dtype, device=device),
                cache_b=torch.randn(shape, dtype=dtype, device=device),
                cache_c=torch.randn(shape, dtype=dtype, device=device),
                weights=torch.tensor([2.5, -2.0, 0.5], device=device))  # forecast 1.5 calls on


def eager_weighted(x, cache_a, cache_b, cache_c, weights):
    w = weights.to(x.dtype)
    return x + w[0] * cache_a + w[1] * cache_b + w[2] * cache_c


def ours_weighted(x, cache_a, cache_b, cache_c, weights):
    return sk.cache_residual(x, [cache_a, cache_b, cache_c], weights)


def weighted_bytes(inputs, mode):
    n = nbytes(inputs["x"])
    # fwd: read x and three caches, write out. bwd: read grad, write w[k]*grad per cache (dx is grad).
    return 5 * n if mode == "fwd" else 9 * n


WEIGHTED = OpBench("cache_residual_weighted", make_weighted_inputs, eager_weighted, ours_weighted,
                   ("x", "cache_a", "cache_b", "cache_c"), weighted_bytes)
WEIGHTED_SIZES = [TINY, (2, 4096, 1152)]  # the call overhead, a DiT block's output


@parametrize(WEIGHTED_SIZES)
def test_cache_residual_weighted(benchmark, shape, dtype, mode, provider):
    run_case(benchmark, WEIGHTED, shape, dtype, mode, provider)
