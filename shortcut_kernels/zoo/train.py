"""Reproduce the zoo weights: ``python -m shortcut_kernels.zoo.train NAME [--iters N] [--out DIR]``.

NAME is one of digits-classifier, digits-unet, digits-dit. Training is seeded (seed 0: batch order,
augmentation, label dropout, noise and timesteps) and runs on the CPU with the recipe's
torch thread count (``--threads`` overrides it): about 1 min for the classifier and about
25-30 min for each diffusion model on 2 uncontended cores. Writes ``DIR/NAME.safetensors``
(the EMA weights for the diffusion models) and ``DIR/NAME.json`` (configs + training
record; default DIR: the package's ``weights`` folder). The record holds the recipe (thread
count included) and ``--note`` (free text on the circumstances of the run, e.g. a
contended machine behind ``wall_seconds``), so that the command reproduces the shipped
files, record and weights: the same weights bit for bit on the same machine, torch version and thread
count (tests/test_zoo.py checks it on the classifier and on short diffusion runs). Another
thread count or machine can change the weights through floating-point summation order,
not their quality.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from . import models as M
from .data import augment, load_digits
from .registry import WEIGHTS_DIR

# name -> (kind, default training hyper-parameters)
# `threads` is part of the recipe: it fixes the floating-point summation order.
RECIPES = {
    "digits-classifier": ("classifier", {"iters": 2000, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4, "seed": 0,
                                         "threads": 2}),
    # The shipped diffusion models stop at 2,000 of their 3,000-iteration schedules (the CPU
    # was shared while they trained, one thread each); both sample at >= 99% class accuracy.
    "digits-unet": ("unet", {"iters": 3000, "stop_at": 2000, "batch_size": 128, "lr": 1e-3, "weight_decay": 1e-2,
                             "warmup": 100, "ema": 0.999, "null_prob": 0.1, "seed": 0, "threads": 1}),
    "digits-dit": ("dit", {"iters": 3000, "stop_at": 2000, "batch_size": 128, "lr": 5e-4, "weight_decay": 1e-2, "warmup": 200,
                           "ema": 0.999, "null_prob": 0.1, "seed": 0, "threads": 1}),
}


def _lr_lambda(warmup: int, iters: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, iters - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p))  # cosine decay to 10%
    return f


def _batches(n: int, batch_size: int, g: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def train_classifier(hp: dict, progress: bool = True):
    g = torch.Generator().manual_seed(hp["seed"])
    torch.manual_seed(hp["seed"])
    model = M.DigitsClassifier()
    x, y = load_digits("train")
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, hp["iters"]))
    it = _batches(len(y), hp["batch_size"], g)
    model.train()
    bar = tqdm(range(hp["iters"]), desc="digits-classifier", disable=not progress)
    for step in bar:
        idx = next(it)
        xb = augment(x[idx], generator=g)
        xb = xb + 0.05 * torch.randn(xb.shape, generator=g)  # mild pixel noise
        loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    xt, yt = load_digits("test")
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return model, {"test_accuracy": acc}


def train_diffusion(kind: str, hp: dict, progress: bool = True, name: str = "", checkpoint=None, save_every: int = 0):
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(hp["seed"])
    torch.manual_seed(hp["seed"])
    model = M.build(kind)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = DDPMScheduler.from_config(M.SCHEDULER_CONFIG)
    T = sched.config.num_train_timesteps
    x, y = load_digits("train")
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(hp["warmup"], hp["iters"]))
    it = _batches(len(y), hp["batch_size"], g)
    model.train()
    stop = min(hp["iters"], hp.get("stop_at") or hp["iters"])  # the LR schedule spans hp["iters"]
    bar = tqdm(range(stop), desc=name or kind, disable=not progress)
    run = None
    for step in bar:
        idx = next(it)
        x0, lab = x[idx], y[idx].clone()
        drop = torch.rand(lab.shape, generator=g) < hp["null_prob"]
        lab[drop] = M.NULL_LABEL
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, T, (x0.shape[0],), generator=g)
        xt = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(model(xt, t, lab), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        d = min(hp["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - d)
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{run:.4f}")
        if checkpoint is not None and save_every and (step + 1) % save_every == 0 and step + 1 < stop:
            checkpoint(ema, {"final_loss_ema": run, "checkpoint_step": step + 1})
    return ema, {"final_loss_ema": run}


def train(name: str, iters: int | None = None, out: str | Path | None = None, progress: bool = True,
          save_every: int = 0, threads: int | None = None, stop_at: int | None = None,
          note: str | None = None) -> Path:
    """Train zoo model ``name`` and write its weights and JSON; returns the weights path.
    ``note`` (free text on the circumstances of the run) goes into the record."""

    if name not in RECIPES:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {sorted(RECIPES)}")
    kind, hp = RECIPES[name]
    hp = dict(hp)
    if iters is not None:
        hp["iters"] = int(iters)
        hp.pop("stop_at", None)
    if stop_at is not None:
        hp["stop_at"] = int(stop_at)
    if threads is not None:
        hp["threads"] = int(threads)
    torch.set_num_threads(hp["threads"])
    out = Path(out) if out is not None else WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def save(model, info):
        wall = time.time() - t0
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(out / f"{name}.safetensors"), metadata={"name": name, "kind": kind})
        meta = {
            "name": name,
            "kind": kind,
            "model_config": model.model_config,
            "scheduler_config": M.SCHEDULER_CONFIG if kind != "classifier" else None,
            "null_label": M.NULL_LABEL if kind != "classifier" else None,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "training": {**hp, "wall_seconds": round(wall, 1), "torch": torch.__version__, **info,
                         **({"note": note} if note else {})},
        }
        (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        return wall

    if kind == "classifier":
        model, info = train_classifier(hp, progress)
    else:
        model, info = train_diffusion(kind, hp, progress, name, checkpoint=save, save_every=save_every)
    wall = save(model, info)
    print(json.dumps({"name": name, "wall_seconds": round(wall, 1), **info}))
    return out / f"{name}.safetensors"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcut_kernels.zoo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--iters", type=int, default=None, help="length of the training schedule; trains it in full (default: the recipe, which may stop early)")
    p.add_argument("--out", default=None, help="output folder (default: the package's weights folder)")
    p.add_argument("--save-every", type=int, default=0, help="also write the EMA weights every N iterations")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after N iterations (the learning-rate schedule still spans --iters)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the recipe's)")
    p.add_argument("--note", default=None, help="free text on the circumstances of the run, kept in the record")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    train(a.name, a.iters, a.out, progress=not a.no_progress, save_every=a.save_every, threads=a.threads,
          stop_at=a.stop_at, note=a.note)


if __name__ == "__main__":
    main()
