"""The benchmark report: ``report.md`` and PNG plots from the section JSON that ``make bench``
(``bench/run.py``) writes into one directory.

    shortcut-kernels report bench/results/20261129T201500Z     # rebuild report.md and the plots
    from shortcut_kernels.report import build; build(directory)

Every number in the report is read from that directory's JSON (``environment.json``,
``ops.json``, ``dipgo.json``, ``dipgo-learn.json``, ``sdo.json``, ``gpu.json``; any may be
missing); nothing is copied from elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path

from .plots import make_plots
from .tables import markdown

__all__ = ["build", "load_sections", "SECTIONS"]

SECTIONS = ("ops", "dipgo", "dipgo-learn", "sdo", "gpu")


def load_sections(directory: str | Path) -> tuple[dict, dict]:
    """(environment, {section name: its JSON}) from ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory of benchmark results")
    env_path = d / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    sections = {name: json.loads((d / f"{name}.json").read_text()) for name in SECTIONS
                if (d / f"{name}.json").is_file()}
    if not sections:
        raise FileNotFoundError(f"no section JSON ({', '.join(s + '.json' for s in SECTIONS)}) in {d}")
    return env, sections


def build(directory: str | Path) -> Path:
    """Write ``report.md`` and the plots into ``directory``; returns the report's path."""
    d = Path(directory)
    env, sections = load_sections(d)
    plots = make_plots(sections, d)
    path = d / "report.md"
    path.write_text(markdown(env, sections, plots))
    return path
