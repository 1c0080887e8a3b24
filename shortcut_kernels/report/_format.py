"""Cells of the report parts' tables: dB, shares, signed differences, and markdown tables."""
from __future__ import annotations

import math


def db(x) -> str:
    """A PSNR in dB with two decimals; "-" when missing or NaN, "inf" for identical images."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2f}"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def signed(x) -> str:
    return "-" if x is None else f"{x:+.2f}"


def table(header: list[str], rows: list[list[str]], left=(0,)) -> list[str]:
    """A markdown table; the columns in ``left`` align left, the others right."""
    align = ["---" if i in left else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + \
        ["| " + " | ".join(r) + " |" for r in rows]
