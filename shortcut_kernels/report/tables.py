"""report.md: the machine at the top, then one part per section, every claim beside the
baseline measured in the same run. Numbers come from the section JSON only."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict

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


def _problem(doc: dict) -> list[str] | None:
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
    bad = _problem(doc)
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
    bad = _problem(doc)
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


def learn_part(doc: dict, plots) -> list[str]:
    lines = ["## DiP-GO: a schedule learned in this run against hand-made ones at equal MACs", ""]
    bad = _problem(doc)
    if bad:
        return lines + bad
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
    bad = _problem(doc)
    if bad:
        return lines + bad
    fid = {r["policy"]: r for r in doc.get("fidelity", {}).get("rows", [])}
    cost, mem = doc.get("cost", {}), doc.get("memory", {})
    curves = doc.get("curves", {})
    full_s = cost.get("full", {}).get("median_s")
    full_mib = mem.get("full", {}).get("delta_mib")
    lines += [f"`digits-unet`, {doc['steps']} DDIM steps, batch {doc['batch']}, {doc.get('threads', '?')} thread; "
              f"reward: log p(digit {doc['target']} | sample) by the zoo classifier. `full` is exact backprop "
              "(per-call checkpointing); `draft:K` keeps the last K calls, `alignprop` a random number of last "
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
    for m in doc["methods"]:
        c, r, f, cv = cost.get(m, {}), mem.get(m, {}), fid.get(m, {}), curves.get("methods", {}).get(m, {})
        body.append([m, num(c.get("median_s"), ".3f"),
                     num(full_s / c["median_s"] if full_s and c.get("median_s") else None),
                     num(r.get("delta_mib"), ".1f"),
                     num(full_mib / r["delta_mib"] if full_mib and r.get("delta_mib") else None),
                     num(f.get("cos_xT"), ".3f"), num(f.get("cos_lora"), ".3f"), str(cv.get("iterations", "-")),
                     num(cv.get("reward_final")), pct(cv.get("target_fraction"), ".0f")])
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
    if doc.get("finetune", {}).get("best"):
        ft = doc["finetune"]["best"]
        lines += ["LoRA fine-tuning (best learning rate per method; time to reach `full`'s final reward):", ""]
        seeds = any("seeds" in r for r in ft.values())
        lines += table(["method", "lr", "final held-out reward", "reward at 1/5 of full's time",
                        "seconds to full's final", "of full's time"]
                       + (["seeds within 1/5", "median of full's time"] if seeds else []),
                       [[m, f"{r['lr']:g}", num(r["final"], ".4f"), num(r.get("reward_at_fifth_of_full_time"), ".4f"),
                         num(r["seconds_to_full_final"], ".0f"), pct(r["fraction_of_full_time"], ".0f")]
                        + ([f"{r['seeds_within_fifth']} of {len(r['seeds'])}", pct(r["median_fraction_of_full_time"],
                                                                                   ".0f")] if seeds else [])
                        for m, r in ft.items()]) + [""]
    for name in ("sdo_reward_vs_time.png", "sdo_samples.png", "sdo_finetune.png"):
        lines += image(plots, name)
    return lines


# ----------------------------------------------------------------------------- GPU


def gpu_part(doc: dict, plots) -> list[str]:
    lines = ["## GPU: SD-1.5, SDXL and DiT-XL/2 architectures (random weights)", ""]
    bad = _problem(doc)
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
                  "every call; `sdo` is the memory-light shortcut, `+deepcache(N,0)` its no-grad chain through "
                  "that schedule. Peak memory: above the weights.", ""]
        lines += table(["method", "chain MACs kept", "s / iteration", "full / this", "peak MiB", "gradient finite"],
                       [[r["method"], pct(r["chain_macs_kept"]), num(r["seconds"], ".3f"), num(r["full_over_this"]),
                         num(r["peak_mib_over_weights"], ".0f"), str(r["grad_finite"])] for r in sdo["rows"]]) + [""]
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


PARTS = {"ops": ops_part, "dipgo": dipgo_part, "dipgo-learn": learn_part, "sdo": sdo_part, "gpu": gpu_part}


def markdown(env: dict, sections: dict, plots: list[str]) -> str:
    lines = header(env, sections)
    for name, part in PARTS.items():
        if name in sections:
            lines += part(sections[name], plots)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- headline and results


def load_source(path) -> tuple[dict, dict]:
    """(environment, {section: JSON}) of one source: a results directory of ``make bench``, or
    one section's JSON file (its ``section`` field names it; no environment then)."""
    import json
    from pathlib import Path

    from . import SECTIONS, load_sections

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
    from pathlib import Path

    p = Path(path)
    return f"{p.name}/{section}.json" if p.is_dir() else p.name


def _machine(env: dict, doc: dict) -> str:
    """The device a section ran on (its own record, else the run's environment) and the date."""
    rows = doc.get("rows") if isinstance(doc.get("rows"), list) else []
    named = [d for d in (doc.get("device"), rows[0].get("device") if rows else None)
             if d and d not in ("cpu", "cuda")]  # a device type alone says less than the environment
    what = (named or [env.get("gpu") or env.get("cpu") or "-"])[0]
    date = str(env.get("date_utc", ""))[:10]
    return f"{what}, {date}" if date else str(what)


def _size_elements(size: str) -> int:
    n = 1
    for part in size.strip("()").split(","):
        if part.strip():
            n *= int(part)
    return n


def _range(values: list, spec: str, unit: str = "") -> str:
    lo, hi = min(values), max(values)
    return f"{format(lo, spec)}{unit}" if format(lo, spec) == format(hi, spec) else \
        f"{format(lo, spec)}-{format(hi, spec)}{unit}"


def _ops_headline(doc: dict) -> list[list[str]]:
    rows = []
    by_key = defaultdict(dict)
    for r in doc["rows"]:
        by_key[(r["op"], r["mode"], r["size"], r["dtype"])][r["provider"]] = r
    largest = {}
    for op, _, size, _ in by_key:
        if op not in largest or _size_elements(size) > _size_elements(largest[op]):
            largest[op] = size
    for provider in OURS:
        mine = [same[provider] for same in by_key.values() if provider in same]
        if not mine:
            continue
        eager = [r["speedup_vs_eager"] for r in mine if r.get("speedup_vs_eager")]
        compile_ = [r["speedup_vs_compile"] for r in mine if r.get("speedup_vs_compile")]
        parts = []
        if eager:
            parts.append(f"faster than eager in {sum(x > 1 for x in eager)} of {len(eager)} rows "
                         f"(median {statistics.median(eager):.2f}x)")
        if compile_:
            parts.append(f"than torch.compile in {sum(x > 1 for x in compile_)} of {len(compile_)} "
                         f"(median {statistics.median(compile_):.2f}x)")
        big = [r for (op, mode, size, _), same in by_key.items() for r in [same.get(provider)]
               if r and mode == "fwd" and size == largest[op]]
        copy = [r["pct_of_copy"] for r in big if r.get("pct_of_copy") is not None]
        if copy:
            speed = [r["speedup_vs_eager"] for r in big if r.get("speedup_vs_eager")]
            parts.append(f"forward at each op's largest size: {_range(copy, '.0f', '%')} of a copy's bandwidth"
                         + (f", {_range(speed, '.1f', 'x')} the eager composite" if speed else ""))
        rows.append([f"fused ops, `{provider}` kernels ({len(mine)} rows)", "; ".join(parts),
                     "eager composite" + (", torch.compile" if compile_ else "") + (", a copy of the same bytes"
                                                                                     if copy else "")])
    return rows


def _schedule_headline(rows: list[dict], shape: str) -> list[list[str]]:
    """Per model: its fastest schedule of ours, and the DeepCache package on the same schedule."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = [r for r in rows if r["model"] == model and r.get("by", "ours") == "ours"]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["speedup"])
        result = (f"`{best['schedule']}`: {num(best['speedup'])}x measured (MAC-ideal {num(best['mac_ideal'])}x, "
                  f"{pct(best['macs_kept'])} of the MACs)")
        pkg = [r for r in rows if r["model"] == model and r.get("by") == "DeepCache package"
               and r["schedule"] == best["schedule"]]
        if pkg:
            result += f"; the DeepCache package {num(pkg[0]['speedup'])}x"
        elif best.get("package_speedup") is not None:
            result += f"; the DeepCache package {num(best['package_speedup'])}x"
        out.append([f"DiP-GO schedule, {model}{shape.format(**best)}", result,
                    f"the full model: {num(best['full_s'], '.3f')} s a run"])
    return out


def _learn_headline(doc: dict) -> list[list[str]]:
    quality = {r["schedule"]: r for r in doc["quality"]}
    hand = [quality[k] for k in (doc["deepcache"], doc["skip_steps"]) if k in quality]
    if not hand:
        return []
    best = max(hand, key=lambda r: r["psnr_vs_full"])
    out = []
    for what, key in (("searched", doc.get("searched")), ("learned", doc["learned"])):
        mine = quality.get(key)
        if not mine:
            continue
        diff = mine["psnr_vs_full"] - best["psnr_vs_full"]
        out.append([f"DiP-GO {what} schedule, {doc['model']}, {doc['calls']} calls, {mine.get('n_samples', '?')} "
                    "held-out samples",
                    f"{num(mine['psnr_vs_full'])} dB PSNR against full at {pct(mine['macs_kept'])} of the MACs: "
                    f"{diff:+.2f} dB",
                    f"best hand-made at equal MACs, `{best['schedule']}`: {num(best['psnr_vs_full'])} dB"])
    return out


def _sdo_headline(doc: dict) -> list[list[str]]:
    cost, mem = doc.get("cost", {}), doc.get("memory", {})
    full = cost.get("full", {}).get("median_s")
    out = []
    sdo = [m for m in doc["methods"] if m in ("first", "per-sample", "random") or m.endswith(":importance")]
    timed = [m for m in sdo if cost.get(m, {}).get("median_s")]
    if full and timed:
        m = min(timed, key=lambda k: cost[k]["median_s"])
        result = f"`{m}`: {num(cost[m]['median_s'], '.3f')} s per iteration, {num(full / cost[m]['median_s'])}x faster"
        if mem.get(m, {}).get("delta_mib") and mem.get("full", {}).get("delta_mib"):
            result += f", {num(mem[m]['delta_mib'] / mem['full']['delta_mib'])}x the peak memory"
        out.append([f"SDO gradient, digits-unet, {doc['steps']} calls, batch {doc['batch']}", result,
                    f"exact backprop (`full`): {num(full, '.3f')} s"])
    best = doc.get("finetune", {}).get("best", {})
    ours = {m: r for m, r in best.items() if m != "full" and r.get("fraction_of_full_time") is not None}
    if ours:
        m = min(ours, key=lambda k: ours[k]["fraction_of_full_time"])
        r = ours[m]
        result = (f"`{m}` reaches `full`'s final reward in {pct(r['fraction_of_full_time'], '.0f')} of its time")
        if r.get("seeds"):
            result += (f" ({r['seeds_within_fifth']} of {len(r['seeds'])} seeds within 1/5, median "
                       f"{pct(r['median_fraction_of_full_time'], '.0f')})")
        out.append(["SDO LoRA fine-tuning, digits-unet", result, "exact backprop (`full`), same seed"])
    return out


def _gpu_sdo_headline(sdo: dict) -> list[list[str]]:
    rows = {r["method"]: r for r in sdo.get("rows", [])}
    full = rows.get("full")
    others = [r for m, r in rows.items() if m != "full"]
    if not full or not others:
        return []
    best = max(others, key=lambda r: r["full_over_this"])
    return [[f"SDO gradient, {sdo['model']} {sdo['dtype']}, batch {sdo['batch']}, {sdo['calls']} calls",
             f"`{best['method']}`: {num(best['seconds'], '.3f')} s, {num(best['full_over_this'])}x faster, "
             f"peak {num(best['peak_mib_over_weights'], '.0f')} MiB above the weights",
             f"`full` (checkpointed): {num(full['seconds'], '.3f')} s, {num(full['peak_mib_over_weights'], '.0f')} MiB"]]


def headline_rows(env: dict, sections: dict) -> list[list[str]]:
    """[what, result, against, section] rows: the main claim of each section that ran."""
    rows = []
    for name, doc in sections.items():
        if _problem(doc):
            continue
        got = []
        if name == "ops" and doc.get("rows"):
            got = _ops_headline(doc)
        elif name == "dipgo" and doc.get("rows"):
            got = _schedule_headline(doc["rows"], ", {batch_per_call} samples a call")
        elif name == "dipgo-learn":
            got = _learn_headline(doc)
        elif name == "sdo":
            got = _sdo_headline(doc)
        elif name == "gpu":
            got = _schedule_headline(doc.get("rows", []), " {latent}x{latent} {dtype}, {calls} calls")
            got += _gpu_sdo_headline(doc.get("sdo") or {})
        rows += [r + [name] for r in got]
    return rows


def headline(sources: list) -> str:
    """A short markdown table: one row per main claim of the given sources (results directories
    of ``make bench`` or section JSON files), each naming its JSON and machine."""
    body = []
    for src in sources:
        env, sections = load_source(src)
        for what, result, against, name in headline_rows(env, sections):
            body.append([what, result, against, _machine(env, sections[name]), f"`{source_label(src, name)}`"])
    if not body:
        return "No section of these sources has a result (all missing, skipped or failed).\n"
    return "\n".join(table(["what", "result", "against (same run)", "measured on", "JSON"], body,
                           right_from=99)) + "\n"


RESULTS_BEGIN = "<!-- shortcut-kernels report --results: generated from JSON below; edits are overwritten -->"
RESULTS_END = "<!-- shortcut-kernels report --results: end -->"


def _demoted(lines: list[str]) -> list[str]:
    return ["#" + line if line.startswith("#") else line for line in lines]


def results_block(sources: list, command: str | None = None) -> str:
    """Every section's tables (those of report.md, without plots), one part per source, between
    the markers that :func:`write_results` replaces."""
    lines = [RESULTS_BEGIN, ""]
    if command:
        lines += [f"Regenerate: `{command}`.", ""]
    for src in sources:
        env, sections = load_source(src)
        head = header(env, sections)[2:]  # without the report's title
        head = [line for line in head if not line.startswith("Every number below")]
        lines += [f"## `{src}`", ""] + ([] if env else ["(No `environment.json` with this file: the machine and "
                                                         "versions are not recorded.)", ""]) + head
        for name, part in PARTS.items():
            if name in sections:
                lines += _demoted(part(sections[name], []))
    lines = [line for i, line in enumerate(lines) if line or (i and lines[i - 1])]  # no double blank lines
    return "\n".join(lines + [RESULTS_END]).rstrip() + "\n"


def write_results(path, sources: list, command: str | None = None) -> None:
    """Write the generated tables into ``path``: between its markers when it has them (the text
    around them is kept), else appended to it, else as a new file."""
    from pathlib import Path

    p = Path(path)
    block = results_block(sources, command)
    if p.is_file():
        text = p.read_text()
        if RESULTS_BEGIN in text and RESULTS_END in text:
            before, rest = text.split(RESULTS_BEGIN, 1)
            after = rest.split(RESULTS_END, 1)[1]
            p.write_text(before + block.rstrip("\n") + after)
            return
        p.write_text(text.rstrip("\n") + "\n\n" + block)
        return
    p.write_text("# Results\n\n" + block)
