"""shortcut_kernels: fused diffusion kernels with DiP-GO and SDO on top."""
__version__ = "0.1.0"
