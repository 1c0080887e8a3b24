"""`python -m shortcut_kernels ...` (also the `shortcut-kernels` command): the top layer.

`info` lives here and `report` in `cli/report.py`; the commands that run the zoo models
(`schedule`, `sample`, `prune`: `zoo/dipgo_commands.py`; `sdo`: `zoo/sdo_commands.py`) belong to
the zoo, which is a user of the library. Each module's `add_commands(subparsers)` registers its
parsers with `set_defaults(run=callable(args) -> int)`.
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from .. import __version__, _ext, backends
from ..zoo import dipgo_commands, sdo_commands
from . import report


def info() -> str:
    lines = [f"shortcut_kernels {__version__}", f"python {platform.python_version()}",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
             f"GPU visible: {torch.cuda.is_available()})"]
    try:
        import triton  # optional: only its version is reported
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
    lines.append(backends.gpu_status())  # why auto keeps CUDA tensors on torch until a GPU run is recorded
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    forced = backends.requested()
    lines.append(f"backend requested: {forced} ({backends.ENV_VAR})")
    for device in devices:
        lines.append(f"backends for {device} tensors (auto picks {backends.select(torch.device(device), torch.float32) if forced == 'auto' else forced}):")
        for name, reasons in backends.available(device).items():
            lines.append(f"  {name:7s} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    return "\n".join(lines)


def _print_info(args) -> int:
    print(info())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shortcut-kernels", description="shortcut_kernels tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, which backends loaded, and why not").set_defaults(run=_print_info)
    for module in (dipgo_commands, sdo_commands, report):
        module.add_commands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
