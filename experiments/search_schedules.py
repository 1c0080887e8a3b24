"""Searched schedules against every hand-made one at the same MACs, on held-out noise.

    python -m experiments.search_schedules --models digits-unet digits-dit --counts 10 20 --time-budget 420

For each model and budget (the MACs of ``count`` whole calls): score the hand-made schedules
within 2% of those MACs on the training bank (seeds 10,000+), start the search from the best,
then evaluate the searched schedule and the same hand-made ones on the 200 evaluation samples
(20 per class, seed 1234) that the search never saw. JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo import Schedule, local_search, skip_steps
from shortcut_kernels.runtime.schedule import graph_of
from shortcut_kernels.dipgo.search import with_trades
from shortcut_kernels.zoo.dipgo_eval import evaluate, handmade, zoo_sampler


def _resumed(name: str, count: int, calls: int, path: str):
    """(schedule, record) of an earlier output's searched schedule for this model and budget."""
    for r in json.load(open(path))["results"]:
        if r["model"] == name and r["count"] == count:
            model = zoo.load(name).model
            if "keep" not in r:  # whole calls: the computed calls say it all
                return skip_steps(model, calls, compute=r["computed_calls"]), r
            return Schedule(torch.tensor(r["keep"]), graph_of(model, r.get("granularity", "coarse"))), r
    raise SystemExit(f"{path} has no searched schedule for {name} at {count} calls")


def run(name: str, count: int, args) -> dict:
    model = zoo.load(name).model
    macs = skip_steps(model, args.calls, count=count).macs_kept
    window = {k: s for k, s in handmade(name, args.calls).items() if macs * 0.98 <= s.macs_kept <= macs * 1.02}
    sample = zoo_sampler(name, n=args.bank, calls=args.calls)
    ref = sample(None)
    bank = {k: zoo.metrics.psnr(sample(s), ref) for k, s in window.items()}
    start_key = max(bank, key=bank.get)
    start, before = window[start_key], None
    if args.resume:  # continue an earlier search (its seconds are reported beside this one's)
        start, before = _resumed(name, count, args.calls, args.resume)
        start_key = f"searched({before['start']})"
    start, patterns = with_trades(model, start) if args.trades else (start, [])
    res = local_search(start, sample, radius=args.radius, time_budget=args.time_budget, patterns=patterns)
    rows = evaluate(name, {"searched": res.schedule, **window}, per_class=args.per_class, progress=False)
    searched = next(r for r in rows if r["schedule"] == "searched")
    hand = [r for r in rows if r["schedule"] not in ("searched", "full")]
    best = max(hand, key=lambda r: r["psnr_vs_full"])
    best_mean = max(hand, key=lambda r: r["psnr_image_mean"])
    out = dict(model=name, count=count, start=start_key, bank_psnr_start=res.start_psnr, bank_psnr=res.psnr,
               evaluations=res.evaluations, search_seconds=res.seconds, computed_calls=res.schedule.computed_calls(),
               trades=bool(patterns), moves=res.history,
               resumed=None if before is None else dict(from_file=args.resume, search_seconds=before["search_seconds"],
                                                        evaluations=before["evaluations"]),
               keep=res.schedule.keep.int().tolist(), granularity=res.schedule.granularity,
               bank_handmade=bank, rows=rows, best_handmade=best["schedule"],
               gain_db=searched["psnr_vs_full"] - best["psnr_vs_full"],
               best_handmade_image_mean=best_mean["schedule"],
               gain_db_image_mean=searched["psnr_image_mean"] - best_mean["psnr_image_mean"])
    print(json.dumps({k: v for k, v in out.items() if k not in ("rows", "bank_handmade")}), flush=True)
    for r in rows:
        print(f"  {r['schedule']:34s} {r['macs_kept']:.4f} {r['psnr_vs_full']:6.2f} dB (image mean "
              f"{r['psnr_image_mean']:6.2f})  acc {r['class_accuracy']:.3f}  FD {r['digits_fd']:.3f}", flush=True)
    return out


EQUAL_MACS = 0.02  # largest relative gap between kept-MAC shares called "equal"


def transfer_window(name: str, macs: float, calls: int) -> tuple[dict[str, Schedule], str]:
    """The hand-made schedules at ``calls`` (every ``skip_steps`` count included) a schedule
    keeping ``macs`` is compared with, and the rule that chose them: those within 2% of
    ``macs`` ("within 2%"); where none is that close, those at the nearest MAC level above,
    which keep more ("nearest level above")."""
    options = handmade(name, calls, counts=range(2, calls // 2 + 1))
    window = {k: s for k, s in options.items() if abs(s.macs_kept - macs) <= EQUAL_MACS * macs}
    if window:
        return window, "within 2%"
    level = min(s.macs_kept for s in options.values() if s.macs_kept >= macs)
    return {k: s for k, s in options.items() if level <= s.macs_kept <= level * (1 + EQUAL_MACS)}, "nearest level above"


def transfer_schedule(name: str, schedule: Schedule, label: str, *, calls: int = 25,
                      scheduler_cls: str = "DPMSolverMultistepScheduler", per_class: int = 20,
                      search_seconds: float = 0.0, bank: int = 30, radius: int = 2) -> dict:
    """``schedule`` (built for another sampler or call count) ``resize``d to ``calls`` and run
    with ``scheduler_cls``, held out (``evaluate``, ``per_class`` per digit) against that
    sampler's full model and the :func:`transfer_window` hand-made schedules; with
    ``search_seconds``, also ``local_search`` again from the resized schedule on ``bank``
    training samples of the target sampler. The best hand-made schedule is the one with the
    highest set PSNR (``best_handmade``) and, separately, the highest mean per-image PSNR
    (``best_handmade_image_mean``), as :func:`run` picks them; the gains are ``label``'s."""
    resized = schedule.resize(calls)
    window, rule = transfer_window(name, resized.macs_kept, calls)
    candidates = {label: resized}
    if search_seconds:
        z = zoo.load(name)
        sample = zoo_sampler(name, zoo.make_scheduler(z.scheduler_config, scheduler_cls), n=bank, calls=calls)
        again = local_search(resized, sample, radius=radius, time_budget=search_seconds, progress=False)
        candidates[f"{label}, resized, searched again"] = again.schedule
    rows = evaluate(name, {**candidates, **window}, per_class=per_class, progress=False, scheduler_cls=scheduler_cls)
    by = {r["schedule"]: r for r in rows}
    best = max(window, key=lambda k: by[k]["psnr_vs_full"])
    best_mean = max(window, key=lambda k: by[k]["psnr_image_mean"])
    out = dict(calls=calls, scheduler=scheduler_cls, computed_calls=resized.computed_calls(),
               macs_kept=resized.macs_kept, keep=resized.keep.int().tolist(), granularity=resized.granularity,
               handmade_within=sorted(window), window_rule=rule, best_handmade=best, best_handmade_image_mean=best_mean,
               gain_db=by[label]["psnr_vs_full"] - by[best]["psnr_vs_full"],
               gain_db_image_mean=by[label]["psnr_image_mean"] - by[best_mean]["psnr_image_mean"], rows=rows)
    print(json.dumps({k: v for k, v in out.items() if k not in ("rows", "keep")}), flush=True)
    for r in rows:
        print(f"  {r['schedule']:34s} {r['macs_kept']:.4f} {r['psnr_vs_full']:6.2f} dB (image mean "
              f"{r['psnr_image_mean']:6.2f})  acc {r['class_accuracy']:.3f}  FD {r['digits_fd']:.3f}", flush=True)
    return out


def transfer(result: dict, args) -> dict:
    """The searched schedule of a :func:`run` result through :func:`transfer_schedule`
    (--transfer-calls, --transfer-scheduler, --transfer-search)."""
    name = result["model"]
    model = zoo.load(name).model
    if "keep" in result:
        searched = Schedule(torch.tensor(result["keep"]), graph_of(model, result["granularity"]), name="searched")
    else:  # whole-call rows: the computed calls say it all
        rows = skip_steps(model, args.calls, compute=result["computed_calls"])
        searched = Schedule(rows.keep, rows.graph, name="searched")  # resized as a custom schedule
    out = transfer_schedule(name, searched, "searched", calls=args.transfer_calls, scheduler_cls=args.transfer_scheduler,
                            per_class=args.per_class, search_seconds=args.transfer_search, bank=args.bank,
                            radius=args.radius)
    return dict(model=name, count=result["count"], **out)


def speed(result: dict, args) -> dict:
    """Wall-clock of the searched schedule against the full model (interleaved reps, batch 20
    with CFG, --calls DDIM calls; the dipgo section's efficiency rows) and its MAC-ideal speedup."""
    from bench.sections.dipgo import Loop, efficiency_case

    torch.set_num_threads(2)
    name = result["model"]
    backbone = zoo.load(name).model.backbone
    loop = Loop(f"zoo-{name.split('-')[1]}", backbone, args.calls, batch=20, latent_hw=16)
    keep = result.get("keep")
    s = (Schedule(torch.tensor(keep), graph_of(backbone, result["granularity"], loop.sample_shape), name="searched")
         if keep else skip_steps(backbone, args.calls, compute=result["computed_calls"], sample_shape=loop.sample_shape))
    (row,) = efficiency_case(loop, {f"searched({result['count']})": s}, args.reps)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["digits-unet", "digits-dit"])
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 20], help="budgets, as whole calls of --calls")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--bank", type=int, default=30, help="training samples the search scores on")
    ap.add_argument("--radius", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds of search per model and budget")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--trades", action="store_true", help="UNets: also trade whole calls for DeepCache-branch rows")
    ap.add_argument("--resume", metavar="JSON", help="start from the searched schedules of an earlier output")
    ap.add_argument("--transfer", metavar="JSON", help="only evaluate the searched schedules of this output, "
                    "resized to --transfer-calls with --transfer-scheduler")
    ap.add_argument("--transfer-calls", type=int, default=25)
    ap.add_argument("--transfer-scheduler", default="DPMSolverMultistepScheduler")
    ap.add_argument("--transfer-search", type=float, default=0.0, metavar="SECONDS",
                    help="transfer: also search again from the resized schedule for this long, on "
                         "--bank training samples of the target sampler")
    ap.add_argument("--speed", metavar="JSON", help="only time the searched schedules of this output against full")
    ap.add_argument("--reps", type=int, default=5, help="--speed: interleaved reps")
    ap.add_argument("--out", default="search_schedules.json")
    args = ap.parse_args()
    t0 = time.time()
    if args.speed:
        results = [speed(r, args) for r in json.load(open(args.speed))["results"]]
    elif args.transfer:
        results = [transfer(r, args) for r in json.load(open(args.transfer))["results"]]
    else:
        results = [run(m, c, args) for m in args.models for c in args.counts]
    json.dump({"command": vars(args), "wall_s": time.time() - t0, "results": results}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
