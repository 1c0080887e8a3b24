"""Turns pytest-benchmark JSON into the bench table and a summary JSON.

    python -m experiments.ops_table RESULTS/ops-pytest-benchmark.json [more.json ...] [--md out.md]
        [--json-out out.json] [--compact out.md]

The rows and their ratios are the ops section's (bench.sections.ops: load_rows, add_ratios);
this prints them as one markdown table (`make bench`'s report.md builds its own from ops.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from bench.sections.ops import add_ratios, load_rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(rows):
    order = {p: i for i, p in enumerate(["eager", "compile", "cpu", "cuda", "triton", "copy"])}
    rows = sorted(rows, key=lambda r: (r["op"], r["mode"], r["size"], r["dtype"], order.get(r["provider"], 9)))
    device = rows[0]["device"] if rows else "?"
    lines = [f"Device: {device}; torch {rows[0]['torch'] if rows else '?'}. Median over rounds "
             "(p20-p80); ratios against rows of the same run.", "",
             "| op | mode | size | dtype | provider | median us | p20-p80 us | GB/s | % of copy | x eager | x compile |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['size']} | {r['dtype']} | {r['provider']} | "
            f"{r['median_s'] * 1e6:.1f} | {r['p20_s'] * 1e6:.1f}-{r['p80_s'] * 1e6:.1f} | "
            f"{r['gb_per_s']:.1f} | {fmt(r['pct_of_copy'], '.0f')} | "
            f"{fmt(r['speedup_vs_eager'], '.2f')} | {fmt(r['speedup_vs_compile'], '.2f')} |")
    return "\n".join(lines)


def compact(rows, ours=("cpu", "cuda", "triton")):
    """The README table: one line per case, our providers beside eager and compile,
    the real model sizes only (the largest size of each op is left to report.md)."""
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["mode"], r["size"], r["dtype"])][r["provider"]] = r
    largest = defaultdict(int)
    for op, _, size, _ in groups:
        largest[op] = max(largest[op], _numel(size))
    lines = ["| op | mode | size | dtype | eager | compile | ours | x eager | x compile | % of copy |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|"]
    for key in sorted(groups):
        if _numel(key[2]) == largest[key[0]]:
            continue
        same = groups[key]
        for provider in ours:
            if provider not in same:
                continue
            r = same[provider]
            base = {b: f"{same[b]['median_s'] * 1e6:.0f}" if b in same else "-" for b in ("eager", "compile")}
            lines.append(f"| {' | '.join(key)} | {base['eager']} | {base['compile']} | "
                         f"{r['median_s'] * 1e6:.0f} ({provider}) | {fmt(r['speedup_vs_eager'], '.2f')} | "
                         f"{fmt(r['speedup_vs_compile'], '.2f')} | {fmt(r['pct_of_copy'], '.0f')} |")
    return "\n".join(lines)


def _numel(size: str) -> int:
    total = 1
    for dim in size.strip("()").split(","):
        if dim.strip():
            total *= int(dim)
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    parser.add_argument("--md", help="write the markdown table here too")
    parser.add_argument("--json-out", help="write the summary rows (with ratios) here")
    parser.add_argument("--compact", help="write the README table (ours vs eager and compile) here")
    args = parser.parse_args(argv)
    rows = add_ratios(load_rows(args.json))
    if not rows:
        print("no benchmark rows found", file=sys.stderr)
        return 1
    table = markdown(rows)
    print(table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    if args.compact:
        with open(args.compact, "w") as f:
            f.write(compact(rows) + "\n")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
