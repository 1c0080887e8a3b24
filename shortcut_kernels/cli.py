"""`python -m shortcut_kernels info` (also the `shortcut-kernels` command)."""
from __future__ import annotations

import argparse
import platform
import sys


def info() -> str:
    import torch

    import shortcut_kernels as sk
    from shortcut_kernels import _ext, backends

    lines = [f"shortcut_kernels {sk.__version__}", f"python {platform.python_version()}",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
             f"GPU visible: {torch.cuda.is_available()})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton: not importable ({type(exc).__name__})")
    if _ext.load():
        ops = _ext.ext_op_names()
        cuda = [op for op in ops if _ext.has_kernel(op.split("::")[1], "CUDA")]
        lines.append(f"extension shortcut_kernels._C: loaded, {len(ops)} ops, "
                     f"{len(cuda)} with CUDA kernels")
    else:
        lines.append(f"extension shortcut_kernels._C: NOT loaded ({_ext.load_error()})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    forced = backends.requested()
    lines.append(f"backend requested: {forced} ({backends.ENV_VAR})")
    for device in devices:
        lines.append(f"backends for {device} tensors (auto picks {backends.select(torch.device(device), torch.float32) if forced == 'auto' else forced}):")
        for name, reasons in backends.available(device).items():
            lines.append(f"  {name:7s} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="shortcut-kernels", description="shortcut_kernels tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, which backends loaded, and why not")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
