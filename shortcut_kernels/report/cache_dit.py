"""The report's cache-dit part: per compute budget, the best setting of the cache-dit package
and our best schedule at no more compute, from the ``cache-dit`` section's JSON
(``bench/sections/cache_dit.py``); its formatters are :mod:`._format`'s, which
:mod:`.tables` does not import, so there is no cycle."""
from __future__ import annotations

import re

from ._format import db as _db, pct as _pct, table as _table

__all__ = ["cache_dit_part", "best_lines", "pattern_lines", "cost_lines"]


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


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


_OURS_COLUMNS = ((0, None), (1, None), (2, None), (1, "taylorseer"), (2, "taylorseer"))


def pattern_lines(doc: dict) -> list[str]:
    """The same blocks computed by both libraries: each of cache-dit's evenly spread static
    masks beside our schedule of the same keep rows, set PSNR per reuse order (cache-dit:
    TaylorSeer order, 0 = repeat; ours: forecast order, 0 = repeat, one order at every reused
    cell and at the orders TaylorSeer runs call by call, ``params["orders"] == "taylorseer"``,
    or the row they were found equal to (``same_as``); where they run the same orders as the
    one-order row, that row's)."""
    cd, ours = {}, {}
    for r in (doc.get("screen") or doc).get("rows", []):
        if r["library"] == "cache-dit" and r["setting"].get("policy") == "static" \
                and str(r["setting"].get("mask_name", "")).startswith("lead"):
            s = r["setting"]
            cd.setdefault((s["Fn"], s["mask"]), {})[s["order"]] = r
        elif r["library"] == "ours" and r.get("builder") == "cache-dit-mask":
            p = r["params"]
            mine = ours.setdefault((p["Fn"], p["mask"]), {})
            mine[(p.get("forecast", 0), p.get("orders"))] = r
            for other in r.get("same_as", []):  # e.g. TaylorSeer's orders that never forecast: the repeat row
                m = re.search(r" forecast(\d) \(TaylorSeer's orders\)$", other)
                if m:
                    mine[(int(m.group(1)), "taylorseer")] = r
    body = []
    for key in [k for k in cd if k in ours]:
        first = next(iter(cd[key].values()))
        mine = ours[key]
        cells = [mine.get(c, mine.get((c[0], None)) if c[1] else None) for c in _OURS_COLUMNS]
        body.append([f"Fn {key[0]}, {first['setting']['mask_name']}, {key[1].count('1')} full", _pct(first["compute"])]
                    + [_db(cd[key][o]["psnr"]) if o in cd[key] else "-" for o in (0, 1, 2)]
                    + [_db(r["psnr"]) if r else "-" for r in cells])
    if not body:
        return []
    return _table(["static mask", "compute", "cache-dit repeat", "TaylorSeer 1", "TaylorSeer 2", "ours repeat",
                   "forecast 1", "forecast 2", "forecast 1, TaylorSeer's orders",
                   "forecast 2, TaylorSeer's orders"], body)


def cost_lines(cost: dict | None) -> list[str]:
    """The forecast-cost table (``forecast_cost`` of the section): per schedule row, the
    denoiser call with reused blocks repeating (``READ``) and forecasting at order 1 and 2,
    the ratio to ``READ``, the extrapolation's bytes, and the forecast over ``READ`` plus those
    bytes' copy time (issue 28: within 5%)."""
    if not cost or not cost.get("rows"):
        return []
    slack = cost.get("slack", 0.05)
    body = []
    for r in cost["rows"]:
        cells = [f"`{r['row']}`", ", ".join(map(str, r["calls_timed"])), f"{1e3 * r['read_s']:.2f}"]
        for o in (1, 2):
            f = r[f"forecast{o}"]
            cells += [f"{1e3 * f['seconds']:.2f}", f"{f['ratio']:.3f}", f"{f['extrapolation_bytes'] / 2 ** 20:.1f}",
                      f"{f['over_bound']:.3f}", "yes" if f["holds"] else "no"]
        body.append(cells)
    head = ["row", "calls timed", "READ ms"]
    for o in (1, 2):
        head += [f"order {o} ms", "/ READ", "bytes MiB", "/ (READ + bytes)", f"<= {1 + slack:g}"]
    return [f"Forecast reuse, CPU cost of a denoiser call ({cost['model']}, {cost['calls']} calls with full calls "
            f"every {cost.get('interval', '?')}, batch {cost['batch_per_call']} per call, {cost['threads']} "
            f"thread(s), median of {cost['reps']} interleaved runs): the calls where every reused block "
            "forecasts at order 2, the same calls with the blocks repeating (`READ`) and at order 1. Bytes: what "
            "the extrapolation reads and writes (order p: p + 1 cached tensors read, one written, per forecasting "
            "block); their time: a copy moving as many bytes (a tensor of half of them cloned), timed in the same "
            "run. Valid only when `make bench` runs alone.", ""] + _table(head, body, left=(0, 1)) + [""]


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
    screen = doc.get("screen")
    if screen:
        n_cd = sum(r["library"] == "cache-dit" for r in screen["rows"])
        n_ours = sum(r["library"] == "ours" for r in screen["rows"])
        lines += [f"Screened: all {n_cd} cache-dit settings and {n_ours} of our schedules ran first on "
                  f"{screen['samples']} samples; the {screen['finalists']} best of each library at each budget and "
                  "the learned schedules ran again on all samples, and the table takes the best of those.", ""]
    lines += best_lines(doc) + [""]
    same = pattern_lines(doc)
    if same:
        on = f" on the screen's {screen['samples']} samples" if screen else ""
        lines += [f"The same blocks computed by both (set PSNR, dB{on}): cache-dit's static masks (the first Fn blocks at "
                  "every call, every block at the mask's full calls) and our schedule of the same keep rows, per "
                  "reuse order; also at the orders TaylorSeer runs call by call (its derivatives start with the "
                  "computation at call 3: order 0 or 1 at the calls before its second derivative exists), so that "
                  "the last two columns differ from cache-dit's only in the second derivative's formula.", ""] \
            + same + [""]
    lines += cost_lines(doc.get("forecast_cost"))
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
