"""The fused ops, registered under torch.ops.shortcut_kernels (schema, fake, autograd).

One module per op; the public functions are re-exported by the top-level package.
"""
from . import cache_residual, gated_blend, gated_residual, guided_step  # noqa: F401  (registers the ops)
