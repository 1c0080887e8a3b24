"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..backends import triton_interpret

# Samples of a per-sample coefficient map to grid axis 1, capped by CUDA at 65535.
MAX_GRID_Y = 65535


# SHORTCUT_KERNELS_TRITON_AUTOTUNE=0 (read at import): only the first config, no tuning. For
# test runs on a GPU, where compiling and benchmarking four configs per size dominated (`make gpu`).
AUTOTUNE_ENV = "SHORTCUT_KERNELS_TRITON_AUTOTUNE"


def elementwise_configs() -> list:
    """Autotune space of the memory-bound kernels; one config under the interpreter or with
    SHORTCUT_KERNELS_TRITON_AUTOTUNE=0."""
    if triton_interpret():
        return [triton.Config({"BLOCK": 256}, num_warps=4)]
    configs = [triton.Config({"BLOCK": block}, num_warps=warps)
               for block, warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))]
    return configs[:1] if os.environ.get(AUTOTUNE_ENV, "1").strip() == "0" else configs


def acc_type(dtype: torch.dtype):
    """tl accumulation type for a storage dtype (bf16/fp16 are upcast in the kernel)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_grid_samples(num_samples: int, op: str) -> None:
    if num_samples > MAX_GRID_Y:
        raise ValueError(f"{op}: the triton backend supports at most {MAX_GRID_Y} per-sample values")
