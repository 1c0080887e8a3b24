"""How well the learner's estimate ranks single whole-call flips of a *forecasting* schedule:
the estimate that runs the schedule's forecasts (``dipgo.learn.estimate``) against the same
estimate on the schedule's keep rows with every reused block repeating (what the learner used
before it ran the forecasts: its SuperNet repeated the caches), and the forecasting estimate
with the chain adjoint as its sensitivity (``sensitivity="adjoint"``). Every whole-call flip of the
start is measured on a fixed bank of training noise (the chain rerun with the flip, forecast
orders kept as the learner keeps them), Spearman within drops and within adds.

    python -m experiments.forecast_estimate_quality --model digits-dit --count 10 --lead 4 --order 2 --out F
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench.sections.common import git_commit
from bench.sections.dipgo_learn import spearman
from shortcut_kernels import zoo
from shortcut_kernels.dipgo import skip_steps
from shortcut_kernels.dipgo.gated_chain import _Chain
from shortcut_kernels.dipgo.learn import _null_label, _with_units, bank_loss, estimate, make_bank
from shortcut_kernels.dipgo.supernet import SuperNet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--count", type=int, default=10, help="computed calls of the skip_steps start")
    ap.add_argument("--lead", type=int, default=4, help="lead of the lead-and-even placement")
    ap.add_argument("--order", type=int, default=2, help="forecast order of the start")
    ap.add_argument("--bank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=None, help="first seed of the bank (default: the training seed)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    z = zoo.load(args.model)
    sched = zoo.make_scheduler(z.scheduler_config)
    sched.set_timesteps(args.calls)
    start = skip_steps(z.model, args.calls, count=args.count, placement="lead", lead=args.lead).with_forecast(args.order)
    bank = make_bank(z.model, sched, args.bank, **({} if args.seed is None else {"seed": args.seed}))
    net = SuperNet(z.model, graph=start.graph)
    chain = _Chain(net, sched, 3.0, _null_label(z.model))
    predicted, seconds = {}, {}
    for name, s, sens in (("forecast", start, "shortcut"), ("forecast_adjoint", start, "adjoint"),
                          ("repeat", start.with_forecast(0), "shortcut")):
        t0 = time.perf_counter()
        est = estimate(chain, bank, s, sensitivity=sens)
        predicted[name], seconds[name] = est.predicted.tolist(), time.perf_counter() - t0
    # the units are the same for both (they depend on the keep rows only)
    base = bank_loss(chain, bank, start)
    flips = [dict(call=u.call, kind=u.kind, measured=bank_loss(chain, bank, _with_units(start, [u])) - base,
                  **{k: v[i] for k, v in predicted.items()}) for i, u in enumerate(est.units)]
    net.remove()
    rank = {name: {kind + "s": spearman([f[name] for f in flips if f["kind"] == kind],
                                         [f["measured"] for f in flips if f["kind"] == kind])
                   for kind in ("drop", "add")} for name in predicted}
    sign = {name: {kind + "s": sum((f[name] < 0) == (f["measured"] < 0) for f in flips if f["kind"] == kind)
                   / sum(f["kind"] == kind for f in flips) for kind in ("drop", "add")} for name in predicted}
    doc = dict(command="python -m experiments.forecast_estimate_quality " + " ".join(sys.argv[1:] if argv is None else argv),
               commit=git_commit(), model=args.model, calls=args.calls, start=start.name, start_params=start.params,
               bank=args.bank, seed=args.seed, loss=base, seconds=seconds, spearman=rank, sign_agreement=sign, flips=flips)
    print(json.dumps(dict(spearman=rank, sign_agreement=sign, seconds=seconds), indent=1))
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
