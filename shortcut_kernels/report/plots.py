"""The report's PNG plots, each drawn from section JSON only (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# file name: what it shows (the report links the ones that were drawn)
PLOTS = {
    "speedup_vs_macs.png": "measured speedup against the share of MACs kept, every schedule and peer",
    "dipgo_samples.png": "samples from the same noise: full model, learned and hand-made schedules",
    "learned_schedule.png": "the learned schedule: denoiser calls x blocks",
    "dipgo_training.png": "training the pruner: consistency loss and kept MACs per iteration",
    "sdo_reward_vs_time.png": "latent optimisation: reward against wall-clock, per method",
    "sdo_samples.png": "SDO latent optimisation: samples before and after, per method",
    "sdo_finetune.png": "LoRA fine-tuning: held-out reward against training seconds, per method",
}


def _pyplot():
    """matplotlib's pyplot on the Agg backend (imported here: an optional dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
    """Labels, grid and legend of a one-axes plot, then :func:`_save`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    _save(plt, fig, path, dpi=120)


def _save(plt, fig, path: Path, dpi: int, suptitle: str | None = None) -> None:
    """Title, lay out, write and close a figure (a closed figure frees its memory)."""
    if suptitle is not None:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _section(sections: dict, name: str, *keys: str) -> dict | None:
    """Section ``name`` when it ran (no ``error``, not ``skipped``) and has every one of
    ``keys``; else None (its plot is not drawn)."""
    doc = sections.get(name)
    if not doc or "error" in doc or "skipped" in doc or any(k not in doc for k in keys):
        return None
    return doc


def speedup_vs_macs(sections: dict, path: Path) -> bool:
    """Every measured (MACs kept, speedup) pair of the run, with the MAC-ideal curve 1/x."""
    series = []  # (label, marker, [(macs, speedup, name)])
    eff = _section(sections, "dipgo")
    if eff:
        for model in dict.fromkeys(r["model"] for r in eff["rows"]):
            rows = [r for r in eff["rows"] if r["model"] == model]
            series.append((f"{model}: ours", "o", [(r["macs_kept"], r["speedup"], r["schedule"]) for r in rows]))
            pkg = [(r["macs_kept"], r["package_speedup"], r["schedule"]) for r in rows if "package_speedup" in r]
            if pkg:
                series.append((f"{model}: DeepCache package", "s", pkg))
    learn = _section(sections, "dipgo-learn")
    if learn:
        series.append((f"{learn['model']}: equal-MAC comparison", "*",
                       [(r["macs_kept"], r["speedup"], r["schedule"]) for r in learn["timing"]]))
    gpu = _section(sections, "gpu")
    if gpu:
        for model, by in dict.fromkeys((r["model"], r.get("by", "ours")) for r in gpu["rows"]):
            series.append((f"{model} (GPU, {gpu['rows'][0]['dtype']}): {by}", "D" if by == "ours" else "P",
                           [(r["macs_kept"], r["speedup"], r["schedule"]) for r in gpu["rows"]
                            if r["model"] == model and r.get("by", "ours") == by]))
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    lo = min(m for _, _, pts in series for m, _, _ in pts)
    xs = np.linspace(max(0.05, lo * 0.8), 1.0, 200)
    ax.plot(100 * xs, 1 / xs, "k--", lw=1, label="MAC-ideal (1 / MACs kept)")
    for label, marker, pts in series:
        ax.scatter([100 * m for m, _, _ in pts], [s for _, s, _ in pts], marker=marker, s=60, label=label)
        for m, s, name in pts:
            ax.annotate(name, (100 * m, s), fontsize=6, xytext=(3, 3), textcoords="offset points")
    _finish(plt, fig, ax, path, xlabel="MACs kept (% of the full model)",
            ylabel="measured speedup over the full model (x)",
            title="Cache schedules: wall-clock speedup against MACs kept (this run)", legend_size=7)
    return True


def image_grid(rows: list[tuple[str, list]], path: Path, title: str, col_labels=None) -> bool:
    """Rows of 0..255 images (nested lists [N][H][W]), one labelled row each."""
    rows = [(name, np.asarray(imgs, dtype=np.uint8)) for name, imgs in rows if imgs]
    if not rows:
        return False
    plt = _pyplot()
    cols = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.9 * cols + 1.6, 0.95 * len(rows) + 0.6), squeeze=False)
    for i, (name, imgs) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(imgs):
                ax.imshow(imgs[j], cmap="gray", vmin=0, vmax=255)
            else:
                ax.axis("off")
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(str(col_labels[j]), fontsize=8)
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    _save(plt, fig, path, dpi=110, suptitle=title)
    return True


def dipgo_samples(sections: dict, path: Path) -> bool:
    learn = _section(sections, "dipgo-learn", "samples")
    if not learn:
        return False
    s = learn["samples"]
    rows = [(k, v) for k, v in s.items() if k != "labels"]
    return image_grid(rows, path, f"{learn['model']}, {learn['calls']} calls, same noise per column",
                      col_labels=s.get("labels"))


# colours and legend labels of a schedule's modes, in the order of their digits in the JSON
# (runtime.schedule.MODE_NAMES): compute, read, dead, forecast
_MODE_COLOURS = ("#2b6cb0", "#f6ad55", "#edf2f7", "#38a169")
_MODE_LABELS = ("compute", "cached: repeated", "not needed", "cached: forecast")
_READ = 1


def schedule_modes(schedule: dict) -> np.ndarray:
    """``[calls, blocks]`` modes of a schedule's JSON (``Schedule.to_dict``): 0 compute,
    1 read from the cache, 2 not needed, 3 forecast from the cache. JSON written before the
    modes were stored has only the keep rows: every block it does not compute is drawn as read."""
    rows = schedule.get("modes")
    if rows is None:
        return np.array([[0 if c == "1" else _READ for c in row] for row in schedule["keep"]], dtype=np.int64)
    data = np.array([[int(c) for c in row] for row in rows], dtype=np.int64)
    bad = sorted(set(np.unique(data).tolist()) - set(range(len(_MODE_COLOURS))))
    if bad:
        raise ValueError(f"schedule modes hold {bad}: a map draws 0 compute, 1 read, 2 not needed, 3 forecast "
                         "(a file from a newer version?)")
    return data


def schedule_map(schedule: dict, path: str | Path, label: str | None = None) -> Path:
    """Save a schedule's calls x blocks map as a PNG (blue compute, orange read from the
    cache, green forecast from the cache, grey not needed; a legend names the modes the map
    has), drawn from its JSON dict alone; the title starts with ``label`` (default: the
    schedule's name) and gives the MACs kept and the ideal speedup."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    data = schedule_modes(schedule)
    names = schedule["block_names"]
    calls = len(data)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(3.5 + 0.25 * len(names), 20), min(2 + 0.12 * calls, 14)))
    last = len(_MODE_COLOURS) - 1
    ax.imshow(data, aspect="auto", interpolation="nearest", vmin=0, vmax=last, cmap=ListedColormap(_MODE_COLOURS))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("denoiser call")
    present = sorted(set(np.unique(data).tolist()))
    ax.legend(handles=[Patch(facecolor=_MODE_COLOURS[m], edgecolor="#4a5568", label=_MODE_LABELS[m]) for m in present],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    ax.set_title(f"{label or schedule['name']}: {100 * schedule['macs_kept']:.1f}% MACs kept, "
                 f"ideal {schedule['ideal_speedup']:.2f}x", fontsize=9)
    path = Path(path)
    _save(plt, fig, path, dpi=120)
    return path


def learned_schedule(sections: dict, path: Path) -> bool:
    learn = _section(sections, "dipgo-learn")
    if not learn:
        return False
    schedule_map(learn["schedules"][learn["learned"]], path, label=f"learned on {learn['model']} in this run")
    return True


def dipgo_training(sections: dict, path: Path) -> bool:
    learn = _section(sections, "dipgo-learn")
    if not learn or not learn["train"]["history"]:
        return False
    h = learn["train"]["history"]
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    it = [r["iteration"] for r in h]
    a1.plot(it, [r["consistency"] for r in h])
    a1.set_xlabel("iteration")
    a1.set_ylabel("consistency loss (MSE to full)")
    a2.plot(it, [100 * r["kept_macs"] for r in h])
    a2.axhline(100 * learn["train"]["settings"]["target"], color="k", ls="--", lw=1, label="target")
    a2.set_xlabel("iteration")
    a2.set_ylabel("MACs kept by the hard gates (%)")
    a2.legend(fontsize=7)
    mode = learn["train"]["settings"]["mode"]
    _save(plt, fig, path, dpi=110, suptitle=f"pruner training on {learn['model']} ({mode} mode)")
    return True


def _lines(path: Path, lines: list, *, log_y: bool = False, **labels) -> bool:
    """One axes of labelled lines ``(label, xs, ys)``, a dot at each point; ``labels``:
    :func:`_finish`'s."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker=".", label=label)
    if log_y:
        ax.set_yscale("log")
    _finish(plt, fig, ax, path, **labels)
    return True


def sdo_reward_vs_time(sections: dict, path: Path) -> bool:
    sdo = _section(sections, "sdo", "curves")
    if not sdo:
        return False
    lines = [(m, [p["seconds"] for p in rec["curve"]], [p["reward_mean"] for p in rec["curve"]])
             for m, rec in sdo["curves"]["methods"].items()]
    return _lines(path, lines, xlabel="wall-clock seconds",
                  ylabel=f"reward: mean log p(digit {sdo['target']} | sample)",
                  title=f"latent optimisation, {sdo['steps']} steps, batch {sdo['batch']}, same budget per method",
                  legend_size=8)


def sdo_samples(sections: dict, path: Path) -> bool:
    sdo = _section(sections, "sdo", "curves")
    if not sdo:
        return False
    rows = list(sdo["curves"]["samples"].items())
    return image_grid(rows, path, f"target {sdo['target']}: before, and after\nlatent optimisation per method")


def sdo_finetune(sections: dict, path: Path) -> bool:
    sdo = _section(sections, "sdo", "finetune")
    if not sdo:
        return False
    # -reward on a log axis: the methods part near log p = 0, where a linear axis shows one line
    lines = [(f"{run['method']} lr {run['lr']:g}", [e["seconds"] for e in run["eval"]],
              [max(-e["reward_mean"], 1e-5) for e in run["eval"]]) for run in sdo["finetune"]["runs"]]
    return _lines(path, lines, log_y=True, xlabel="training seconds",
                  ylabel="- held-out reward (log; lower is better)", title="LoRA fine-tuning", legend_size=7)


_DRAW = {"speedup_vs_macs.png": speedup_vs_macs, "dipgo_samples.png": dipgo_samples,
         "learned_schedule.png": learned_schedule, "dipgo_training.png": dipgo_training,
         "sdo_reward_vs_time.png": sdo_reward_vs_time, "sdo_samples.png": sdo_samples,
         "sdo_finetune.png": sdo_finetune}


def make_plots(sections: dict, directory: Path) -> list[str]:
    """Draw every plot the sections have data for; returns the file names written."""
    return [name for name, draw in _DRAW.items() if draw(sections, directory / name)]
