"""Measure the zoo models: ``python -m shortcut_kernels.zoo.evaluate [NAME ...] [--per-class 100]
[--steps 50] [--guidance 3] [--scheduler DDIMScheduler] [--record]``.

Reports the classifier's test accuracy, the digits-FD of the real train split against the
test split (the reference point), and for each diffusion model: the class accuracy of
``per-class`` conditional samples per digit, their digits-FD against the test split, the
memorisation check (distance of each sample to its nearest training image against the
same for the held-out test digits, metrics.memorisation), and the time to load the model
and sample 64 digits. ``--record`` writes the numbers into the
model JSONs under "metrics".
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import NAMES, WEIGHTS_DIR, load, load_digits, make_scheduler, metrics, sample


def evaluate(names=("digits-unet", "digits-dit"), per_class=100, steps=50, guidance=3.0,
             scheduler="DDIMScheduler", seed=0, progress=True, threads=2) -> dict:
    torch.set_num_threads(threads)
    out: dict = {}
    xte, yte = load_digits("test")
    xtr, _ = load_digits("train")
    out["digits-classifier"] = {"test_accuracy": metrics.class_accuracy(xte, yte)}
    out["reference"] = {"fd_train_vs_test": metrics.digits_fd(xtr, "test")}
    for name in names:
        t0 = time.perf_counter()
        model, cfg = load(name)
        x64 = sample(model, make_scheduler(cfg, scheduler), torch.arange(64) % 10, steps=steps,
                     guidance=guidance, seed=seed, progress=False)
        t_load_sample64 = time.perf_counter() - t0
        labels = torch.arange(10).repeat_interleave(per_class)
        t0 = time.perf_counter()
        x = sample(model, make_scheduler(cfg, scheduler), labels, steps=steps, guidance=guidance,
                   seed=seed + 1, progress=progress)
        t_sample = time.perf_counter() - t0
        pred = metrics.predict(x)
        per_digit = [(pred[labels == d] == d).float().mean().item() for d in range(10)]
        out[name] = {
            "scheduler": scheduler, "steps": steps, "guidance": guidance, "n_samples": len(labels),
            "class_accuracy": (pred == labels).float().mean().item(),
            "class_accuracy_per_digit": [round(a, 3) for a in per_digit],
            "digits_fd_vs_test": metrics.digits_fd(x, "test"),
            "memorisation": metrics.memorisation(x),
            "seconds_load_and_sample_64": round(t_load_sample64, 2),
            "seconds_sample_all": round(t_sample, 1),
            "accuracy_of_first_64": metrics.class_accuracy(x64, torch.arange(64) % 10),
        }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcut_kernels.zoo.evaluate")
    p.add_argument("names", nargs="*", default=["digits-unet", "digits-dit"])
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--scheduler", default="DDIMScheduler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true", help="write the numbers into the model JSONs")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for n in a.names:
        if n not in NAMES or n == "digits-classifier":
            p.error(f"not a zoo diffusion model: {n!r}")
    res = evaluate(a.names, a.per_class, a.steps, a.guidance, a.scheduler, a.seed, not a.no_progress)
    print(json.dumps(res, indent=2))
    if a.record:
        cmd = "python -m shortcut_kernels.zoo.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
        for name in ["digits-classifier", *a.names]:
            path = WEIGHTS_DIR / f"{name}.json"
            meta = json.loads(path.read_text())
            meta["metrics"] = {**res[name], "reference_fd_train_vs_test": res["reference"]["fd_train_vs_test"],
                               "command": cmd.strip(), "torch": torch.__version__}
            path.write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
