"""guided_step: x_prev = a*x + b*(eps_u + w*(eps_c - eps_u)), CFG fused with a DDIM-like update."""
import torch

import shortcut_kernels as sk

from ._recipe import OpBench, nbytes, parametrize, run_case, unet_dit_sizes

A, B, W = 0.9987, -0.0513, 7.5  # a DDIM step's coefficients and SD's guidance scale


def make_inputs(shape, dtype, device):
    return dict(x=torch.randn(shape, dtype=dtype, device=device),
                eps_uncond=torch.randn(shape, dtype=dtype, device=device),
                eps_cond=torch.randn(shape, dtype=dtype, device=device))


def eager(x, eps_uncond, eps_cond):
    return A * x + B * (eps_uncond + W * (eps_cond - eps_uncond))


def ours(x, eps_uncond, eps_cond):
    return sk.guided_step(x, eps_uncond, eps_cond, A, B, W)


def fused_bytes(inputs, mode):
    n = nbytes(inputs["x"])
    # fwd: read x, eps_u, eps_c; write out. bwd: read grad; write dx, d_eps_u, d_eps_c.
    return 4 * n if mode == "fwd" else 8 * n


SPEC = OpBench("guided_step", make_inputs, eager, ours, ("x", "eps_uncond", "eps_cond"), fused_bytes)
SIZES = unet_dit_sizes(large_gpu=(16, 1280, 64, 64), large_cpu=(4, 1280, 64, 64))


@parametrize(SIZES)
def test_guided_step(benchmark, shape, dtype, mode, provider):
    run_case(benchmark, SPEC, shape, dtype, mode, provider)
