"""gated_residual: out = x + gate*y, gate [B, C] over tokens (the adaLN-Zero residual)."""
import torch

import shortcut_kernels as sk

from ._recipe import OpBench, nbytes, parametrize, run_case


def make_inputs(shape, dtype, device):
    batch, _, channels = shape
    return dict(x=torch.randn(shape, dtype=dtype, device=device),
                y=torch.randn(shape, dtype=dtype, device=device),
                gate=torch.randn(batch, channels, dtype=dtype, device=device))


def eager(x, y, gate):
    return x + gate.unsqueeze(1) * y


def ours(x, y, gate):
    return sk.gated_residual(x, y, gate)


def fused_bytes(inputs, mode):
    n = nbytes(inputs["x"])
    # fwd: read x, y; write out. bwd: read grad, y; write dy (dx is grad itself).
    return 3 * n if mode == "fwd" else 6 * n


SPEC = OpBench("gated_residual", make_inputs, eager, ours, ("x", "y", "gate"), fused_bytes)
# Token layouts [B, N, C]: 512 elements (the call overhead, as _recipe.TINY), SD-1.5's 64x64
# stage, its 16x16 stage, DiT-XL/2 at 512px, and a large one.
SIZES = [(2, 16, 16), (2, 4096, 320), (2, 256, 1280), (2, 4096, 1152),
         (16, 4096, 1152) if torch.cuda.is_available() else (4, 4096, 1152)]


@parametrize(SIZES)
def test_gated_residual(benchmark, shape, dtype, mode, provider):
    run_case(benchmark, SPEC, shape, dtype, mode, provider)
