"""The headline table (``shortcut-kernels report --headline``: each section's main claim beside
its same-run baseline and its JSON) and the full tables as a block of a markdown file
(``--results FILE``)."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from .sections import load_source, source_label
from .tables import OURS, PARTS, header, num, pct, section_problem, table

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
    methods = doc.get("methods", [])  # a finetune-only source (experiments.sdo_parts) has none
    fulls = [m for m in methods if m.startswith("full") and cost.get(m, {}).get("median_s")]
    strongest = min(fulls, key=lambda k: cost[k]["median_s"]) if fulls else None  # the faster exact backprop
    out = []
    sdo = [m for m in methods if m in ("first", "per-sample", "random") or m.endswith(":importance")]
    timed = [m for m in sdo if cost.get(m, {}).get("median_s")]
    if strongest and timed:
        full = cost[strongest]["median_s"]
        m = min(timed, key=lambda k: cost[k]["median_s"])
        result = f"`{m}`: {num(cost[m]['median_s'], '.3f')} s per iteration, {num(full / cost[m]['median_s'])}x faster"
        if mem.get(m, {}).get("delta_mib") and mem.get("full", {}).get("delta_mib"):
            result += f", {num(mem[m]['delta_mib'] / mem['full']['delta_mib'])}x the peak memory of checkpointed `full`"
        out.append([f"SDO gradient, digits-unet, {doc['steps']} calls, batch {doc['batch']}", result,
                    f"exact backprop, the faster of `full` with and without checkpointing (`{strongest}`): "
                    f"{num(full, '.3f')} s"])
    ft = doc.get("finetune", {})
    if ft.get("summary"):
        out.append(_finetune_headline(ft))
    return out


def _finetune_headline(ft: dict) -> list[str]:
    """The LoRA protocol's claim: the fastest SDO method's share of the baseline's time to the
    tightest fixed reward level, and how many seeds reached the baseline's own final reward."""
    base, n = ft["baseline"], len(ft["seeds"])
    ours = {m: r for m, r in ft["summary"].items() if m != base}
    tight = len(ft["levels"]) - 2  # the last fixed level; the one after it is the baseline's own

    def key(m):
        sp = ours[m]["fraction_of_baseline_per_level"][tight]
        return (sp["missing"], sp["median"] if sp["median"] is not None else math.inf)

    m = min(ours, key=key)
    sp, own = ours[m]["fraction_of_baseline_per_level"][tight], ours[m]["fraction_of_baseline_per_level"][-1]
    level = ft["levels"][tight]
    result = (f"`{m}` reaches a held-out reward of {level:g} in {pct(sp['median'], '.0f')} of `{base}`'s time "
              f"(median of {n} seeds, {pct(sp['min'], '.0f')}-{pct(sp['max'], '.0f')}"
              + (f", {sp['missing']} not reached" if sp["missing"] else "") + f"); `{base}`'s final reward in "
              f"{n - own['missing']} of {n} seeds")
    capped = sum(r["iterations"] >= ft["plateau"]["max_iters"] for r in ft["runs"] if r["method"] == base)
    against = (f"exact backprop (`{base}`), lr picked on an unreported seed, run until its reward stops improving "
               f"or {ft['plateau']['max_iters']} iterations ({capped} of {n} seeds at the cap)")
    return ["SDO LoRA fine-tuning, digits-unet", result, against]


def _gpu_sdo_headline(sdo: dict) -> list[list[str]]:
    """SDO's fastest row against the faster exact backprop that ran: ``full`` (checkpointed) or
    ``full, no checkpointing`` where every activation fitted in memory."""
    rows = {r["method"]: r for r in sdo.get("rows", [])}
    exact = [r for m, r in rows.items() if m.startswith("full") and r.get("seconds")]
    ours = [r for m, r in rows.items() if m.startswith("sdo") and r.get("seconds")]
    if not exact or not ours:
        return []
    base = min(exact, key=lambda r: r["seconds"])
    best = min(ours, key=lambda r: r["seconds"])
    against = (f"`{base['method']}`" + (" (checkpointed)" if base["method"] == "full" else "")
               + f": {num(base['seconds'], '.3f')} s, {num(base['peak_mib_over_weights'], '.0f')} MiB")
    unfit = [m for m, r in rows.items() if r.get("fits_in_memory") is False]
    if unfit:
        against += f"; {', '.join(f'`{m}`' for m in unfit)} did not fit in memory"
    return [[f"SDO gradient, {sdo['model']} {sdo['dtype']}, batch {sdo['batch']}, {sdo['calls']} calls",
             f"`{best['method']}`: {num(best['seconds'], '.3f')} s, {num(base['seconds'] / best['seconds'])}x faster, "
             f"peak {num(best['peak_mib_over_weights'], '.0f')} MiB above the weights", against]]


def headline_rows(env: dict, sections: dict) -> list[list[str]]:
    """[what, result, against, section] rows: the main claim of each section that ran."""
    rows = []
    for name, doc in sections.items():
        if section_problem(doc):
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
