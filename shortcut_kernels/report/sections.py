"""Where the report reads from: the section JSON of a `make bench` run."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["SECTIONS", "load_sections", "load_source", "source_label"]

SECTIONS = ("ops", "dipgo", "dipgo-learn", "sdo", "cache-dit", "forecast-unet", "gpu")


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


def load_source(path) -> tuple[dict, dict]:
    """(environment, {section: JSON}) of one source: a results directory of ``make bench``, or
    one section's JSON file (its ``section`` field names it; no environment then)."""
    p = Path(path)
    if p.is_dir():
        return load_sections(p)
    if not p.is_file():
        raise FileNotFoundError(f"{p} is neither a results directory nor a section JSON file")
    doc = json.loads(p.read_text())
    name = doc.get("section") if isinstance(doc, dict) else None
    if name not in SECTIONS:
        raise ValueError(f"{p} is not a section JSON of `make bench` (its 'section' field is {name!r}, "
                         f"expected one of {', '.join(SECTIONS)})")
    return {}, {name: doc}


def source_label(path, section: str) -> str:
    """How a row names its JSON: ``<directory name>/<section>.json``, or the file's name."""
    p = Path(path)
    return f"{p.name}/{section}.json" if p.is_dir() else p.name
