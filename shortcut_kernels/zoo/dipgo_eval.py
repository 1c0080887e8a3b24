"""DiP-GO on the zoo models: the training bank a schedule search samples, and the held-out
evaluation of schedules against every hand-made one.

    sample = zoo_sampler("digits-unet", scheduler, n=30)      # training noise, seeds 10,000+
    result = local_search(start, sample)                      # shortcut_kernels.dipgo.search
    rows = evaluate("digits-unet", {"learned": result.schedule, **handmade("digits-unet", 50)})
    best = best_handmade(rows, macs=result.schedule.macs_kept)   # shortcut_kernels.dipgo.evaluate

Training draws its noise from seeds 10,000+ (``TRAIN_SEED``), evaluation from ``EVAL_SEED``,
so a schedule is never judged on the noise it was learned on. Every schedule samples the same
images (``per_class`` per digit) with the same scheduler and guidance; each row reports the
kept-MAC share, class accuracy, digits-FD and PSNR against the full model's samples from the
same noise (:mod:`.metrics`).
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

import torch
from torch import Tensor
from tqdm import tqdm

from ..dipgo import evaluate as _dipgo_evaluate
from ..dipgo import search as _dipgo_search
from ..runtime.cache import accelerate
from ..runtime.schedule import Schedule
from ..dipgo.search import SearchResult
from . import metrics
from .registry import load
from .sampling import make_scheduler, sample

__all__ = ["zoo_sampler", "handmade", "evaluate", "search", "TRAIN_SEED", "EVAL_SEED"]

TRAIN_SEED = 10_000  # training noise
EVAL_SEED = 1234     # held-out evaluation noise


def _model(name_or_model) -> torch.nn.Module:
    return load(name_or_model).model if isinstance(name_or_model, str) else name_or_model


def zoo_sampler(name_or_model, scheduler=None, *, n: int = 30, calls: int = 50, guidance: float = 3.0,
                seed: int = TRAIN_SEED) -> Callable[[Schedule | None], Tensor]:
    """``sample(schedule) -> images`` for a zoo model: ``n`` images (labels 0..9 in turn) from
    the noise of ``seed``, through ``accelerate(model, schedule)``; ``sample(None)`` is the
    full model, sampled once and then reused."""
    if isinstance(name_or_model, str):
        z = load(name_or_model)
        model, scheduler = z.model, scheduler or make_scheduler(z.scheduler_config)
    else:
        model = name_or_model
        if scheduler is None:
            raise ValueError("give the scheduler for a model passed as a module")
    labels = torch.arange(n) % 10
    full_samples: list[Tensor] = []  # the reference, sampled once: every caller asks for it first

    @torch.no_grad()
    def run(schedule: Schedule | None) -> Tensor:
        if schedule is None:
            if not full_samples:
                full_samples.append(sample(model, scheduler, labels, steps=calls, guidance=guidance, seed=seed,
                                           progress=False))
            return full_samples[0]
        with accelerate(model, schedule, scheduler=scheduler, auto_resize=False):
            return sample(model, scheduler, labels, steps=calls, guidance=guidance, seed=seed, progress=False)

    return run


def handmade(name_or_model, calls: int, **kwargs) -> dict[str, Schedule]:
    """:func:`shortcut_kernels.dipgo.evaluate.handmade` for a zoo model given by name or as a module."""
    return _dipgo_evaluate.handmade(_model(name_or_model), calls, **kwargs)


def search(name_or_model, scheduler, target: float, *, calls: int = 50, bank: int = 30, guidance: float = 3.0,
           radius: int = 2, trades: bool = True, time_budget: float | None = None, progress: bool = True
           ) -> SearchResult:
    """:func:`shortcut_kernels.dipgo.search.search` on a zoo model, scored on a training bank of
    ``bank`` samples (:func:`zoo_sampler`) by PSNR against the full model."""
    model = _model(name_or_model)
    bank_sampler = zoo_sampler(name_or_model, scheduler, n=bank, calls=calls, guidance=guidance)
    return _dipgo_search.search(model, bank_sampler, target, calls=calls, radius=radius, trades=trades,
                                time_budget=time_budget, progress=progress)


@torch.no_grad()
def evaluate(name: str, schedules: Mapping[str, Schedule], *, per_class: int = 20, seed: int = EVAL_SEED,
             guidance: float = 3.0, scheduler_cls=None, progress: bool = True) -> list[dict]:
    """Sample ``per_class`` images of each digit with every schedule (and the full model)
    from the same noise; one row per schedule: ``macs_kept``, ``class_accuracy``,
    ``digits_fd``, ``psnr_vs_full`` and ``psnr_image_mean`` (dB), ``seconds``."""
    z = load(name)
    model = z.model
    labels = torch.arange(10).repeat_interleave(per_class)
    calls = {s.calls for s in schedules.values()}
    if len(calls) != 1:
        raise ValueError(f"the schedules have different call counts {sorted(calls)}; resize them first")
    (steps,) = calls
    sched = make_scheduler(z.scheduler_config, scheduler_cls)

    def run():
        return sample(model, sched, labels, steps=steps, guidance=guidance, seed=seed, progress=False)

    ref = run()
    rows = []
    for key, s in tqdm(schedules.items(), desc=f"evaluating on {name}", disable=not progress):
        t0 = time.perf_counter()
        with accelerate(model, s, scheduler=sched, auto_resize=False):
            x = run()
        rows.append(dict(model=name, schedule=key, calls=steps, macs_kept=s.macs_kept,
                         ideal_speedup=s.ideal_speedup, class_accuracy=metrics.class_accuracy(x, labels),
                         digits_fd=metrics.digits_fd(x), psnr_vs_full=metrics.psnr(x, ref),
                         psnr_image_mean=float(metrics.psnr(x, ref, per_image=True).mean()),
                         seconds=time.perf_counter() - t0, n_samples=len(labels)))
    rows.append(dict(model=name, schedule="full", calls=steps, macs_kept=1.0, ideal_speedup=1.0,
                     class_accuracy=metrics.class_accuracy(ref, labels), digits_fd=metrics.digits_fd(ref),
                     psnr_vs_full=float("inf"), psnr_image_mean=float("inf"), seconds=float("nan"),
                     n_samples=len(labels)))
    return rows
