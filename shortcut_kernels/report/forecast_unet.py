"""The report's forecast-unet part: per MAC budget on ``digits-unet``, the best hand-made and the
learned schedule repeating their caches (order 0) and forecasting them (orders 1, 2), beside
the DeepCache package, from the ``forecast-unet`` section's JSON
(``bench/sections/forecast_unet.py``); its formatters are :mod:`._format`'s, which
:mod:`.tables` does not import, so there is no cycle."""
from __future__ import annotations

from ._format import db as _db, pct as _pct, signed as _signed, table as _table

__all__ = ["forecast_unet_part", "target_lines"]

_KIND = {"handmade": "best hand-made", "learned": "learned", "package-equal": "ours at the package's setting",
         "package": "DeepCache package"}


def _reuse(row: dict) -> str:
    if row["kind"] == "package":
        return "repeat (package)"
    return "repeat" if row["order"] == 0 else f"forecast {row['order']}"


def target_lines(t: dict) -> list[str]:
    """One budget's table: every row in its group's order, set PSNR against the group's order-0
    row, then the verdict per schedule."""
    groups = t["groups"]
    body = []
    for name, g in groups.items():
        base = g["orders"].get(0, g["orders"].get("0"))
        for r in [r for r in t["rows"] if r["group"] == name and r["kind"] == "package"] + \
                 [r for r in t["rows"] if r["group"] == name and r["kind"] != "package"]:
            kind = "package" if r["kind"] == "package" else g["kind"]
            diff = None if r["kind"] == "package" or r["order"] == 0 else r["psnr"] - base
            body.append([f"`{r['key']}`", _KIND[kind], _reuse(r), _pct(r["macs_kept"]), _db(r["psnr"]),
                         _db(r["psnr_image_mean"]), _pct(r["class_accuracy"]), _signed(diff)])
    lines = _table(["schedule", "what", "reuse", "MACs kept", "set PSNR", "mean PSNR", "class acc.",
                    "vs repeat (dB)"], body, left=(0, 1, 2)) + [""]
    for name, g in groups.items():
        if "best_order" not in g:
            continue  # repeat only
        pick = g.get("bank_order")
        at_pick = "" if pick is None else f"; the bank picks order {pick}: {_signed(g['gain_at_bank_order_db'])} dB"
        lines.append(f"- {_KIND[g['kind']]} `{g['key']}` ({_pct(g['macs_kept'])}): best forecast order "
                     f"{g['best_order']}, {_signed(g['gain_db'])} dB set PSNR over repeating{at_pick}.")
    for p in t.get("packages", []):
        lines.append(f"- DeepCache package ({p['interval']}, {p['branch']}) against our `{p['equal_to']}`: "
                     f"largest pixel difference {p['max_abs_diff_vs_equal']:.1e}.")
    f = t["forecast_improves"]
    lines.append(f"- Forecasting improves the best hand-made schedule: {'yes' if f['handmade'] else 'no'}; "
                 f"the learned schedule: {'yes' if f['learned'] else 'no'}.")
    return lines + [""]


def forecast_unet_part(doc: dict, plots=()) -> list[str]:
    """The report part of the ``forecast-unet`` section: one table per MAC budget."""
    lines = ["## Forecast reuse on digits-unet beside the DeepCache package", ""]
    if "skipped" in doc:
        return lines + [f"Skipped: {doc['skipped']}.", ""]
    if "error" in doc:
        last = doc["error"].strip().splitlines()[-1]
        return lines + [f"**This section failed**: `{last}` (the traceback is in `{doc['section']}.json`).", ""]
    s = doc.get("settings", {})
    lines += [f"{doc['model']}, {doc['calls']} DDIM calls, guidance {doc['guidance']:g} (one batched call), "
              f"{doc['samples']} samples from held-out noise (seed {doc['seed']}), DeepCache package "
              f"{doc.get('deepcache_package') or '?'}. PSNR against the full model's samples from the same noise "
              "(set: one MSE over all images; mean: of the per-image PSNRs). Per budget: the hand-made schedule "
              f"best on a training bank of {s.get('bank', '?')} samples (seeds 10,000+), the schedule `dipgo.learn` "
              f"learned from it in {s.get('seconds', 0):g} s on the same bank, each repeating its caches and "
              "forecasting them at orders 1 and 2 (the learner returns repeat schedules; their forecast rows apply "
              "the order afterwards); the DeepCache package at its setting nearest the budget, beside our "
              "`deepcache` of the same setting (its MAC share; the quick run repeats only). `vs repeat`: set PSNR over the same schedule's "
              "repeat row.", ""]
    for t in doc.get("targets", []):
        lines += [f"### {100 * t['target']:.0f}% of the MACs (at most {_pct(t['target_macs'])})", ""]
        lines += target_lines(t)
    verdict = "holds" if doc.get("holds") else "does not hold"
    lines.append(f"Issue 28, must hold 2 (forecasting improves the best hand-made and the learned schedule at every "
                 f"budget, set PSNR): **{verdict}** in this run.")
    return lines + [""]
