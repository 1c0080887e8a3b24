"""SDO section on digits-unet: the gradient shortcut against exact backprop (``full``), DRaFT-K
and AlignProp, measured in one run.

  fidelity  cosine of each policy's gradient (w.r.t. x_T and LoRA weights) to the exact one
            (bench/bench_sdo.py part_fidelity);
  cost      seconds per iteration (chain + reward + backward), interleaved rounds;
  memory    peak RSS of one iteration in a fresh process per method, model loading subtracted;
  curves    latent optimisation for the reward "the sample is a 7", the same wall-clock budget
            per method: reward against seconds, and the samples before and after.
FULL: 50 steps, batch 8, more draws and rounds, longer curves, and LoRA fine-tuning curves
(part_finetune).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from .common import ROOT, images_to_json

METHODS = ["full", "draft:1", "draft:2", "alignprop", "first", "per-sample"]  # baselines, then SDO
TARGET = 7


def settings(full: bool) -> argparse.Namespace:
    """bench_sdo's argument namespace (its part_* functions read it)."""
    return argparse.Namespace(steps=50 if full else 20, batch=8 if full else 4, target=TARGET, seed=0,
                              draws=4 if full else 2, rounds=3 if full else 2, threads=1,
                              curve_seconds=60.0 if full else 15.0, lr=0.2, optimizer="normalized",
                              methods=["per-sample:importance+deepcache:2", "per-sample", "full", "draft:1",
                                       "alignprop"], lrs=[3e-3, 1e-2],
                              ft_iters=50, ft_seeds=1, eval_every=5, budget_fraction=0.3, prior_weight=0.0)


def method_cost(args) -> dict:
    """Seconds per iteration of every method, interleaved (round 0 warms up)."""
    import bench_sdo
    from shortcut_kernels import sdo, zoo

    model, sched = bench_sdo.setup(args.steps)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    reward = sdo.digits_reward(args.target)
    x_T = zoo.initial_noise(args.batch, seed=args.seed)
    times = {m: [] for m in METHODS}
    for r in tqdm(range(args.rounds + 1), desc="sdo cost rounds"):
        for m in METHODS:
            _, _, sec = bench_sdo.grad_of(fn, sched, x_T, reward, m, [], r)
            if r:
                times[m].append(sec)
    return {m: {"median_s": statistics.median(ts), "min_s": min(ts), "rounds": len(ts)} for m, ts in times.items()}


def memory_child(method: str, steps: int, batch: int) -> None:
    """In a fresh process: the RSS with the model loaded, and the peak over one iteration."""
    import ctypes

    import bench_sdo
    from shortcut_kernels import sdo, zoo

    torch.set_num_threads(1)
    model, sched = bench_sdo.setup(steps)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    reward = sdo.digits_reward(TARGET)
    x = zoo.initial_noise(batch, seed=0).requires_grad_(True)
    with torch.no_grad():  # lazy inits (kernels, classifier) before the measurement
        reward(fn(x, sched.timesteps[0]))
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with bench_sdo._PeakRSS() as m:
        if method == "one_call":
            reward(fn(x, sched.timesteps[0])).sum().backward()
        else:
            x0 = sdo.shortcut_sample(fn, sched, x, method, generator=torch.Generator().manual_seed(0))
            reward(x0).sum().backward()
    print(json.dumps({"base_kib": m.base, "peak_kib": m.peak}))


def method_memory(args) -> dict:
    out = {}
    for m in tqdm(["one_call"] + METHODS, desc="sdo memory (a process each)"):
        code = (f"import sys; sys.path[:0] = {[str(ROOT / 'bench'), str(ROOT)]!r}; "
                f"from sections.sdo import memory_child; memory_child({m!r}, {args.steps}, {args.batch})")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        rec["delta_mib"] = (rec["peak_kib"] - rec["base_kib"]) / 1024
        out[m] = rec
    return out


def latent_curves(args) -> dict:
    """optimize_latents per method on the same noise, each for the same wall-clock budget."""
    import bench_sdo
    from shortcut_kernels import sdo, zoo

    model, sched = bench_sdo.setup(args.steps)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    reward = sdo.digits_reward(args.target)
    x_T = zoo.initial_noise(args.batch, seed=100 + args.target)

    @torch.no_grad()
    def final(latents):
        x0 = sdo.shortcut_sample(fn, sched, latents, "first").clamp(-1, 1)
        return x0, reward(x0).mean().item(), zoo.metrics.class_accuracy(x0, args.target)

    x0, r0, acc0 = final(x_T)
    out = {"budget_s": args.curve_seconds, "optimizer": args.optimizer, "lr": args.lr,
           "before": {"reward": r0, "target_fraction": acc0}, "methods": {}, "samples": {"before": images_to_json(x0)}}
    for m in METHODS:
        # the budget stops the run; iters (from the cost part's seconds per iteration) sizes the bar
        per_iter = getattr(args, "cost", {}).get(m, {}).get("median_s")
        iters = int(1.5 * args.curve_seconds / per_iter) + 10 if per_iter else 10_000
        res = sdo.optimize_latents(fn, sched, reward, x_T, iters=iters, optimizer=args.optimizer, lr=args.lr,
                                   policy=m, seed=0,
                                   time_budget=args.curve_seconds, progress=True)
        x0, r, acc = final(res.latents)
        out["methods"][m] = {"iterations": len(res.history), "reward_final": r, "target_fraction": acc,
                             "curve": [{"seconds": h["seconds"], "reward_mean": h["reward_mean"]}
                                       for h in res.history]}
        out["samples"][m] = images_to_json(x0)
    return out


def run(out_dir, full: bool = False) -> dict:
    import bench_sdo

    args = settings(full)
    torch.set_num_threads(args.threads)
    doc = {"steps": args.steps, "batch": args.batch, "target": args.target, "threads": args.threads,
           "methods": METHODS}
    parts = [("fidelity", bench_sdo.part_fidelity), ("cost", method_cost), ("memory", method_memory),
             ("curves", latent_curves)] + ([("finetune", bench_sdo.part_finetune)] if full else [])
    for name, fn in parts:
        t0 = time.perf_counter()
        print(f"-- sdo {name}", flush=True)
        doc[name] = fn(args)
        setattr(args, name, doc[name])  # later parts read earlier ones (curves: the cost)
        doc.setdefault("part_seconds", {})[name] = time.perf_counter() - t0
    return doc
