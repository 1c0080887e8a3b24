"""The probe behind the learner's shift moves: on ``digits-dit`` at 20% of the MACs,
``skip_steps(10, lead2+even)`` with order-2 forecasts, and the same schedule with every computed
call from its k-th on moved one call earlier or later, held out (``zoo.dipgo_eval.evaluate``,
10 samples per digit: half of the 200 the learner tables use, the same noise).

    python -m experiments.shift_probe --out FILE
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo import skip_steps
from shortcut_kernels.zoo.dipgo_eval import evaluate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    z = zoo.load("digits-dit")
    base = skip_steps(z.model, 50, count=10, placement="lead", lead=2).with_forecast(2)
    comp = base.computed_calls()
    schedules = {"base": base}
    for k in range(2, len(comp)):
        for d in (-1, 1):
            new = comp[:k] + [c + d for c in comp[k:]]
            if new[k] > new[k - 1] and new[-1] <= 49:
                schedules[f"shift{k}{d:+d}"] = skip_steps(z.model, 50, compute=new).with_forecast(2)
    rows = evaluate("digits-dit", schedules, per_class=args.per_class, progress=False)
    doc = dict(command="python -m experiments.shift_probe " + " ".join(sys.argv[1:] if argv is None else argv),
               computed=comp, rows=rows)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    for r in rows:
        print(r["schedule"], round(r["psnr_image_mean"], 2), round(r["psnr_vs_full"], 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
