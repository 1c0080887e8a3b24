"""DiP-GO learning on the zoo models: train a pruner, turn it into a schedule, and compare it
with every hand-made schedule at the same MACs; and the cost of an iteration in the two
training modes.

    python -m experiments.dipgo_learn_cost --out bench/results/dipgo_learn.json    # the measurements
    python -m experiments.dipgo_learn_cost --quick                                   # a smoke run

Sections:
- cost: wall-clock of one optimiser step, ``exact`` vs ``shortcut``, 50 calls, batch 8,
  interleaved rounds (the median of the per-iteration times of each round), with the gates
  keeping everything (the first iterations) and at 40% of the MACs (a trained pruner);
- quality: per model and target (40% and 20% of the MACs), the learned schedule (the
  pruner's reuse probabilities by rank at the target it trained at) against the best hand-made schedule
  keeping as many MACs or more (within 2%), on held-out noise: class accuracy, FD, PSNR.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo.evaluate import best_handmade
from shortcut_kernels.zoo.dipgo_eval import evaluate, handmade
from shortcut_kernels.dipgo.train import train


def _scheduler(name: str, calls: int):
    s = zoo.make_scheduler(zoo.load(name).scheduler_config)
    s.set_timesteps(calls)
    return s


def _pruner_at(model, calls: int, target: float | None):
    """(pruner, train settings): ``target=None`` is a new pruner keeping everything (the first
    iterations of the paper's training); a share is a pruner started from the early-dense
    hand-made schedule at that share, trained with its budget (the gates then reuse what a
    learned schedule reuses)."""
    from shortcut_kernels.dipgo import skip_steps
    from shortcut_kernels.dipgo.pruner import Pruner

    if target is None:
        return None, {}
    start = skip_steps(model, calls, count=round(target * calls), placement="power", exponent=1.5,
                       granularity="fine")
    return Pruner.from_schedule(start), dict(budget="anneal", anneal=0.0, target=start.macs_kept)


def cost(name="digits-unet", calls=50, batch=8, rounds=3, iters=3, targets=(None, 0.4)):
    """Seconds per optimiser step of both modes (interleaved rounds, median), with the gates
    keeping everything and at each target share. The shortcut's no-graph run skips the
    reused blocks, so its cost follows the gates; ``exact`` computes every block either way
    (a reused block's gate gradient needs its fresh output)."""
    model = zoo.load(name).model
    rows = []
    for target in targets:
        times = {"exact": [], "shortcut": []}
        for _ in range(rounds):
            for mode in times:  # interleaved: both modes see the same machine state
                pruner, kw = _pruner_at(model, calls, target)
                r = train(model, _scheduler(name, calls), method="ste", mode=mode, iters=iters, batch_size=batch,
                          bank_size=batch, progress=False, pruner=pruner, **kw)
                h = r.history
                times[mode].append(statistics.median(h[i]["seconds"] - h[i - 1]["seconds"] for i in range(1, len(h))))
        med = {m: statistics.median(v) for m, v in times.items()}
        row = dict(model=name, calls=calls, batch=batch, gates="keep all" if target is None else f"{target:.0%} of MACs",
                   kept_macs=h[-1]["kept_macs"], exact_s=med["exact"], shortcut_s=med["shortcut"],
                   ratio=med["exact"] / med["shortcut"], rounds=times)
        print(f"cost {name}, gates {row['gates']} (kept {100 * row['kept_macs']:.1f}%): exact {med['exact']:.2f} s/it, "
              f"shortcut {med['shortcut']:.2f} s/it, ratio {row['ratio']:.2f}x", flush=True)
        rows.append(row)
    return rows


def quality(name, targets=(0.4, 0.2), calls=50, iters=150, per_class=20, mode="shortcut", **train_kw):
    rows = []
    schedules = handmade(name, calls)
    for target in targets:
        t0 = time.perf_counter()
        r = train(zoo.load(name).model, _scheduler(name, calls), method="ste", mode=mode, target=target,
                  iters=iters, progress=True, **train_kw)
        schedules[f"learned({mode},{target})"] = r.schedule  # read at the budget it trained at
        print(f"trained {name} {mode} target {target}: {time.perf_counter() - t0:.0f} s, last {r.history[-1]}",
              flush=True)
    evaluated = evaluate(name, schedules, per_class=per_class)
    for target in targets:
        mine = next(x for x in evaluated if x["schedule"] == f"learned({mode},{target})")
        best = best_handmade(evaluated, mine["macs_kept"])
        rows.append(dict(model=name, target=target, learned=mine, best_handmade=best,
                         psnr_gain_db=mine["psnr_vs_full"] - best["psnr_vs_full"] if best else None))
        print(f"{name} target {target}: learned kept {100 * mine['macs_kept']:.1f}% PSNR {mine['psnr_vs_full']:.2f} dB "
              f"acc {100 * mine['class_accuracy']:.1f}% FD {mine['digits_fd']:.3f}; best hand-made "
              f"{best['schedule'] if best else None} kept {100 * best['macs_kept']:.1f}% PSNR "
              f"{best['psnr_vs_full']:.2f} dB", flush=True)
    full = next(x for x in evaluated if x["schedule"] == "full")
    return dict(rows=rows, full=full, all=evaluated)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/dipgo_learn.json")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks that the section runs")
    p.add_argument("--models", nargs="+", default=["digits-unet", "digits-dit"])
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-quality", action="store_true", help="measure only the cost of an iteration")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    out = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M"))
    if args.quick:
        out["cost"] = cost(calls=6, batch=2, rounds=1, iters=2, targets=(None, 0.5))
        out["quality"] = {"digits-unet": quality("digits-unet", targets=(0.4,), calls=6, iters=2, per_class=1,
                                                 batch_size=2, bank_size=2)}
    else:
        if not args.skip_cost:
            out["cost"] = cost()
        if not args.skip_quality:
            out["quality"] = {m: quality(m, iters=args.iters) for m in args.models}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return out



if __name__ == "__main__":
    main()
