"""`shortcut-kernels report SOURCE...`: rebuild report.md and the plots of a `make bench` run,
or print its headline table (`--headline`), or write its tables into a markdown file
(`--results FILE`). A source is a results directory of `make bench` or one section's JSON."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..report import build
from ..report.headline import headline, write_results


def _run(args) -> int:
    if args.headline or args.results:
        if args.headline:
            sys.stdout.write(headline(args.sources))
        if args.results:
            command = "shortcut-kernels report " + " ".join(shlex.quote(s) for s in args.sources) + \
                f" --results {shlex.quote(args.results)}"
            write_results(args.results, args.sources, command)
            print(f"wrote the tables of {len(args.sources)} source(s) into {args.results}", file=sys.stderr)
        return 0
    files = [s for s in args.sources if not Path(s).is_dir()]
    if files:
        print(f"not a results directory: {', '.join(files)} (a section JSON file goes with --headline or "
              "--results)", file=sys.stderr)
        return 2
    for directory in args.sources:
        path = build(directory)
        print(f"wrote {path} and the plots beside it")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("report", help="rebuild report.md and the plots of a `make bench` run from its JSON; "
                                      "--headline / --results: its headline table / all its tables as markdown")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a results directory of `make bench` (bench/results/<timestamp>), or with --headline / "
                        "--results also one section's JSON file")
    p.add_argument("--headline", action="store_true",
                   help="print a short markdown table: the main result of each section, with its JSON")
    p.add_argument("--results", metavar="FILE",
                   help="write every section's tables into FILE (between its generated-part markers when it "
                        "has them; the rest of the file is kept)")
    p.set_defaults(run=_run)
