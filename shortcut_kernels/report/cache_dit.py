"""The report's cache-dit part: per compute budget, the best setting of the cache-dit package
and our best schedule at no more compute, from the ``cache-dit`` section's JSON
(``bench/sections/cache_dit.py``). Self-contained (its own small formatters), so that
:mod:`.tables` can import it without a cycle."""
from __future__ import annotations

import math

__all__ = ["cache_dit_part", "best_lines", "pattern_lines"]


def _db(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _table(header: list[str], rows: list[list[str]], left=(0,)) -> list[str]:
    align = ["---" if i in left else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def best_lines(doc: dict, times: bool = True) -> list[str]:
    """The per-budget table: each library's best row at no more compute, and the gap
    (``times=False``: without the wall-clock columns)."""
    body = []
    for e in doc.get("bests", []):
        ours, cd = e.get("ours"), e.get("cache-dit")
        gap = e.get("ours_minus_cache_dit_db")
        verdict = "-" if gap is None else ("yes" if e.get("holds") else "no")
        cells = [_pct(e["budget"])]
        for r in (cd, ours):
            cells += ["-"] * (4 + times) if r is None else \
                [f"`{r['key']}`", _pct(r["compute"]), _db(r["psnr"]), _db(r["psnr_image_mean"])] \
                + ([_ratio(r.get("time_vs_full"))] if times else [])
        cells += ["-" if gap is None else f"{gap:+.2f}", verdict]
        body.append(cells)
    side = ["compute", "set PSNR", "mean PSNR"] + (["time / full"] if times else [])
    head = ["budget", "cache-dit best", *side, "ours best", *side, "ours - cache-dit (dB)",
            f">= {doc.get('margin_db', 1.0):g} dB"]
    return _table(head, body, left=(0, 1, 2 + len(side)))


def pattern_lines(doc: dict) -> list[str]:
    """The same blocks computed by both libraries: each of cache-dit's evenly spread static
    masks beside our schedule of the same keep rows, set PSNR per reuse order (cache-dit:
    TaylorSeer order, 0 = repeat; ours: forecast order, 0 = repeat)."""
    cd, ours = {}, {}
    for r in doc.get("rows", []):
        if r["library"] == "cache-dit" and r["setting"].get("policy") == "static" \
                and str(r["setting"].get("mask_name", "")).startswith("lead"):
            s = r["setting"]
            cd.setdefault((s["Fn"], s["mask"]), {})[s["order"]] = r
        elif r["library"] == "ours" and r.get("builder") == "cache-dit-mask":
            p = r["params"]
            ours.setdefault((p["Fn"], p["mask"]), {})[p.get("forecast", 0)] = r
    body = []
    for key in [k for k in cd if k in ours]:
        first = next(iter(cd[key].values()))
        body.append([f"Fn {key[0]}, {first['setting']['mask_name']}, {key[1].count('1')} full", _pct(first["compute"])]
                    + [_db(cd[key][o]["psnr"]) if o in cd[key] else "-" for o in (0, 1, 2)]
                    + [_db(ours[key][o]["psnr"]) if o in ours[key] else "-" for o in (0, 1, 2)])
    if not body:
        return []
    return _table(["static mask", "compute", "cache-dit repeat", "TaylorSeer 1", "TaylorSeer 2", "ours repeat",
                   "forecast 1", "forecast 2"], body)


def cache_dit_part(doc: dict, plots=()) -> list[str]:
    """The report part of the ``cache-dit`` section."""
    lines = ["## cache-dit against our schedules on digits-dit", ""]
    if "skipped" in doc:
        return lines + [f"Skipped: {doc['skipped']}.", ""]
    if "error" in doc:
        last = doc["error"].strip().splitlines()[-1]
        return lines + [f"**This section failed**: `{last}` (the traceback is in `{doc['section']}.json`).", ""]
    rows = doc.get("rows", [])
    n_cd = sum(r["library"] == "cache-dit" for r in rows)
    n_ours = sum(r["library"] == "ours" for r in rows)
    bad = [r["key"] for r in rows if r["library"] == "cache-dit" and not r.get("counts_agree", True)]
    lines += [f"{doc['model']}, {doc['calls']} DDIM calls, guidance {doc['guidance']:g} (one batched call), "
              f"{doc['samples']} samples from held-out noise (seed {doc['seed']}), cache-dit "
              f"{doc.get('cache_dit_version', '?')}. Compute: the share of transformer-block forwards that ran, "
              "counted with the same hooks for both libraries; PSNR against the full model's samples from the same "
              "noise (set: one MSE over all images; mean: of the per-image PSNRs). Per budget, each library's "
              f"best of its rows at no more compute ({n_cd} cache-dit settings, {n_ours} of our schedules; every "
              "row is in `cache-dit.json`). `time / full`: wall-clock against the full model in the same run.", ""]
    lines += best_lines(doc) + [""]
    same = pattern_lines(doc)
    if same:
        lines += ["The same blocks computed by both (set PSNR, dB): cache-dit's static masks (the first Fn blocks at "
                  "every call, every block at the mask's full calls) and our schedule of the same keep rows, per "
                  "reuse order.", ""] + same + [""]
    orders = doc.get("forecast_orders", [0])
    lines.append("- Our rows " + ("include forecast reuse (orders " + ", ".join(map(str, orders[1:])) + ")."
                                  if len(orders) > 1 else "repeat the cache only (this runtime has no forecast reuse)."))
    for builder, why in doc.get("not_applicable", {}).items():
        lines.append(f"- `{builder}` does not apply: {why}")
    if bad:
        lines.append(f"- cache-dit's own cached-step record disagrees with the hooks for: {', '.join(bad)}")
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    return lines + [""]
