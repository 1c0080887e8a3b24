"""shortcut_kernels: fused diffusion kernels with DiP-GO and SDO on top.

Importing the package registers the ops under torch.ops.shortcut_kernels and loads the
compiled extension if it is there; without it the torch (and Triton) backends serve.
"""
from . import _ext
from .backends import BackendUnavailable, available as available_backends, use_backend
from .ops.cache_residual import cache_residual
from .ops.gated_blend import gated_blend
from .ops.gated_residual import gated_residual
from .ops.guided_step import guided_step

__version__ = "0.1.0"

_ext.load()

__all__ = ["gated_blend", "gated_residual", "cache_residual", "guided_step", "use_backend", "available_backends", "BackendUnavailable", "__version__"]
