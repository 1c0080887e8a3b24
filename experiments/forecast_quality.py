"""Forecast reuse on the zoo models: set PSNR against the full model of hand-made schedules
that repeat their caches (``forecast=0``) or extrapolate them (``forecast=1`` / ``2``), at the
same compute. Quality only, no timing.

    python -m experiments.forecast_quality --out experiments/measurements/forecast-quality.json

digits-dit: ``fora(N)`` (N = 2, 3, 4) and ``skip_steps`` (``count`` = 15, 20, 25, 30 of 50
calls, uniform and early-dense power-1.5 placement); digits-unet: ``deepcache`` near 40% and
60% of the MACs and ``skip_steps`` (count 20 and 30). Every schedule samples ``--n`` images
(digits 0..9 in turn) from the held-out evaluation noise (``zoo.dipgo_eval.EVAL_SEED``), DDIM,
50 calls, guidance 3, as the full model does; a row gives the MAC share, the share of block
forwards that ran (keep cells of the schedule's graph), the set PSNR (one MSE over all
images), the mean per-image PSNR and the class accuracy. The JSON is rewritten after every
row, so a cut run keeps what it measured.

``--parabola`` (on by default) also runs order 2 on four digits-dit settings with the
interpolating parabola through the last three computed outputs (``s (s + 1) / 2`` times the
second difference) instead of the library's Taylor form (``s^2 / 2``, TaylorSeer's), rows with
``"form": "parabola"``: the comparison behind that choice (docs/dipgo.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench.sections.common import git_commit
from shortcut_kernels import zoo
from shortcut_kernels.dipgo import accelerate, deepcache, fora, skip_steps
from shortcut_kernels.runtime import forecast as forecast_module
from shortcut_kernels.zoo.dipgo_eval import EVAL_SEED

DIT = [("fora", dict(interval=i)) for i in (2, 3, 4)] + [
    ("skip_steps", dict(count=c, placement=p)) for c in (15, 20, 25, 30) for p in ("uniform", "power")]
UNET = [("deepcache", dict(interval=3, branch=0)), ("deepcache", dict(interval=5, branch=1)),
        ("deepcache", dict(interval=2, branch=1)), ("deepcache", dict(interval=5, branch=3)),
        ("skip_steps", dict(count=20)), ("skip_steps", dict(count=30))]
BUILDERS = {"fora": fora, "skip_steps": skip_steps, "deepcache": deepcache}
PARABOLA = [("fora", dict(interval=2)), ("fora", dict(interval=3)), ("skip_steps", dict(count=20, placement="uniform")),
            ("skip_steps", dict(count=15, placement="power"))]


def parabola_weights(call: int, computed) -> tuple[float, ...]:
    """Lagrange weights at ``call`` of the outputs computed at ``computed``: the polynomial
    through them (order 2: the parabola), the alternative to the library's Taylor form."""
    out = []
    for i, ci in enumerate(computed):
        w = 1.0
        for j, cj in enumerate(computed):
            if j != i:
                w *= (call - cj) / (ci - cj)
        out.append(w)
    return tuple(out)


@contextlib.contextmanager
def parabola():
    """The library's forecast weights replaced by :func:`parabola_weights` (schedules built
    inside plan their weights with it)."""
    old = forecast_module.weights
    forecast_module.weights = parabola_weights
    try:
        yield
    finally:
        forecast_module.weights = old


def _label(builder: str, params: dict) -> str:
    return f"{builder}(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")"


def measure(name: str, settings, orders, n: int, calls: int, guidance: float, seed: int, sink,
            parabola_settings=()) -> list[dict]:
    """One row per (setting, order) on zoo model ``name`` (and per setting of
    ``parabola_settings``, order 2 in the parabola form); ``sink(rows)`` after each."""
    z = zoo.load(name)
    model, sched = z.model, zoo.make_scheduler(z.scheduler_config)
    labels = torch.arange(n) % 10

    def run():
        return zoo.sample(model, sched, labels, steps=calls, guidance=guidance, seed=seed, progress=False)

    ref = run()
    rows = []
    jobs = [(b, p, o, "taylor") for b, p in settings for o in orders] + [(b, p, 2, "parabola")
                                                                          for b, p in parabola_settings]
    for builder, params, order, form in jobs:
        if "count" in params:  # the counts are of 50 calls
            params = {**params, "count": max(1, round(params["count"] * calls / 50))}
        with parabola() if form == "parabola" else contextlib.nullcontext():
            s = BUILDERS[builder](model, calls, **params, forecast=order)
            s.forecast_weights  # planned here, with this form's weights
            with accelerate(model, s, scheduler=sched):
                x = run()
        rows.append(dict(model=name, schedule=_label(builder, params), builder=builder, params=params,
                         forecast=order, form=form if order else "repeat", calls=calls, macs_kept=s.macs_kept,
                         block_share=float(s.keep.float().mean()),
                         forecast_cells=sum(m == 3 for row in s.modes for m in row),
                         psnr_vs_full=zoo.metrics.psnr(x, ref),
                         psnr_image_mean=float(zoo.metrics.psnr(x, ref, per_image=True).mean()),
                         class_accuracy=zoo.metrics.class_accuracy(x, labels),
                         finite=bool(torch.isfinite(x).all())))
        r = rows[-1]
        print(f"{name} {r['schedule']} forecast={order} ({r['form']}): blocks {100 * r['block_share']:.1f}%, "
              f"MACs {100 * s.macs_kept:.1f}%, set PSNR {r['psnr_vs_full']:.2f} dB", flush=True)
        sink(rows)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    ap.add_argument("--models", nargs="+", default=["digits-dit", "digits-unet"], choices=["digits-dit", "digits-unet"])
    ap.add_argument("--orders", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=100, help="images per schedule (digits 0..9 in turn)")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=EVAL_SEED, help="noise seed (default: the held-out evaluation noise)")
    ap.add_argument("--no-parabola", dest="parabola", action="store_false",
                    help="skip the parabola-form rows (order 2 on four digits-dit settings)")
    args = ap.parse_args(argv)
    out = dict(experiment="forecast_quality", command="python -m experiments.forecast_quality " + " ".join(
        sys.argv[1:] if argv is None else argv), commit=git_commit(), torch=torch.__version__,
        platform=platform.platform(), threads=torch.get_num_threads(), n=args.n, calls=args.calls,
        guidance=args.guidance, seed=args.seed, sampler="DDIM (zoo scheduler config)",
        started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rows=[])
    done: list[dict] = []

    def sink(rows):
        out["rows"] = done + rows
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))

    for name in args.models:
        dit = name == "digits-dit"
        done += measure(name, DIT if dit else UNET, args.orders, args.n, args.calls, args.guidance, args.seed, sink,
                        PARABOLA if dit and args.parabola else ())
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    sink([])


if __name__ == "__main__":
    main()
