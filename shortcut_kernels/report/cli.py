"""`shortcut-kernels report DIR`: rebuild report.md and the plots of a `make bench` run."""
from __future__ import annotations


def _run(args) -> int:
    from . import build

    path = build(args.directory)
    print(f"wrote {path} and the plots beside it")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("report", help="rebuild report.md and the plots of a `make bench` run from its JSON")
    p.add_argument("directory", help="a results directory of `make bench` (bench/results/<timestamp>)")
    p.set_defaults(run=_run)
