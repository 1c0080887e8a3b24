"""The benchmark report: ``report.md`` and PNG plots from the section JSON that ``make bench``
(``python -m bench.run``) writes into one directory.

    shortcut-kernels report bench/results/20261129T201500Z     # rebuild report.md and the plots
    from shortcut_kernels.report import build; build(directory)

Every number in the report is read from that directory's JSON (``environment.json``,
``ops.json``, ``dipgo.json``, ``dipgo-learn.json``, ``sdo.json``, ``gpu.json``; any may be
missing); nothing is copied from elsewhere.
"""
from __future__ import annotations

from pathlib import Path

from .plots import make_plots
from .sections import SECTIONS, load_sections
from .tables import markdown

__all__ = ["build", "load_sections", "SECTIONS"]

def build(directory: str | Path) -> Path:
    """Write ``report.md`` and the plots into ``directory``; returns the report's path."""
    d = Path(directory)
    env, sections = load_sections(d)
    plots = make_plots(sections, d)
    path = d / "report.md"
    path.write_text(markdown(env, sections, plots))
    return path
