"""DiP-GO training on an equal wall-clock budget: ``exact`` against ``shortcut``.

    python -m experiments.train_equal_budget --budget 1800 --out experiments/measurements/dipgo-equal-budget.json

Both modes train a pruner for ``digits-unet`` (50 DDIM calls, guidance 3, batch 8, a bank of
64 training samples) from the same start, the early-dense hand-made schedule at the target
share of the MACs (``Pruner.from_schedule``, the budgeted mode at that share, so the gates
always meet the budget and training can only swap decisions). They run at the same time in
two processes of one thread each, so on a 2-core machine each has one core for the same
wall-clock budget. Each mode's cosine learning-rate decay spans the iterations it can make
in the budget (estimated from a 3-iteration probe). Then the start and both learned
schedules (``to_schedule(share, ranked=True)``) are evaluated on the 200 held-out samples
of ``dipgo.evaluate``: PSNR against the full model, FD, class accuracy.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "digits-unet"
COMMON = dict(method="ste", batch_size=8, bank_size=64, lr=0.01, granularity="fine", budget="anneal", anneal=0.0)


def _setup(calls: int, target: float):
    from shortcut_kernels import zoo
    from shortcut_kernels.dipgo import skip_steps

    z = zoo.load(MODEL)
    scheduler = zoo.make_scheduler(z.scheduler_config)
    scheduler.set_timesteps(calls)
    start = skip_steps(z.model, calls, count=round(target * calls), placement="power", exponent=1.5,
                       granularity="fine")
    return z.model, scheduler, start


def worker(mode: str, budget: float, target: float, calls: int, margin: float, out_dir: Path) -> None:
    """One mode's training run (in its own process, one thread)."""
    from shortcut_kernels.dipgo.pruner import Pruner
    from shortcut_kernels.dipgo.train import train

    torch.set_num_threads(1)
    model, scheduler, start = _setup(calls, target)
    kw = dict(COMMON, mode=mode, target=start.macs_kept)
    probe = train(model, scheduler, pruner=Pruner.from_schedule(start, margin), iters=3, progress=False,
                  **dict(kw, bank_size=8))
    h = probe.history
    per_iter = statistics.median(h[i]["seconds"] - h[i - 1]["seconds"] for i in range(1, len(h)))
    iters = max(10, int(budget / per_iter))
    print(f"{mode}: {per_iter:.2f} s per iteration in the probe, {iters} iterations planned", flush=True)
    result = train(model, scheduler, pruner=Pruner.from_schedule(start, margin), iters=iters, time_budget=budget,
                   log_path=out_dir / f"{mode}.jsonl", progress=False, **kw)
    learned = result.pruner.to_schedule(start.macs_kept, ranked=True)
    learned.save(out_dir / f"{mode}.json")
    (out_dir / f"{mode}.summary.json").write_text(json.dumps(dict(
        mode=mode, probe_s_per_iter=per_iter, planned_iters=iters, iterations=len(result.history),
        train_seconds=result.seconds, last=result.history[-1], settings=dict(kw, margin=margin))))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=1800.0, help="training seconds per mode")
    p.add_argument("--target", type=float, default=0.4, help="share of the MACs")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--margin", type=float, default=0.25, help="Pruner.from_schedule margin")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--work", default="bench/results/equal_budget", help="logs and schedules")
    p.add_argument("--out", default="bench/results/dipgo_equal_budget.json")
    p.add_argument("--worker", choices=["exact", "shortcut"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.worker, args.budget, args.target, args.calls, args.margin, work)
        return {}

    t0 = time.perf_counter()
    procs = {m: subprocess.Popen([sys.executable, "-m", "experiments.train_equal_budget", "--worker", m,
                                  "--budget", str(args.budget), "--target", str(args.target),
                                  "--calls", str(args.calls), "--margin", str(args.margin),
                                  "--work", str(work.resolve())], cwd=ROOT)
             for m in ("exact", "shortcut")}
    for m, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"the {m} run failed (exit {proc.returncode})")
    wall = time.perf_counter() - t0

    from shortcut_kernels.dipgo import Schedule
    from shortcut_kernels.zoo.dipgo_eval import evaluate

    torch.set_num_threads(2)
    model, _, start = _setup(args.calls, args.target)
    schedules = {"start": start, **{m: Schedule.load(work / f"{m}.json", model) for m in procs}}
    rows = evaluate(MODEL, schedules, per_class=args.per_class)
    by = {r["schedule"]: r for r in rows}
    ex, sc = by["exact"], by["shortcut"]
    out = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M"), model=MODEL, calls=args.calls, budget_s=args.budget,
               wall_s=wall, runs={m: json.loads((work / f"{m}.summary.json").read_text()) for m in procs},
               rows=rows, verdict=dict(
                   psnr_shortcut_minus_exact=sc["psnr_vs_full"] - ex["psnr_vs_full"],
                   fd_shortcut_over_exact=sc["digits_fd"] / ex["digits_fd"],
                   macs_gap=abs(sc["macs_kept"] - ex["macs_kept"]) / ex["macs_kept"],
                   holds=sc["psnr_vs_full"] >= ex["psnr_vs_full"] and sc["digits_fd"] <= 1.1 * ex["digits_fd"]))
    for r in rows:
        print(f"{r['schedule']:>9}: {100 * r['macs_kept']:.1f}% MACs, PSNR {r['psnr_vs_full']:.2f} dB, "
              f"FD {r['digits_fd']:.3f}, accuracy {100 * r['class_accuracy']:.1f}%")
    print("verdict:", out["verdict"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
