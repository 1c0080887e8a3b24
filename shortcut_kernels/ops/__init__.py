"""The fused ops, registered under torch.ops.shortcut_kernels (schema, fake, autograd)."""
from .gated_blend import gated_blend

__all__ = ["gated_blend"]
