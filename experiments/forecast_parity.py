"""Forecast order 2 against cache-dit's TaylorSeer on the same keep rows: what makes the
difference. Quality only, no timing.

    python -m experiments.forecast_parity --out experiments/measurements/forecast-parity.json

On ``digits-dit`` under the cache-dit section's protocol (``bench.sections.cache_dit``: 50 DDIM
calls, guidance 3, ``--per-class`` samples of each digit from the held-out noise, set PSNR
against the full model), for cache-dit's static masks "lead L + even" at 50% of the block
compute (Fn 1, 20 full calls; ``--leads``): cache-dit's TaylorSeer orders 1 and 2, and our
schedule of the same keep rows forecasting

  * ``orders``: one order at every reused cell (``uniform``) or the orders TaylorSeer runs call
    by call (``taylorseer``: its derivatives start with the computation at call 3,
    ``cache_dit.taylorseer_orders``);
  * ``d2``: the second derivative of the library (``library``: the change of slope over the
    distance of the slopes' midpoints, ``(c_0 - c_2) / 2``) or TaylorSeer's (``taylorseer``:
    over the last window, ``cache_dit.taylorseer_weights``).

Ours at TaylorSeer's orders with TaylorSeer's second derivative is cache-dit's forecast (the
parity test checks that on 10 calls); the other cells separate the two differences. On
whole-call schedules with uneven spacing (``skip_steps`` power 1.5 at 10 and 25 of 50 calls,
and uniform at 25) the same four forecasts at order 2 (TaylorSeer's orders of a whole-call
schedule: the same rule with Fn 0).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench.sections import cache_dit as cd
from bench.sections.common import git_commit
from shortcut_kernels.runtime import forecast as forecast_module
from shortcut_kernels.runtime import skip_steps
from shortcut_kernels.runtime.schedule import Schedule

FORMS = [("uniform", "library"), ("uniform", "taylorseer"), ("taylorseer", "library"), ("taylorseer", "taylorseer")]
WHOLE_CALL = [dict(count=25, placement="uniform"), dict(count=25, placement="power"),
              dict(count=10, placement="power")]


def run_ours(bench, key: str, keep, graph, forecast, d2: str) -> dict:
    """Our schedule of ``keep`` at per-cell ``forecast`` orders with the second derivative
    ``d2`` (the weights are planned while the chosen form is in place)."""
    old = forecast_module.weights
    if d2 == "taylorseer":
        forecast_module.weights = cd.taylorseer_weights
    try:
        s = Schedule(keep, graph, name=key, forecast=forecast)
        s.forecast_weights  # planned here, with this form's weights
    finally:
        forecast_module.weights = old
    return bench.ours(key, s)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    ap.add_argument("--per-class", type=int, default=3, help="samples per digit (the quick section's 3)")
    ap.add_argument("--leads", nargs="+", type=int, default=[4, 1])
    ap.add_argument("--no-whole-call", dest="whole_call", action="store_false")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bench = cd.Bench(cd.Protocol(per_class=args.per_class))
    out = dict(experiment="forecast_parity", command="python -m experiments.forecast_parity " + " ".join(
        sys.argv[1:] if argv is None else argv), commit=git_commit(), torch=torch.__version__,
        platform=platform.platform(), threads=torch.get_num_threads(), model=bench.p.model, calls=bench.p.calls,
        guidance=bench.p.guidance, samples=len(bench.labels), seed=bench.seed,
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rows=[])

    def add(row: dict) -> None:
        out["rows"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "mask"}), flush=True)

    bench.full()
    blocks = len(bench.graph)
    k = cd.most_full_calls(bench.p.calls, blocks, 1, 0.5)
    for lead in args.leads:
        mask = cd.spread_mask(bench.p.calls, k, lead)
        keep = torch.zeros(bench.p.calls, blocks, dtype=torch.bool)
        keep[:, :1] = True
        keep[[t for t, m in enumerate(mask) if m]] = True
        name = f"lead{lead}+even"
        for order in (1, 2):
            st = cd.CacheDiTSetting(Fn=1, warmup=lead, order=order, mask=mask, policy="static", mask_name=name)
            r = bench.cache_dit(st)
            add(dict(schedule=f"F1B0 mask {name} ({k} full)", library="cache-dit", order=order, compute=r["compute"],
                     psnr=r["psnr"], psnr_image_mean=r["psnr_image_mean"], mask="".join(map(str, mask))))
            for orders, d2 in FORMS if order == 2 else FORMS[::2]:
                f = cd.taylorseer_orders(mask, order, 1, blocks) if orders == "taylorseer" else order
                r = run_ours(bench, name, keep, bench.graph, f, d2)
                add(dict(schedule=f"first1+mask({name},{k} full)", library="ours", order=order, orders=orders, d2=d2,
                         compute=r["compute"], psnr=r["psnr"], psnr_image_mean=r["psnr_image_mean"]))
    for params in WHOLE_CALL if args.whole_call else ():
        base = skip_steps(bench.model, bench.p.calls, granularity="fine", exponent=1.5, **params)
        label = f"skip_steps({params['count']},{params['placement']})"
        mask = tuple(int(v) for v in base.keep[:, 0].tolist())
        for orders, d2 in FORMS:
            f = cd.taylorseer_orders(mask, 2, 0, blocks) if orders == "taylorseer" else 2
            r = run_ours(bench, label, base.keep, base.graph, f, d2)
            add(dict(schedule=label, library="ours", order=2, orders=orders, d2=d2, compute=r["compute"],
                     psnr=r["psnr"], psnr_image_mean=r["psnr_image_mean"]))
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
