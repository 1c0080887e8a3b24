"""How good is a schedule? Quality on the zoo models, against every hand-made schedule.

    rows = evaluate("digits-unet", {"learned": s, **handmade("digits-unet", 50)})
    best = best_handmade(rows, macs=s.macs_kept)

Every schedule samples the same images (``per_class`` per digit, from evaluation seeds that
training never sees: training draws its noise from seeds 10,000+) with the same scheduler
and guidance; each row reports the kept-MAC share, class accuracy, digits-FD and PSNR
against the full model's samples from the same noise (``shortcut_kernels.zoo.metrics``).
"""
from __future__ import annotations

import time
from typing import Mapping

import torch
from tqdm import tqdm

from .. import zoo
from ..models.deepcache import num_skips
from .runtime import accelerate
from .schedule import Schedule, deepcache, fora, graph_of, skip_steps

__all__ = ["handmade", "evaluate", "best_handmade", "EVAL_SEED"]

EVAL_SEED = 1234


def handmade(name_or_model, calls: int, *, intervals=range(2, 11), counts=None) -> dict[str, Schedule]:
    """Every hand-made schedule of the peers for a zoo model: UNets - ``deepcache`` with each
    interval and skip branch (uniform and non-uniform placement) and ``skip_steps``;
    transformers - ``fora`` with each interval and ``skip_steps``. ``skip_steps`` runs
    ``count`` calls (default: 4..calls/2) placed uniformly and early-dense (power 1.5)."""
    model = zoo.load(name_or_model).model if isinstance(name_or_model, str) else name_or_model
    out: dict[str, Schedule] = {}
    counts = counts or range(4, calls // 2 + 1, 2)
    g = graph_of(model, "fine")
    if g.blocks[0].deepcache is not None:
        for n in intervals:
            for skip in range(num_skips(g)):
                for uniform in (True, False):
                    key = f"deepcache({n},skip={skip}{'' if uniform else ',non-uniform'})"
                    out[key] = deepcache(model, calls, n, None, skip=skip, uniform=uniform)
    else:
        for n in intervals:
            out[f"fora({n})"] = fora(model, calls, n)
    for c in counts:
        out[f"skip_steps({c},uniform)"] = skip_steps(model, calls, count=c)
        out[f"skip_steps({c},power1.5)"] = skip_steps(model, calls, count=c, placement="power", exponent=1.5)
    return out


@torch.no_grad()
def evaluate(name: str, schedules: Mapping[str, Schedule], *, per_class: int = 20, seed: int = EVAL_SEED,
             guidance: float = 3.0, scheduler_cls=None, progress: bool = True) -> list[dict]:
    """Sample ``per_class`` images of each digit with every schedule (and the full model)
    from the same noise; one row per schedule: ``macs_kept``, ``class_accuracy``,
    ``digits_fd``, ``psnr_vs_full`` and ``psnr_image_mean`` (dB), ``seconds``."""
    z = zoo.load(name)
    model = z.model
    labels = torch.arange(10).repeat_interleave(per_class)
    calls = {s.calls for s in schedules.values()}
    if len(calls) != 1:
        raise ValueError(f"the schedules have different call counts {sorted(calls)}; resize them first")
    (steps,) = calls
    sched = zoo.make_scheduler(z.scheduler_config, scheduler_cls)

    def sample():
        return zoo.sample(model, sched, labels, steps=steps, guidance=guidance, seed=seed, progress=False)

    ref = sample()
    rows = []
    for key, s in tqdm(schedules.items(), desc=f"evaluating on {name}", disable=not progress):
        t0 = time.perf_counter()
        with accelerate(model, s, scheduler=sched, auto_resize=False):
            x = sample()
        rows.append(dict(model=name, schedule=key, calls=steps, macs_kept=s.macs_kept,
                         ideal_speedup=s.ideal_speedup, class_accuracy=zoo.metrics.class_accuracy(x, labels),
                         digits_fd=zoo.metrics.digits_fd(x), psnr_vs_full=zoo.metrics.psnr(x, ref),
                         psnr_image_mean=float(zoo.metrics.psnr(x, ref, per_image=True).mean()),
                         seconds=time.perf_counter() - t0, n_samples=len(labels)))
    rows.append(dict(model=name, schedule="full", calls=steps, macs_kept=1.0, ideal_speedup=1.0,
                     class_accuracy=zoo.metrics.class_accuracy(ref, labels), digits_fd=zoo.metrics.digits_fd(ref),
                     psnr_vs_full=float("inf"), psnr_image_mean=float("inf"), seconds=float("nan"),
                     n_samples=len(labels)))
    return rows


def best_handmade(rows: list[dict], macs: float, tolerance: float = 0.02, exclude=("full",)) -> dict | None:
    """The hand-made row with the best PSNR among those keeping at least ``macs`` (less
    ``tolerance``, relative) of the MACs: the bar a learned schedule must clear."""
    ok = [r for r in rows if r["schedule"] not in exclude and r["macs_kept"] >= macs * (1 - tolerance)
          and not r["schedule"].startswith("learned")]
    return max(ok, key=lambda r: r["psnr_vs_full"], default=None)
