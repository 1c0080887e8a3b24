"""Triton kernels and their plain launchers, one op per module.

Imported lazily by the ops (only when the triton backend is chosen), so the package
imports without triton. Launchers know nothing of autograd or validation: the op
modules in shortcut_kernels.ops wrap them in torch.library custom ops.
"""
