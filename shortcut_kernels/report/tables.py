"""report.md: the machine at the top, then one part per section, every claim beside the
baseline measured in the same run. Numbers come from the section JSON only."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict

from .cache_dit import cache_dit_part
from .forecast_unet import forecast_unet_part
from .plots import PLOTS


def num(x, spec: str = ".2f", missing: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def pct(x, spec: str = ".1f") -> str:
    return "-" if x is None else f"{100 * x:{spec}}%"


def table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def image(plots: list[str], name: str) -> list[str]:
    return [f"![{PLOTS[name]}]({name})", ""] if name in plots else []


def section_problem(doc: dict) -> list[str] | None:
    """The lines that replace a section's tables when it did not produce any."""
    if "skipped" in doc:
        return [f"Skipped: {doc['skipped']}.", ""]
    if "error" in doc:
        last = doc["error"].strip().splitlines()[-1]
        return [f"**This section failed**: `{last}` (the traceback is in `{doc['section']}.json`).", ""]
    return None


# ----------------------------------------------------------------------------- header


def header(env: dict, sections: dict) -> list[str]:
    lines = ["# Benchmark report", ""]
    if env:
        gpu = f"; GPU: {env['gpu']} (CUDA {env['cuda']})" if env.get("gpu") else "; no GPU"
        lines += [f"Measured {env.get('date_utc', '?')} on {env.get('cpu', '?')} ({env.get('cores', '?')} cores, "
                  f"torch default threads {env.get('torch_threads', '?')}{gpu}), {env.get('machine', '?')}.",
                  f"python {env.get('python', '?')}, torch {env.get('torch', '?')}, diffusers "
                  f"{env.get('diffusers', '?')}, shortcut_kernels {env.get('shortcut_kernels', '?')}"
                  + (f" (commit {env['commit']})" if env.get("commit") else "") + ". "
                  + ("Long run (`make bench FULL=1`)." if env.get("full") else "Quick run (`make bench`)."), ""]
    lines += ["Every number below was measured in this run and is read from the JSON files beside this "
              "report; `shortcut-kernels report <this directory>` rebuilds the report and the plots from them.", ""]
    rows, total = [], 0.0
    for name, doc in sections.items():
        wall = doc.get("wall_s") or 0.0
        total += wall
        budget = doc.get("budget_s")
        status = "skipped" if "skipped" in doc else "FAILED" if "error" in doc else \
            "ok" if budget is None or wall <= budget else "ok, over budget"
        rows.append([name, f"{wall / 60:.1f} min", f"{budget / 60:.1f} min" if budget else "-", status])
    rows.append(["all sections", f"{total / 60:.1f} min", "", ""])
    return lines + table(["section", "wall time", "budget", "status"], rows) + [""]


# ----------------------------------------------------------------------------- ops


OURS = ("cpu", "cuda", "triton")


def ops_part(doc: dict, plots) -> list[str]:
    lines = ["## Ops: fused kernels against the eager composite and torch.compile", ""]
    bad = section_problem(doc)
    if bad:
        return lines + bad
    groups = defaultdict(dict)
    for r in doc["rows"]:
        groups[(r["op"], r["mode"], r["size"], r["dtype"])][r["provider"]] = r
    has_copy = any("copy" in g for g in groups.values())
    rows, vs_eager, vs_compile = [], [], []
    for key in sorted(groups):
        same = groups[key]
        for provider in OURS:
            if provider not in same:
                continue
            r = same[provider]
            base = {b: num(same[b]["median_s"] * 1e6, ".1f") if b in same else "-" for b in ("eager", "compile")}
            row = list(key) + [base["eager"], base["compile"], f"{num(r['median_s'] * 1e6, '.1f')} ({provider})",
                               f"{num(r['p20_s'] * 1e6, '.1f')}-{num(r['p80_s'] * 1e6, '.1f')}",
                               num(r.get("speedup_vs_eager")), num(r.get("speedup_vs_compile"))]
            if has_copy:
                row += [num(r["gb_per_s"], ".1f"), num(same["copy"]["gb_per_s"], ".1f") if "copy" in same else "-",
                        num(r.get("pct_of_copy"), ".0f")]
            rows.append(row)
            if r.get("speedup_vs_eager"):
                vs_eager.append(r["speedup_vs_eager"])
            if r.get("speedup_vs_compile"):
                vs_compile.append(r["speedup_vs_compile"])
    first = doc["rows"][0] if doc["rows"] else {}
    lines += [f"Device {first.get('device', '?')}; microseconds per call, "
              f"median of {first.get('rounds', '?')} rounds. `x eager` / `x compile`: the eager composite's / "
              "torch.compile's time over ours (above 1: ours is faster), from rows of this run; a wide p20-p80 "
              f"range means the machine was busy. Rows: {doc.get('selection', 'every row')}.", ""]
    if vs_eager or vs_compile:
        lines += [f"Ours is faster than eager in {sum(x > 1 for x in vs_eager)} of {len(vs_eager)} rows (median "
                  f"{num(statistics.median(vs_eager) if vs_eager else None)}x) and faster than torch.compile in "
                  f"{sum(x > 1 for x in vs_compile)} of {len(vs_compile)} rows (median "
                  f"{num(statistics.median(vs_compile) if vs_compile else None)}x).", ""]
    head = ["op", "mode", "size", "dtype", "eager us", "compile us", "ours us", "ours p20-p80", "x eager",
            "x compile"]
    if has_copy:
        head += ["GB/s ours", "GB/s copy", "% of copy"]
    return lines + table(head, rows, right_from=4) + [""]


# ----------------------------------------------------------------------------- DiP-GO


def dipgo_part(doc: dict, plots) -> list[str]:
    lines = ["## DiP-GO: cache schedules against the full model (wall-clock and MAC-ideal)", ""]
    bad = section_problem(doc)
    if bad:
        return lines + bad
    rows = doc["rows"]
    r0 = rows[0] if rows else {}
    lines += [f"{doc.get('calls', '?')} denoiser calls per run, {r0.get('batch_per_call', '?')} samples per call "
              f"(guidance batched), {r0.get('threads', '?')} thread(s); median of {r0.get('reps', '?')} interleaved "
              "runs; the full model is timed in the same runs. Ideal = total MACs / kept MACs.", ""]
    body = []
    for r in rows:
        body.append([r["model"], r["schedule"], pct(r["macs_kept"]), num(r["mac_ideal"]), num(r["speedup"]),
                     pct(r["fraction_of_ideal"], ".0f"), num(r["full_s"], ".3f"), num(r["ours_s"], ".3f"),
                     num(r.get("package_speedup")), num(r.get("package_s"), ".3f")])
    lines += table(["model", "schedule", "MACs kept", "ideal x", "measured x", "of ideal", "full s", "ours s",
                    "DeepCache package x", "package s"], body, right_from=2) + [""]
    if doc.get("quality"):
        q = [[r["model"], r["schedule"], pct(r["macs_kept"]), pct(r["class_accuracy"]), num(r["digits_fd"]),
              num(r["psnr_vs_full"]), num(r.get("psnr_image_mean"))] for r in doc["quality"]]
        lines += [f"Quality ({doc['quality'][0].get('n_samples', '?')} samples per schedule, "
                  f"{doc['quality'][0].get('calls', '?')} calls):", ""]
        lines += table(["model", "schedule", "MACs kept", "class acc.", "FD", "PSNR vs full dB",
                        "PSNR image mean dB"], q, 2) + [""]
    return lines + image(plots, "speedup_vs_macs.png")


def _learn_target(run: dict) -> list[str]:
    """learn_part's rows for one target of a section that ran ``dipgo.learn``, the search and STE."""
    quality = {r["schedule"]: r for r in run["quality"]}
    full = quality.get("full", {})
    lk, fk, sk = run["learned"], run.get("searched"), run.get("ste")
    bs, bm = run.get("handmade_best"), run.get("handmade_best_mean")
    le, se, tr, cost = run["learn"], run.get("search") or {}, run.get("train") or {}, run.get("cost", {})
    n = full.get("n_samples", "?")
    lines = [f"**Target {pct(run['target'], '.0f')} of the MACs**, `{run.get('start', '?')}` the learner's start "
             f"(the best hand-made schedule on the bank within the target). Each method learned for "
             f"{num(le['time_budget_s'], '.0f')} s on the same {le['bank_samples']} training noises (the "
             f"estimate on {le['estimate_samples']}): `dipgo.learn` {le['moves']} moves, bank PSNR "
             f"{num(le['start_psnr'])} -> {num(le['bank_psnr'])} dB; `dipgo.search` {se.get('evaluations', '-')} "
             f"schedules, {num(se.get('bank_psnr_start'))} -> {num(se.get('bank_psnr'))} dB; STE (shortcut mode) "
             f"{tr.get('iterations', '-')} iterations. Held out: {n} samples (seed 1234) against the full model's "
             "from the same noise.", ""]
    best_mean = quality.get(bm, {}).get("psnr_image_mean")
    best_set = quality.get(bs, {}).get("psnr_vs_full")
    per_it = {lk: cost.get("learn", {}).get("per_iteration"), fk: cost.get("search", {}).get("per_iteration"),
              sk: cost.get("ste-shortcut", {}).get("per_iteration")}
    body = [["full", "-", pct(1.0, ".2f"), "-", "-", "-", pct(full.get("class_accuracy")),
             num(full.get("digits_fd")), "-"]]
    what = {lk: "dipgo.learn", fk: "dipgo.search", sk: "STE, shortcut", bs: "best hand-made (set PSNR)",
            bm: "best hand-made (mean PSNR)"}
    for key in dict.fromkeys(k for k in (lk, fk, sk, bs, bm) if k):
        q = quality.get(key, {})
        mean, setp = q.get("psnr_image_mean"), q.get("psnr_vs_full")
        gap = "-" if key in (bs, bm) or mean is None or best_mean is None or best_set is None else \
            f"{mean - best_mean:+.2f} / {setp - best_set:+.2f}"
        body.append([key, what[key] if key not in (bs, bm) or bs != bm else "best hand-made",
                     pct(q.get("macs_kept"), ".2f"), num(mean), num(setp), gap, pct(q.get("class_accuracy")),
                     num(q.get("digits_fd")), num(per_it.get(key), ".0f")])
    lines += table(["schedule", "method", "MACs kept", "mean PSNR dB", "set PSNR dB", "vs best hand-made dB "
                    "(mean / set)", "class acc.", "FD", "cost / iteration"], body, right_from=2) + [""]
    eq = run["equal_macs"]
    macs = ", ".join(f"`{k}` {pct(v, '.2f')}" for k, v in eq["macs_kept"].items())
    lines += [f"Equal MACs: {macs}; largest relative gap {pct(eq['max_relative_gap'], '.2f')} "
              f"({'within' if eq['holds'] else '**not within**'} the {pct(eq['tolerance'], '.0f')} tolerance). "
              f"Hand-made schedules held out: {', '.join(f'`{k}`' for k in run['handmade_within'])}"
              + (f" (the {len(run['handmade_within'])} best on the training bank of the "
                 f"{len(run['handmade_bank_psnr'])} within 2% of the learned MACs)."
                 if len(run.get("handmade_bank_psnr", {})) > len(run["handmade_within"]) else
                 " (every one within 2% of the learned MACs)."), ""]
    def curve(history, key) -> str:
        return ", ".join(f"{num(h.get('seconds', 0.0), '.0f')} s {num(h[key])}" for h in history if key in h)

    lines += [f"Bank PSNR (dB) against seconds of learning: `dipgo.learn` {curve(le['history'], 'psnr')}; "
              f"`dipgo.search` 0 s {num(se.get('bank_psnr_start'))}"
              + "".join(f", {num(h.get('seconds'), '.0f')} s {num(h['score'])}" for h in se.get("history", [])
                        if "score" in h) + ".", ""]
    ex, sc = cost.get("ste-exact", {}), cost.get("ste-shortcut", {})
    lines += [f"Cost of a learning iteration, counted in denoiser-call equivalents (the full model on one sample "
              f"once; a backward 2x the forward MACs it goes through): `dipgo.learn` "
              f"{num(cost.get('learn', {}).get('per_iteration'), '.0f')} (one estimate and its validations; "
              f"{cost.get('learn', {}).get('estimates', '-')} iterations), `dipgo.search` "
              f"{num(cost.get('search', {}).get('per_iteration'), '.0f')} (one candidate), STE shortcut "
              f"{num(sc.get('per_iteration'), '.0f')}, STE exact {num(ex.get('per_iteration'), '.0f')} (one "
              "optimiser step each).", ""]
    if best_mean is not None and best_set is not None:
        for name, key in (("learned", lk), ("searched", fk), ("STE", sk)):
            q = quality.get(key)
            if q:
                lines.append(f"The {name} schedule is {q['psnr_image_mean'] - best_mean:+.2f} dB (mean PSNR) and "
                             f"{q['psnr_vs_full'] - best_set:+.2f} dB (set PSNR) from the best hand-made schedule "
                             f"(`{bm}`, `{bs}`).")
        lines.append("")
    return lines


_ESTIMATOR = {"shortcut": "forward difference, shortcut sensitivity (`dipgo.learn`'s)",
              "adjoint": "forward difference, chain adjoint", "ste": "straight-through gate gradient (STE)"}


def _estimate_quality(q: dict) -> list[str]:
    """learn_part's table of the estimators' Spearman against measured single-call flips."""
    n = {k: sum(f["kind"] == k for f in q["flips"]) for k in ("drop", "add")}
    lines = [f"**The estimate's quality.** Every single whole-call flip of `{q['start']}` "
             f"({n['drop']} drops, {n['add']} adds) on a fixed bank of {q['bank']} training noises: the measured "
             "change of the consistency loss (the chain rerun with the flip) against each estimator's prediction.",
             ""]
    rows = [[_ESTIMATOR.get(k, k), num(q["spearman"][k]["drops"]), num(q["spearman"][k]["adds"]),
             pct(q["sign_agreement"][k]["drops"]), pct(q["sign_agreement"][k]["adds"]), num(q["seconds"][k], ".1f")]
            for k in q["spearman"]]
    return lines + table(["estimator", "Spearman, drops", "Spearman, adds", "sign right, drops", "sign right, adds",
                          "seconds"], rows, right_from=1) + [""]


def learn_part(doc: dict, plots) -> list[str]:
    lines = ["## DiP-GO: a schedule learned in this run against hand-made ones at equal MACs", ""]
    bad = section_problem(doc)
    if bad:
        return lines + bad
    if doc.get("ste"):  # the learner, the search and STE per target (sections since 2026-12)
        for run in [doc] + list(doc.get("more_targets", [])):
            lines += _learn_target(run)
        timing = doc.get("timing") or []
        if timing:
            t0 = timing[0]
            lines += [f"Wall-clock of the first target's schedules: one sampling run of {doc['calls']} calls at "
                      f"{t0.get('batch_per_call', '?')} samples per call, median of {t0.get('reps', '?')} "
                      "interleaved runs with the full model.", ""]
            lines += table(["schedule", "MACs kept", "ideal x", "measured x", "wall s", "full s"],
                           [[r["schedule"], pct(r["macs_kept"], ".2f"), num(r["mac_ideal"]), num(r["speedup"]),
                             num(r["ours_s"], ".3f"), num(r["full_s"], ".3f")] for r in timing]) + [""]
        if doc.get("estimate_quality"):
            lines += _estimate_quality(doc["estimate_quality"])
        tr = doc.get("train") or {}
        if tr.get("history"):
            lines += [f"STE training: {tr['iterations']} iterations, the last keeping "
                      f"{pct(tr['history'][-1]['kept_macs'])} of the MACs at consistency "
                      f"{num(tr['history'][-1]['consistency'], '.4f')}.", ""]
        lines += verdict(doc, {r["schedule"]: r for r in doc["quality"]}) + [""]
        for name in ("dipgo_samples.png", "learned_schedule.png", "dipgo_training.png"):
            lines += image(plots, name)
        return lines
    tr, eq = doc["train"], doc["equal_macs"]
    st = tr["settings"]
    last = tr["history"][-1] if tr["history"] else {}
    how = ", ".join(f"{k} {v}" for k, v in st.items() if k not in ("mode", "target", "iters"))
    lines += [f"Training: `{doc['model']}`, {doc['calls']} DDIM calls, `{st['mode']}` mode, target "
              f"{pct(st['target'])} of the MACs ({how}): {tr['iterations']} iterations in "
              f"{num(tr['train_seconds'], '.0f')} s of training (budget {num(tr['time_budget_s'], '.0f')} s; "
              f"{num(tr['wall_s'], '.0f')} s with the bank of full samples). Last iteration: consistency "
              f"{num(last.get('consistency'), '.4f')}, hard gates keep {pct(last.get('kept_macs'))}.", ""]
    macs = ", ".join(f"`{k}` {pct(v, '.2f')}" for k, v in eq["macs_kept"].items())
    lines += [f"Equal MACs: {macs}; largest relative gap {pct(eq['max_relative_gap'], '.2f')} "
              f"({'within' if eq['holds'] else '**not within**'} the {pct(eq['tolerance'], '.0f')} tolerance).", ""]
    quality = {r["schedule"]: r for r in doc["quality"]}
    timing = {r["schedule"]: r for r in doc["timing"]}
    t0 = doc["timing"][0] if doc["timing"] else {}
    full_q = quality.get("full", {})
    body = [["full", pct(1.0), num(1.0), num(1.0), num(t0.get("full_s"), ".3f"), pct(full_q.get("class_accuracy")),
             num(full_q.get("digits_fd")), "-", "-"]]
    if doc.get("search"):
        se = doc["search"]
        lines += [f"Search: `dipgo.search.local_search` from `{se['start']}`, {se['evaluations']} candidate "
                  f"schedules sampled on {se['bank_samples']} training samples in {num(se['seconds'], '.0f')} s "
                  f"(budget {num(se['time_budget_s'], '.0f')} s), {se['moves']} moves kept; training-bank PSNR "
                  f"{num(se['bank_psnr_start'])} -> {num(se['bank_psnr'])} dB.", ""]
    for key in [k for k in (doc["learned"], doc.get("searched"), doc["deepcache"], doc["skip_steps"]) if k]:
        q, t = quality.get(key, {}), timing.get(key, {})
        body.append([key, pct(q.get("macs_kept", t.get("macs_kept")), ".2f"), num(t.get("mac_ideal")),
                     num(t.get("speedup")), num(t.get("ours_s"), ".3f"), pct(q.get("class_accuracy")),
                     num(q.get("digits_fd")), num(q.get("psnr_vs_full")), num(q.get("psnr_image_mean"))])
    n = full_q.get("n_samples", "?")
    lines += [f"Wall-clock: one sampling run of {doc['calls']} calls at {t0.get('batch_per_call', '?')} samples per "
              f"call, median of {t0.get('reps', '?')} interleaved runs with the full model. Quality: {n} held-out "
              "samples per schedule from the same noise; PSNR against the full model's samples, over the set (one "
              "MSE) and as the mean of the per-image PSNRs.", ""]
    lines += table(["schedule", "MACs kept", "ideal x", "measured x", "wall s", "class acc.", "FD",
                    "PSNR vs full dB", "PSNR image mean dB"], body) + [""]
    lines += verdict(doc, quality) + [""]
    for name in ("dipgo_samples.png", "learned_schedule.png", "dipgo_training.png"):
        lines += image(plots, name)
    return lines


def verdict(doc: dict, quality: dict) -> list[str]:
    """The learned and searched schedules against the best hand-made one, in this run's numbers."""
    hand = [quality[k] for k in (doc["deepcache"], doc["skip_steps"]) if k in quality]
    if not hand:
        return []
    best = max(hand, key=lambda r: r["psnr_vs_full"])
    out = []
    for what, key in (("learned", doc["learned"]), ("searched", doc.get("searched"))):
        mine = quality.get(key)
        if not mine:
            continue
        diff = mine["psnr_vs_full"] - best["psnr_vs_full"]
        word = "ahead of" if diff > 0 else "behind"
        out.append(f"In this run the {what} schedule is {num(abs(diff))} dB {word} the best hand-made schedule at "
                   f"equal MACs (`{best['schedule']}`: {num(best['psnr_vs_full'])} dB against "
                   f"{num(mine['psnr_vs_full'])} dB PSNR vs full; class accuracy {pct(best['class_accuracy'])} "
                   f"against {pct(mine['class_accuracy'])}).")
    return [" ".join(out)] if out else []


# ----------------------------------------------------------------------------- SDO


def sdo_part(doc: dict, plots) -> list[str]:
    lines = ["## SDO: the gradient shortcut against full backprop, DRaFT-K and AlignProp", ""]
    bad = section_problem(doc)
    if bad:
        return lines + bad
    fid = {r["policy"]: r for r in doc.get("fidelity", {}).get("rows", [])}
    cost, mem = doc.get("cost", {}), doc.get("memory", {})
    curves = doc.get("curves", {})
    # the stronger baseline: the faster of full backprop with and without checkpointing, and the
    # smaller of their memories (a run without the plain one has `full` alone)
    fulls = [m for m in doc["methods"] if m.startswith("full")]
    full_s = min((cost[m]["median_s"] for m in fulls if cost.get(m, {}).get("median_s")), default=None)
    full_mib = min((mem[m]["delta_mib"] for m in fulls if mem.get(m, {}).get("delta_mib")), default=None)
    lines += [f"`digits-unet`, {doc['steps']} DDIM steps, batch {doc['batch']}, {doc.get('threads', '?')} thread; "
              f"reward: log p(digit {doc['target']} | sample) by the zoo classifier. `full` is exact backprop "
              "(with per-call checkpointing, and without: every activation kept); ratios are against the faster "
              "(time) and the smaller (memory) of the two; `draft:K` keeps the last K calls, `alignprop` a random number of last "
              "calls; `first` and `per-sample` are SDO (one call keeps its graph). Time: median of "
              f"{cost.get('full', {}).get('rounds', '?')} interleaved rounds of one iteration (chain, reward, "
              "backward). Memory: peak RSS over one iteration in a fresh process, the loaded model subtracted. "
              "Cosine: to the exact gradient, w.r.t. the starting noise and w.r.t. LoRA weights.", ""]
    if curves:
        step = {"normalized": "normalised steps", "adam": "Adam"}[curves.get("optimizer", "adam")]
        lines += [f"Reward: latent optimisation ({step}, lr {num(curves.get('lr'), 'g')}) from the same noise for "
                  f"{num(curves['budget_s'], '.0f')} s per method; before: reward {num(curves['before']['reward'])}, "
                  f"{pct(curves['before']['target_fraction'], '.0f')} classed as {doc['target']}.", ""]
    body = []
    curve_only = [m for m in curves.get("methods", {}) if m not in doc["methods"]]
    for m in list(doc["methods"]) + curve_only:
        c, r, f, cv = cost.get(m, {}), mem.get(m, {}), fid.get(m, {}), curves.get("methods", {}).get(m, {})
        body.append([m, num(c.get("median_s"), ".3f"),
                     num(full_s / c["median_s"] if full_s and c.get("median_s") else None),
                     num(r.get("delta_mib"), ".1f"),
                     num(full_mib / r["delta_mib"] if full_mib and r.get("delta_mib") else None),
                     num(f.get("cos_xT"), ".3f"), num(f.get("cos_lora"), ".3f"), str(cv.get("iterations", "-")),
                     num(cv.get("reward_final")), pct(cv.get("target_fraction"), ".0f")])
    if curve_only:
        lines += [f"{', '.join(f'`{m}`' for m in curve_only)}: the gradient-free baseline, fresh noise for each sample "
                  "until the budget is spent, each keeping its draw of highest reward (then SDO from the winners "
                  "for the second half of the budget); its iterations are draws per sample.", ""]
    lines += table(["method", "s / iteration", "x faster than full", "peak MiB", "x less memory than full",
                    "cos x_T", "cos LoRA", "iterations in budget", "reward after", f"classed as {doc['target']}"],
                   body) + [""]
    if "one_call" in mem:
        lines += [f"For scale: one denoiser call's forward and backward peaks at {num(mem['one_call']['delta_mib'], '.1f')}"
                  " MiB.", ""]
    others = [r for p, r in fid.items() if p not in doc["methods"]]
    if others:
        lines += ["Gradient fidelity of the other policies:", ""]
        lines += table(["policy", "cos x_T", "cos x_T per sample", "cos LoRA", "s"],
                       [[r["policy"], num(r.get("cos_xT"), ".3f"), num(r.get("cos_xT_per_sample"), ".3f"),
                         num(r.get("cos_lora"), ".3f"), num(r.get("seconds"), ".3f")] for r in others]) + [""]
    if doc.get("finetune", {}).get("summary"):
        lines += finetune_lines(doc["finetune"])
    for name in ("sdo_reward_vs_time.png", "sdo_samples.png", "sdo_finetune.png"):
        lines += image(plots, name)
    return lines


def _spread(sp: dict, spec: str, fmt=num) -> str:
    """``median [min, max]`` of a spread, with how many seeds did not get there."""
    if sp["median"] is None:
        return "not reached"
    out = fmt(sp["median"], spec)
    if sp["min"] != sp["max"]:
        out += f" [{fmt(sp['min'], spec)}, {fmt(sp['max'], spec)}]"
    return out + (f", {sp['missing']} not reached" if sp["missing"] else "")


def finetune_lines(ft: dict) -> list[str]:
    """The LoRA fine-tuning protocol (``bench.sections.sdo.finetune``): time to each reward level
    as a share of the baseline's, and the reward-hacking checks, median [min, max] over seeds."""
    base, levels = ft["baseline"], ft["levels"]
    seeds = ", ".join(map(str, ft["seeds"]))
    lines = [f"LoRA fine-tuning (learning rates picked on seed {ft['tune_seed']}, not reported; seeds {seeds}; "
             f"`{base}` until its held-out reward stops improving, the others for "
             f"{pct(ft['budget_fraction'], '.0f')} of its seconds; median [min, max] over the seeds):", ""]
    head = ["method", "lr", "final held-out reward"] + [
        f"time to {lv if isinstance(lv, str) else format(lv, 'g')}, share of `{base}`'s" for lv in levels]
    rows = [[m, f"{r['lr']:g}", _spread(r["final"], ".4f")]
            + [_spread(sp, ".0f", pct) for sp in r["fraction_of_baseline_per_level"]]
            for m, r in ft["summary"].items()]
    lines += table(head, rows) + [""]
    un = ft.get("untuned_samples", {})
    judged = [("reward_cnn_target_fraction", "reward's CNN"), ("judged_target_fraction", "SVM judge"),
              ("judged_target_fraction_cnn", "CNN judge")]
    lines += [f"Reward hacking: the final weights' samples classed as {ft['target']} by the reward's CNN and by two "
              f"independent judges, their FD to the real {ft['target']}s and their spread over the real ones' "
              f"(the model before fine-tuning: FD {num(un.get('fd_to_real_digit'))}, spread "
              f"{num(un.get('spread_over_real'))}):", ""]
    lines += table(["method"] + [name for _, name in judged] + [f"FD to real {ft['target']}s", "spread / real"],
                   [[m] + [_spread(r[k], ".0f", pct) for k, _ in judged]
                    + [_spread(r["fd_to_real_digit"], ".2f"), _spread(r["spread_over_real"], ".2f")]
                    for m, r in ft["summary"].items()]) + [""]
    return lines


# ----------------------------------------------------------------------------- GPU


def gpu_part(doc: dict, plots) -> list[str]:
    lines = ["## GPU: SD-1.5, SDXL and DiT-XL/2 architectures (random weights)", ""]
    bad = section_problem(doc)
    if bad:
        return lines + bad
    rows = doc.get("rows", [])
    lines += [f"{doc.get('device', '?')}. The op roofline (GB/s against a copy of the same bytes) is in the ops "
              "table above.", ""]
    if rows:  # a lease may run other parts only (SHORTCUT_GPU_PARTS)
        lines += [f"Schedules: {rows[0].get('dtype', '?')}, {rows[0].get('calls', '?')} DDIM calls, guidance "
                  "batched, median of `runs` runs; the full model timed in the same runs. `DeepCache package`: "
                  "its own helper with the same interval and branch on the same UNet and noise; `rel diff`: its "
                  "output against ours.", ""]
        body = [[r["model"], f"{r['latent']}x{r['latent']}", r["schedule"], r.get("by", "ours"),
                 str(r.get("reps", "?")), pct(r["macs_kept"]), num(r["mac_ideal"]), num(r["speedup"]),
                 num(r["full_s"], ".3f"), num(r["ours_s"], ".3f"), num(r.get("rel_diff_to_ours"), ".1e")]
                for r in rows]
        lines += table(["model", "latent", "schedule", "by", "runs", "MACs kept", "ideal x", "measured x", "full s",
                        "this s", "rel diff"], body, right_from=4) + [""]
    sdo = doc.get("sdo")
    if sdo:
        lines += [f"SDO: one gradient of a reward on the final latent w.r.t. the initial noise, {sdo['model']} in "
                  f"{sdo['dtype']}, batch {sdo['batch']}, latent {sdo['latent']}x{sdo['latent']}, {sdo['calls']} "
                  f"DDIM calls, guidance {sdo['guidance']}; median of {sdo['rounds']} iterations. `full` checkpoints "
                  "every call, `full, no checkpointing` keeps every activation where it fits; `sdo` is the "
                  "memory-light shortcut, `+deepcache(N,0)` its no-grad chain through "
                  "that schedule. Peak memory: above the weights.", ""]
        lines += table(["method", "chain MACs kept", "s / iteration", "full / this", "peak MiB", "gradient finite"],
                       [[r["method"], pct(r.get("chain_macs_kept")), num(r.get("seconds"), ".3f"),
                         num(r.get("full_over_this")), num(r.get("peak_mib_over_weights"), ".0f"),
                         str(r.get("grad_finite", "did not fit in memory"))] for r in sdo["rows"]]) + [""]
    if doc.get("compile"):
        lines += ["torch.compile (Inductor; `compile[reduce-overhead]`: with CUDA graphs): the first run "
                  "includes the compiles; `x compiled full` is against the full model compiled the same way.", ""]
        lines += table(["model", "variant", "MACs kept", "first run s", "s", "x eager full", "x compiled full"],
                       [[r["model"], r["variant"], pct(r["macs_kept"]), num(r["first_run_s"], ".1f"),
                         num(r["seconds"], ".3f"), num(r["speedup_over_eager_full"]),
                         num(r["speedup_over_compiled_full"])] for r in doc["compile"]]) + [""]
    for note in doc.get("notes", []):
        lines += [f"- {note.splitlines()[0]}"]
    return lines + ([""] if doc.get("notes") else [])


PARTS = {"ops": ops_part, "dipgo": dipgo_part, "dipgo-learn": learn_part, "sdo": sdo_part,
         "cache-dit": cache_dit_part, "forecast-unet": forecast_unet_part, "gpu": gpu_part}


def markdown(env: dict, sections: dict, plots: list[str]) -> str:
    lines = header(env, sections)
    for name, part in PARTS.items():
        if name in sections:
            lines += part(sections[name], plots)
    return "\n".join(lines).rstrip() + "\n"
