"""DiP-GO learning section (``dipgo-learn``): a schedule learned in this run on
``digits-unet`` (shortcut mode, a time budget) and one found by ``dipgo.search.local_search``
from the ``skip_steps`` schedule (a time budget, training noise only), then full vs. learned
vs. searched vs. ``deepcache`` vs. ``skip_steps`` at equal MACs (their kept-MAC fractions
within 2% of each other; the gap is measured and reported): interleaved wall-clock, ideal
speedup, class accuracy, FD and PSNR against full on held-out noise, and a sample grid per
schedule.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import torch

from .common import images_to_json
from .dipgo import Loop, efficiency_case

MODEL = "digits-unet"
EQUAL_MACS = 0.02  # largest relative gap between kept-MAC fractions called "equal"
# Training settings (TrainConfig fields; the target is the equal-MAC anchor, iters the quick
# run's): those of docs/dipgo_learning.md's measurement (SGD: with Adam every gate flips at
# once). budget="anneal" switches to the budgeted mode; its schedules are then read by rank.
TRAIN = dict(mode="shortcut", batch_size=8, bank_size=64, optimizer="sgd", lr=0.2, sparsity_weight=10.0)


# ----------------------------------------------------------------------------- equal MACs


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / min(a, b)


def matched_handmade(model, calls: int, target: float = 0.4):
    """The (deepcache, skip_steps) pair whose kept MACs agree best, near ``target``: pairs
    within half the equal-MAC tolerance first, then the one nearest the target. skip_steps
    keeps whole calls, so its MACs move in steps of 1/calls; the deepcache variants
    (interval x skip x placement) fill in between."""
    from shortcut_kernels.dipgo import skip_steps
    from shortcut_kernels.dipgo.evaluate import handmade

    caches = {k: s for k, s in handmade(model, calls).items() if k.startswith("deepcache")}
    skips = {f"skip_steps({c},power1.5)": skip_steps(model, calls, count=c, placement="power", exponent=1.5)
             for c in range(2, calls)}

    def score(pair):
        d, s = caches[pair[0]].macs_kept, skips[pair[1]].macs_kept
        return relative_gap(d, s) > EQUAL_MACS / 2, abs(d - target), "non-uniform" in pair[0]

    dk, sk = min(((d, s) for d in caches for s in skips), key=score)
    return (dk, caches[dk]), (sk, skips[sk])


def learned_at(pruner, macs: float, ranked: bool = False):
    """The pruner's schedule at ``macs``: DiP-GO's post-processing with a slack of a quarter of
    the equal-MAC tolerance, so a last reuse that would take a whole cascade is passed over for
    a smaller one (the ranked rule meets its budget to within one block)."""
    if ranked:
        return pruner.to_schedule(macs, ranked=True)
    return pruner.to_schedule(macs, slack=EQUAL_MACS / 4)


def equal_macs_check(schedules: dict) -> dict:
    macs = {k: s.macs_kept for k, s in schedules.items()}
    gap = max(macs.values()) / min(macs.values()) - 1
    return {"macs_kept": macs, "max_relative_gap": gap, "tolerance": EQUAL_MACS, "holds": gap <= EQUAL_MACS}


# ----------------------------------------------------------------------------- the section


def run(out_dir=None, full: bool = False) -> dict:
    from shortcut_kernels import zoo
    from shortcut_kernels.dipgo import accelerate
    from shortcut_kernels.dipgo.search import local_search
    from shortcut_kernels.zoo.dipgo_eval import EVAL_SEED, evaluate, zoo_sampler
    from shortcut_kernels.dipgo.train import train

    torch.set_num_threads(1)  # the toy model runs fastest on one thread on a shared 2-core box
    calls = 50 if full else 20
    budget = 1800.0 if full else 120.0  # training seconds
    z = zoo.load(MODEL)
    model, cfg = z.model, z.scheduler_config
    (dk, dc), (sk, ss) = matched_handmade(model, calls)
    anchor = dc.macs_kept
    print(f"equal-MAC anchor: {dk} keeps {100 * anchor:.1f}%, {sk} {100 * ss.macs_kept:.1f}%", flush=True)

    scheduler = zoo.make_scheduler(cfg)
    scheduler.set_timesteps(calls)
    settings = dict(TRAIN, target=anchor, iters=150 if full else 100)
    t0 = time.perf_counter()
    result = train(model, scheduler, time_budget=budget, progress=True, **settings)
    train_wall = time.perf_counter() - t0
    learned = learned_at(result.pruner, anchor, ranked=settings.get("budget") == "anneal")
    lk = "learned(shortcut)"
    search_budget = 600.0 if full else 60.0
    found = local_search(ss, zoo_sampler(model, scheduler, n=20, calls=calls), time_budget=search_budget)
    fk = "searched"
    schedules = {lk: learned, fk: found.schedule, dk: dc, sk: ss}
    check = equal_macs_check(schedules)
    print(f"equal MACs: largest gap {100 * check['max_relative_gap']:.2f}% "
          f"({'within' if check['holds'] else 'OUTSIDE'} {100 * EQUAL_MACS:.0f}%)", flush=True)

    quality = evaluate(MODEL, schedules, per_class=20 if full else 10)
    loop = Loop("zoo-unet", model.unet, calls, batch=20, latent_hw=16)
    timing = efficiency_case(loop, schedules, 5 if full else 3)

    grid_sched = zoo.make_scheduler(cfg)
    samples = {"labels": list(range(10))}
    for key, s in [("full", None)] + list(schedules.items()):
        if s is None:
            x = zoo.sample(model, grid_sched, labels=range(10), steps=calls, seed=EVAL_SEED, progress=False)
        else:
            with accelerate(model, s, scheduler=grid_sched):
                x = zoo.sample(model, grid_sched, labels=range(10), steps=calls, seed=EVAL_SEED, progress=False)
        samples[key] = images_to_json(x)

    history = [{k: h[k] for k in ("iteration", "consistency", "sparsity", "kept_macs", "seconds")}
               for h in result.history]
    return {"model": MODEL, "calls": calls, "learned": lk, "searched": fk, "deepcache": dk, "skip_steps": sk,
            "search": {"start": sk, "time_budget_s": search_budget, "seconds": found.seconds,
                       "evaluations": found.evaluations, "moves": len(found.history), "bank_samples": 20,
                       "bank_psnr_start": found.start_psnr, "bank_psnr": found.psnr},
            "train": {"settings": settings, "config": asdict(result.config), "time_budget_s": budget,
                      "iterations": len(history), "train_seconds": result.seconds, "wall_s": train_wall,
                      "history": history},
            "equal_macs": check, "schedules": {k: s.to_dict() for k, s in schedules.items()},
            "quality": quality, "timing": timing, "samples": samples}
