"""The DiP-GO learner (``dipgo.learn``) against the best hand-made schedule and ``dipgo.search``.

Two parts, each writable on its own (run them as parallel processes, one thread each) and
merged into one JSON:

* ``--part spearman``: on a fixed bank of training noise, every single whole-call flip of a
  start schedule, its measured effect (the chain rerun with the flip) against the
  forward-difference estimate (shortcut and adjoint sensitivities) and the straight-through
  gate gradient, Spearman within drops and within adds (``make bench`` FULL's row).
* ``--part learn --target T``: from the same start (the hand-made schedule that scores best on
  the bank within ``T``), ``learn`` and ``local_search`` (what ``zoo.dipgo_eval.search`` runs
  after choosing its start) for the same seconds, wall-clock and CPU; then held-out quality
  (``zoo.dipgo_eval.evaluate``) of both, the start and the hand-made schedules within 2% of
  the learned MACs.
* ``--part heldout --from A.json ...``: the learned and searched schedules of learn parts
  evaluated again (e.g. on more held-out samples) beside the hand-made ones (at every
  ``--forecast`` order, with cache-dit's lead-and-even placement when forecasting).
* ``--part transfer --target T``: learn at ``--calls`` DDIM calls on the training bank with the
  ``make bench`` learning section's settings (``LEARN``: moves within 1% below the target), then
  ``resize`` the learned schedule to ``--transfer-calls`` of ``--transfer-scheduler``
  (DPM-Solver++ 2M) and evaluate it held out against every hand-made schedule built at those
  calls within 2% of its MACs (``experiments.search_schedules.transfer_schedule``, the searched
  schedules' transfer).
* ``--merge A.json B.json ...``: one JSON.

    python -m experiments.learn_schedules --part spearman --out s.json
    python -m experiments.learn_schedules --part learn --target 0.402 --time-budget 360 --out l40.json
    python -m experiments.learn_schedules --merge s.json l40.json --out experiments/measurements/dipgo-learn-estimate.json
    python -m experiments.learn_schedules --part learn --target 0.202 --forecast 0 1 2 --window 0.01 --out f20.json
    python -m experiments.learn_schedules --part transfer --target 0.402 --time-budget 300 --out t40.json
    # early stopping: climbs on the first 8 bank samples, the 16 others pick; held out, the
    # learned schedule and its start only (the hand-made rows from an earlier run at the same MACs)
    python -m experiments.learn_schedules --part learn --target 0.402 --forecast 0 1 2 --window 0.01 \
        --bank 24 --climb-size 8 --time-budget 500 --skip-search --no-handmade --out e40.json
    # resumed bank runs (2026-12-08): climbs on 16 samples, 16 others pick, 570 s in all
    python -m experiments.learn_schedules --part learn --target 0.402 --forecast 0 1 2 --window 0.01 \
        --bank 32 --climb-size 16 --time-budget 570 --skip-search --no-handmade --out r40.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo import skip_steps
from shortcut_kernels.dipgo.learn import LEAD_SHARES, TRAIN_SEED, _null_label, bank_loss, estimate, learn, make_bank
from shortcut_kernels.runtime.schedule import Schedule, graph_of
from shortcut_kernels.dipgo.search import local_search, with_trades
from shortcut_kernels.dipgo.supernet import SuperNet
from shortcut_kernels.dipgo.train import _Chain
from shortcut_kernels.zoo.dipgo_eval import evaluate, handmade, zoo_sampler
from shortcut_kernels.zoo.sampling import make_scheduler

from bench.sections.dipgo_learn import LEARN, estimate_quality
from experiments.search_schedules import transfer_schedule


def _setup(name: str, calls: int):
    z = zoo.load(name)
    sched = make_scheduler(z.scheduler_config)
    sched.set_timesteps(calls)
    return z.model, sched


def part_spearman(args) -> dict:
    model, sched = _setup(args.model, args.calls)
    return estimate_quality(model, sched, args.spearman_bank, count=args.spearman_count, seed=args.spearman_seed)


def _start(model, sched, calls: int, target: float, bank) -> tuple[Schedule, dict]:
    """The hand-made schedule within ``target`` (top 10% of it) that scores best on the bank."""
    net = SuperNet(model, "coarse")
    chain = _Chain(net, sched, 3.0, _null_label(model))
    options = {k: s for k, s in handmade(model, calls).items() if s.macs_kept <= target + 1e-9}
    top = max(s.macs_kept for s in options.values())
    scores = {k: 10 * math.log10(4 / bank_loss(chain, bank, s)) for k, s in options.items() if s.macs_kept >= 0.9 * top}
    net.remove()
    key = max(scores, key=scores.get)
    return options[key], dict(start=key, start_scores=scores)


def part_learn(args) -> dict:
    """With ``--forecast`` orders beyond 0 the learner picks its start among the hand-made
    schedules at every order (its own rule) and chooses orders per block; the hand-made
    schedules are evaluated at every order too; no search (it has no forecast moves)."""
    model, sched = _setup(args.model, args.calls)
    bank = make_bank(model, sched, args.bank, seed=args.bank_seed)
    orders = tuple(args.forecast)
    forecasting = orders != (0,)
    start, info = (None, {}) if forecasting else _start(model, sched, args.calls, args.target, bank)
    print("start", info, flush=True)
    # the learner
    t0, c0 = time.perf_counter(), time.process_time()
    res = learn(model, sched, args.target, start=start, bank=bank, time_budget=args.time_budget,
                estimate_size=args.estimate_size, patterns=args.patterns, max_validations=args.max_validations,
                forecast=orders, window=args.window, starts=args.starts, climb_size=args.climb_size, progress=True)
    if forecasting:
        start = res.start
        info = dict(start=start.name if not start.params else
                    f"{start.name}({','.join(f'{k}={v}' for k, v in start.params.items())})")
    learned = dict(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, start_psnr=res.start_psnr,
                   psnr=res.psnr, evaluations=res.evaluations, history=res.history, climbs=res.climbs,
                   keep=res.schedule.keep.int().tolist(), macs_kept=res.schedule.macs_kept,
                   forecast=res.schedule.forecast.int().tolist())
    print("learned", json.dumps({k: v for k, v in learned.items() if k != "keep"}), flush=True)
    schedules = {"learned": res.schedule, f"start {info['start']}": start}
    searched = None
    if not (args.skip_search or forecasting):  # the search from the same start, for the same seconds (its own bank sampler)
        searched, schedules["searched"] = _search(args, model, sched, start)
    m = res.schedule.macs_kept
    if not args.no_handmade:
        schedules.update(_window(model, args.calls, m, orders, skip=None if forecasting else info["start"]))
    rows = evaluate(args.model, schedules, per_class=args.per_class)
    return {f"target_{args.target}": dict(target=args.target, bank=args.bank, bank_seed=args.bank_seed,
                                          climb_size=args.climb_size,
                                          time_budget=args.time_budget, forecast=list(orders),
                                          estimate_size=args.estimate_size, patterns=args.patterns,
                                          max_validations=args.max_validations, **info,
                                          learned=learned, searched=searched, heldout=rows)}


def _search(args, model, sched, start):
    sampler = zoo_sampler(model, sched, n=args.bank, calls=args.calls)
    sampler(None)  # the reference samples are set-up, as the learner's bank is
    s_start, patterns = with_trades(model, start)
    t0, c0 = time.perf_counter(), time.process_time()
    found = local_search(s_start, sampler, time_budget=args.time_budget, patterns=patterns)
    searched = dict(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                    start_psnr=found.start_psnr, psnr=found.psnr, evaluations=found.evaluations,
                    history=found.history, keep=found.schedule.keep.int().tolist(), macs_kept=found.schedule.macs_kept)
    print("searched", json.dumps({k: v for k, v in searched.items() if k != "keep"}), flush=True)
    return searched, found.schedule


def _rebuilt(model, keep, forecast=None) -> Schedule:
    """A schedule from its keep rows (and forecast orders), on the graph of the model whose
    block count they match."""
    for granularity in ("coarse", "fine"):
        g = graph_of(model, granularity)
        if len(g) == len(keep[0]):
            return Schedule(torch.tensor(keep, dtype=torch.bool), g, forecast=forecast)
    raise ValueError(f"no graph of the model has {len(keep[0])} blocks")


def _lead_even(model, calls: int, macs: float) -> dict[str, Schedule]:
    """cache-dit's static-mask placement as whole-call schedules within 2% of ``macs``
    (``skip_steps(placement="lead")`` with a lead of each of ``dipgo.learn.LEAD_SHARES``)."""
    out = {}
    for count in range(2, calls // 2 + 1):
        if abs(skip_steps(model, calls, count=count).macs_kept - macs) > 0.02 * macs:
            continue
        for share in LEAD_SHARES:
            lead = max(1, round(share * count))
            out[f"skip_steps({count},lead{lead}+even)"] = skip_steps(model, calls, count=count, placement="lead",
                                                                    lead=lead)
    return out


def _window(model, calls: int, macs: float, orders, skip: str | None = None) -> dict[str, Schedule]:
    """Every hand-made schedule within 2% of ``macs`` (``handmade`` and, with forecast
    orders, cache-dit's lead-and-even placement), at every order in ``orders``."""
    options = {k: s for k, s in handmade(model, calls).items() if abs(s.macs_kept - macs) <= 0.02 * macs and k != skip}
    if tuple(orders) != (0,):
        options.update(_lead_even(model, calls, macs))
    return {k if o == 0 else f"{k} forecast{o}": s.with_forecast(o) for k, s in options.items() for o in orders}


def part_heldout(args) -> dict:
    """Held-out quality (``--per-class``) of the learned and searched schedules of ``--from``
    part JSONs (the latest given wins per target and kind) beside the hand-made ones within 2%."""
    model, _ = _setup(args.model, args.calls)
    out = {}
    found: dict[str, dict] = {}
    for path in args.sources:
        for key, v in json.loads(Path(path).read_text()).items():
            if key.startswith("target_"):
                entry = found.setdefault(key, {"start": v["start"]})
                for kind in ("learned", "searched"):
                    if v.get(kind):
                        entry[kind] = (path, v[kind]["keep"], v[kind].get("forecast"))
    for key, entry in found.items():
        schedules = {f"{kind} ({Path(entry[kind][0]).name})": _rebuilt(model, entry[kind][1], entry[kind][2])
                     for kind in ("learned", "searched") if kind in entry}
        m = next(iter(schedules.values())).macs_kept
        schedules.update(_window(model, args.calls, m, args.forecast))
        out[key] = dict(start=entry["start"], heldout=evaluate(args.model, schedules, per_class=args.per_class))
    return out


def part_transfer(args) -> dict:
    """Learn at ``--calls`` DDIM calls (the learner's own start: the best hand-made schedule on
    the bank within the target), then the learned schedule at ``--transfer-calls`` of
    ``--transfer-scheduler`` against the hand-made schedules built there, held out."""
    model, sched = _setup(args.model, args.calls)
    bank = make_bank(model, sched, args.bank)
    t0, c0 = time.perf_counter(), time.process_time()
    res = learn(model, sched, args.target, bank=bank, time_budget=args.time_budget, estimate_size=args.estimate_size,
                progress=True, **LEARN)
    learned = dict(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, start=res.start.name,
                   start_params=res.start.params, start_macs=res.start.macs_kept, start_psnr=res.start_psnr,
                   psnr=res.psnr, moves=len(res.history) - 1, estimates=res.estimates, evaluations=res.evaluations,
                   history=res.history, keep=res.schedule.keep.int().tolist(), granularity=res.schedule.granularity,
                   computed_calls=res.schedule.computed_calls(), macs_kept=res.schedule.macs_kept)
    print("learned", json.dumps({k: v for k, v in learned.items() if k not in ("keep", "history")}), flush=True)
    # resized as its rows (keeping the MAC share), as the searched schedules are: a start no move
    # changed would otherwise be rebuilt from its builder's arguments (skip_steps keeps its count)
    rows = Schedule(res.schedule.keep, res.schedule.graph, name="learned", forecast=res.schedule.forecast)
    heldout = transfer_schedule(args.model, rows, "learned", calls=args.transfer_calls,
                                scheduler_cls=args.transfer_scheduler, per_class=args.per_class)
    return {f"target_{args.target}": dict(target=args.target, bank=args.bank, time_budget=args.time_budget,
                                          estimate_size=args.estimate_size, learn_settings=LEARN, learned=learned,
                                          transfer=heldout)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["spearman", "learn", "heldout", "transfer"])
    ap.add_argument("--from", dest="sources", nargs="+", help="--part heldout: the learn parts' JSONs")
    ap.add_argument("--merge", nargs="+", help="JSONs of the parts to merge into --out")
    ap.add_argument("--model", default="digits-unet")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--target", type=float, default=0.402, help="kept-MAC budget (skip_steps(20) keeps 40.1%%)")
    ap.add_argument("--time-budget", type=float, default=360.0, help="seconds of learning, and of search")
    ap.add_argument("--bank", type=int, default=8, help="training samples moves are validated on")
    ap.add_argument("--bank-seed", type=int, default=TRAIN_SEED, help="--part learn: seed of the training noise "
                    "(held-out evaluations use other seeds)")
    ap.add_argument("--climb-size", type=int, default=None, help="--part learn: the first bank samples the "
                    "starts and moves are judged on; the others pick the schedule returned among every one the climbs "
                    "passed through (default: all do both)")
    ap.add_argument("--estimate-size", type=int, default=4, help="bank samples the estimate runs on")
    ap.add_argument("--patterns", action="store_true", help="DeepCache-branch rows as learner units")
    ap.add_argument("--max-validations", type=int, default=32, help="learner proposals sampled per schedule")
    ap.add_argument("--forecast", type=int, nargs="+", default=[0], choices=[0, 1, 2],
                    help="--part learn: reuse orders the learner may choose (0 1 2: repeat or forecast); "
                         "--part learn / heldout: the orders the hand-made schedules run at")
    ap.add_argument("--window", type=float, default=None,
                    help="--part learn: keep the learner's moves within this share below the target (equal MACs)")
    ap.add_argument("--starts", type=int, default=2, help="--part learn: hand-made starts the learner climbs "
                    "(with forecast orders; a given start is one)")
    ap.add_argument("--no-handmade", action="store_true", help="--part learn: held out, the learned schedule and "
                    "its start only (the hand-made rows from an earlier run at the same MACs)")
    ap.add_argument("--skip-search", action="store_true", help="only the learner (and the hand-made rows)")
    ap.add_argument("--per-class", type=int, default=20, help="held-out samples per digit")
    ap.add_argument("--spearman-bank", type=int, default=16)
    ap.add_argument("--spearman-seed", type=int, default=None, help="first seed of the bank (default: the "
                    "learner's training seed, 10,000)")
    ap.add_argument("--spearman-count", type=int, default=20, help="computed calls of the skip_steps start")
    ap.add_argument("--transfer-calls", type=int, default=25, help="--part transfer: calls of the target sampler")
    ap.add_argument("--transfer-scheduler", default="DPMSolverMultistepScheduler", help="--part transfer")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = dict(command="python -m experiments.learn_schedules " + " ".join(sys.argv[1:] if argv is None else argv),
               date=time.strftime("%Y-%m-%d"), threads=args.threads)
    if args.merge:
        out.update(parts=[json.loads(Path(p).read_text()) for p in args.merge])
    elif args.part == "spearman":
        out.update(model=args.model, calls=args.calls, spearman=part_spearman(args))
    elif args.part == "heldout":
        out.update(model=args.model, calls=args.calls, heldout=part_heldout(args))
    elif args.part == "learn":
        out.update(model=args.model, calls=args.calls, **part_learn(args))
    elif args.part == "transfer":
        out.update(model=args.model, calls=args.calls, **part_transfer(args))
    else:
        ap.error("give --part or --merge")
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print("wrote", args.out)
    return out


if __name__ == "__main__":
    main()
