"""DiP-GO learning section (``dipgo-learn``): on ``digits-unet``, the schedule learned in this run
by ``dipgo.learn`` (the estimate-guided learner) against the best hand-made schedule of any
builder, ``dipgo.search.local_search`` for the same learning wall-clock from the same start, and
the paper's straight-through training (``dipgo.train(method="ste")``, shortcut mode, fixed where
the defects were ours) for the same wall-clock, at equal MACs (within 2%). Quick run: 40% of the
MACs, 50 samples held out; FULL: 40% and 20%, 200 held out; both at 50 DDIM calls, guidance 3.

Per target: held-out noise (``zoo.dipgo_eval.evaluate``: mean per-image PSNR and set PSNR against
the full model, class accuracy, digits-FD) for every schedule and every hand-made schedule within
2% of the learned MACs; the learning curves (bank PSNR against seconds); and the cost of a
learning iteration in denoiser-call equivalents, counted by hooks on the model's blocks
(:class:`MacCounter`), for ``learn``, ``search`` and STE in both modes. The first target also
gets interleaved wall-clock and a sample grid per schedule. FULL also measures the estimate's
quality (:func:`estimate_quality`: Spearman of each estimator against every measured whole-call
flip on a bank of 16).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .common import images_to_json
from .dipgo import Loop, efficiency_case

MODEL = "digits-unet"
EQUAL_MACS = 0.02  # largest relative gap between kept-MAC fractions called "equal"
# The paper's recipe (SGD lr 0.2) with the sparsity weight of docs/dipgo_learning.md's first round;
# the fixes (cascaded two-sided sparsity, neutral ties, selection at the trained budget) are train's.
# The learner: moves stay within half the equal-MAC window below the target; the best of two
# validated proposals is taken, and up to 128 are validated at one schedule while time remains.
# One start: the search runs from it for the same seconds (an equal-time race from one start).
LEARN = dict(window=EQUAL_MACS / 2, validate=2, max_validations=128, starts=1)
STE = dict(method="ste", mode="shortcut", batch_size=8, optimizer="sgd", lr=0.2, sparsity_weight=10.0,
           warmup=5)


@dataclass
class Settings:
    """The quick run's settings (``settings(full=False)``) or FULL's."""

    calls: int = 50
    targets: tuple = (0.4,)
    seconds: float = 45.0       # learning wall-clock of each of learn, search and STE
    bank: int = 8               # training noises every method learns on (seeds 10,000+)
    estimate_size: int = 2      # of them, those the learner's estimate runs on
    per_class: int = 5          # held-out samples per digit
    handmade_top: int | None = 3  # hand-made schedules within 2% held out: those best on the bank (None: all)
    timing_reps: int = 2
    timing_batch: int = 4       # samples per wall-clock run (twice that per guided call)
    grid: bool = True           # sample grids and wall-clock of the first target
    # training noises of the estimate-quality row (every single whole-call flip measured; None: no row)
    estimate_bank: int | None = None
    extra: dict = field(default_factory=dict)  # more learn overrides (tests)


def settings(full: bool) -> Settings:
    if not full:
        return Settings()
    return Settings(targets=(0.4, 0.2), seconds=360.0, estimate_size=4, per_class=20, handmade_top=None,
                    timing_reps=5, timing_batch=20, estimate_bank=16)


# ----------------------------------------------------------------------------- counting


class MacCounter:
    """MACs the model computes while active, in denoiser-call equivalents: one equivalent is the
    full model on one sample once (a guided call on one sample is 2). A block of the model's
    fine graph adds its MACs per sample when it computed: when one of its submodules ran during
    its call (the runtime still calls a block it reads from the cache, but runs none of its
    layers; a SuperNet computes every block). A hook on the denoiser adds the overhead outside
    the blocks (forward only). A computed block's output that takes part in a backward pass adds
    twice the block's forward MACs when its gradient arrives (the usual 2x of a backward). A
    checkpointed call's recomputation is a forward and counts as one."""

    def __init__(self, model):
        from shortcut_kernels.dipgo.supernet import _flatten
        from shortcut_kernels.models import denoiser
        from shortcut_kernels.runtime.schedule import graph_of

        g = graph_of(model, "fine")
        backbone = denoiser(model)
        self.unit = float(g.total_macs)
        self.forward = self.backward = 0.0
        self._on = False
        self._hooks = []
        ran = [False] * len(g)

        def mark(b):
            def hook(module, args):
                ran[b] = True
            return hook

        def done(b, macs):
            def hook(module, args, out):
                computed, ran[b] = ran[b], False
                leaves = _flatten(out)[0]
                if not self._on or not computed or not leaves:
                    return
                n = leaves[0].shape[0]
                self.forward += macs * n
                if torch.is_grad_enabled() and leaves[0].requires_grad:
                    def back(grad, m=macs * n):
                        self.backward += 2 * m
                    leaves[0].register_hook(back)
            return hook

        for b in g.blocks:
            mods = [backbone.get_submodule(p) for p in b.module_paths]
            for mod in mods:
                for sub in mod.modules():
                    if sub is not mod and not list(sub.children()):  # the layers: they run only if it computes
                        self._hooks.append(sub.register_forward_pre_hook(mark(b.index)))
            self._hooks.append(mods[-1].register_forward_hook(done(b.index, b.macs)))

        def top(m, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            if self._on:
                self.forward += g.overhead_macs * x.shape[0]

        self._hooks.append(backbone.register_forward_hook(top, with_kwargs=True))

    def __enter__(self):
        self._on = True
        return self

    def __exit__(self, *exc):
        self._on = False

    @property
    def total(self) -> float:
        """Forward plus backward, in denoiser-call equivalents."""
        return (self.forward + self.backward) / self.unit

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# ----------------------------------------------------------------------------- equal MACs


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / min(a, b)


def equal_macs_check(schedules: dict) -> dict:
    macs = {k: s.macs_kept for k, s in schedules.items()}
    gap = max(macs.values()) / min(macs.values()) - 1
    return {"macs_kept": macs, "max_relative_gap": gap, "tolerance": EQUAL_MACS, "holds": gap <= EQUAL_MACS}


def anchored(model, calls: int, share: float) -> float:
    """The budget for "``share`` of the MACs": what the early-dense hand-made schedule with
    ``round(share * calls)`` computed calls keeps (skip_steps(20 of 50) keeps 40.1%: the
    overhead outside the blocks runs at every call), so that schedule is a candidate start."""
    from shortcut_kernels.dipgo import skip_steps

    count = max(2, round(share * calls))
    return skip_steps(model, calls, count=count, placement="power", exponent=1.5).macs_kept + 1e-9


def best_by(rows: list[dict], keys, metric: str) -> str | None:
    """The schedule of ``keys`` with the highest ``metric`` on the held-out rows."""
    q = {r["schedule"]: r for r in rows}
    keys = [k for k in keys if k in q]
    return max(keys, key=lambda k: q[k][metric]) if keys else None


# ----------------------------------------------------------------------------- the estimate's quality


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected: measured float effects)."""
    def ranks(v):
        r = torch.empty(len(v))
        r[torch.tensor(v).argsort()] = torch.arange(len(v), dtype=r.dtype)
        return r - r.mean()
    if len(a) < 3:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def ste_predictions(chain, bank, schedule, units) -> list[float]:
    """The straight-through gradient's prediction of each unit's loss change: the gradient of
    the consistency loss in the hard gates (a SuperNet run with a graph through every call, the
    exact mode) times the change of the call's gates, summed over its blocks."""
    from shortcut_kernels.dipgo.losses import consistency_loss

    gates = schedule.keep.to(bank.noise.dtype).requires_grad_()
    with torch.enable_grad():
        x0 = chain.run(bank.noise, bank.labels, gates, grad="exact")
        (grad,) = torch.autograd.grad(consistency_loss(x0, bank.targets, "mse").mean(), gates)
    return [float((grad[u.call] * (torch.tensor(u.row, dtype=grad.dtype) - gates[u.call].detach())).sum())
            for u in units]


ESTIMATORS = ("shortcut", "adjoint", "ste")


def estimate_quality(model, scheduler, bank_size: int, count: int = 20, seed: int | None = None) -> dict:
    """On a fixed bank of ``bank_size`` training noises (seeds from ``seed``, default the
    learner's training seed), every single whole-call flip of
    ``skip_steps(count, power 1.5)`` (the best hand-made schedule at 40%): its measured change
    of the consistency loss (the chain rerun with the flip) against what each estimator predicts
    (the learner's forward-difference estimate with the shortcut's ``gamma_s * dL/dx_0`` or the
    chain adjoint ``dL/d out_s``; the straight-through gate gradient); Spearman and sign
    agreement within drops and within adds."""
    from shortcut_kernels.dipgo import skip_steps
    from shortcut_kernels.dipgo.learn import _null_label, bank_loss, estimate, make_bank
    from shortcut_kernels.dipgo.supernet import SuperNet
    from shortcut_kernels.dipgo.gated_chain import _Chain
    from shortcut_kernels.runtime.schedule import Schedule

    calls = len(scheduler.timesteps)
    start = skip_steps(model, calls, count=count, placement="power", exponent=1.5)
    bank = make_bank(model, scheduler, bank_size, **({} if seed is None else {"seed": seed}))
    net = SuperNet(model, graph=start.graph)
    try:
        chain = _Chain(net, scheduler, 3.0, _null_label(model))
        predicted, seconds = {}, {}
        for name in ESTIMATORS:
            t0 = time.perf_counter()
            if name == "ste":
                predicted[name] = ste_predictions(chain, bank, start, est.units)
            else:
                est = estimate(chain, bank, start, sensitivity=name)
                predicted[name] = est.predicted.tolist()
            seconds[name] = time.perf_counter() - t0
        flips = []
        for i, u in enumerate(est.units):
            keep = start.keep.clone()
            keep[u.call] = torch.tensor(u.row)
            flips.append(dict(call=u.call, kind=u.kind, measured=bank_loss(chain, bank, Schedule(keep, start.graph))
                              - est.loss, **{k: v[i] for k, v in predicted.items()}))
    finally:
        net.remove()
    rank, sign = {}, {}
    for name in ESTIMATORS:
        for kind in ("drop", "add"):
            sel = [f for f in flips if f["kind"] == kind]
            rank.setdefault(name, {})[kind + "s"] = spearman([f[name] for f in sel], [f["measured"] for f in sel])
            sign.setdefault(name, {})[kind + "s"] = sum((f[name] < 0) == (f["measured"] < 0) for f in sel) / len(sel)
    return dict(start=f"skip_steps({count}, power 1.5)", start_macs=start.macs_kept, bank=bank_size, seed=seed, calls=calls,
                loss=est.loss, seconds=seconds, spearman=rank, sign_agreement=sign, flips=flips)


# ----------------------------------------------------------------------------- the methods


def _ste_run(model, scheduler, target: float, s: Settings, mode: str, *, time_budget=None, iters: int):
    """STE training counted per iteration: (result, equivalents of each iteration)."""
    from shortcut_kernels.dipgo.train import train

    counter = MacCounter(model)
    marks = [2.0 * s.bank * s.calls]  # before the first iteration: the bank's full samples (guided calls)

    def mark(rec) -> bool:
        marks.append(counter.total)
        return False

    try:
        with counter:
            result = train(model, scheduler, target=target, iters=iters, time_budget=time_budget, progress=False,
                           callback=mark, **{**STE, "mode": mode, "bank_size": s.bank,
                                             "batch_size": min(STE["batch_size"], s.bank)})
        if len(marks) <= len(result.history):  # the time budget stops before the callback
            marks.append(counter.total)
    finally:
        counter.remove()
    return result, [b - a for a, b in zip(marks, marks[1:])]


def run_target(model, scheduler, target: float, s: Settings) -> tuple[dict, dict]:
    """Learn (within the equal-MAC window below ``target``), search (from the learner's start,
    whose MACs it keeps) and STE (at the learned MACs) for ``s.seconds`` each, then the held-out rows:
    (the target's record, the schedules compared at equal MACs)."""
    from shortcut_kernels.dipgo.learn import bank_sampler, learn, make_bank
    from shortcut_kernels.dipgo.search import local_search, psnr, with_trades
    from shortcut_kernels.zoo.dipgo_eval import evaluate, handmade

    bank = make_bank(model, scheduler, s.bank)
    counter = MacCounter(model)
    try:
        with counter:  # moves stay within the equal-MAC window below the target
            res = learn(model, scheduler, target, bank=bank, time_budget=s.seconds, progress=False,
                        estimate_size=s.estimate_size, **{**LEARN, **s.extra})
    finally:
        counter.remove()
    learned, start = res.schedule, res.start
    learn_cost = dict(total=counter.total, estimates=res.estimates, evaluations=res.evaluations,
                      per_iteration=counter.total / max(1, res.estimates))
    print(f"learn: {len(res.history) - 1} moves, bank PSNR {res.start_psnr:.2f} -> {res.psnr:.2f} dB", flush=True)

    # the search, from the same start on the same bank for the same seconds
    sampler = bank_sampler(model, scheduler, bank)
    s_start, patterns = with_trades(model, start)
    counter = MacCounter(model)
    try:
        with counter:
            found = local_search(s_start, sampler, time_budget=s.seconds, patterns=patterns, progress=False)
    finally:
        counter.remove()
    search_cost = dict(total=counter.total, evaluations=found.evaluations,
                       per_iteration=counter.total / max(1, found.evaluations))
    print(f"search: {found.evaluations} schedules, bank PSNR {found.start_psnr:.2f} -> {found.psnr:.2f} dB", flush=True)

    # STE: one exact iteration for its cost (every block computes whatever the gates), then
    # shortcut for the same seconds at the learned MACs; the cosine decay is planned over twice
    # the iterations its first one (keeping every block, the dearest) allows, so the time ends it
    ste_target = learned.macs_kept
    _, exact = _ste_run(model, scheduler, ste_target, s, "exact", iters=1)
    probe, first = _ste_run(model, scheduler, ste_target, s, "shortcut", iters=1)
    ste, per_it = _ste_run(model, scheduler, ste_target, s, "shortcut", time_budget=s.seconds,
                           iters=max(20, int(2 * s.seconds / max(probe.history[0]["seconds"], 1e-3))))
    cost = {"learn": learn_cost, "search": search_cost, "ste-exact": dict(per_iteration=exact[0]),
            "ste-shortcut": dict(per_iteration=sum(per_it) / len(per_it), first_iteration=first[0],
                                 total=sum(per_it), iterations=len(per_it))}
    print(f"ste: {len(ste.history)} iterations, schedule at {100 * ste.schedule.macs_kept:.1f}%", flush=True)

    lk, fk, sk = "learned", "searched", "ste(shortcut)"
    m = learned.macs_kept
    every = handmade(model, s.calls)
    start_key = next((k for k, h in every.items() if h == start), start.name)
    hand = {k: h for k, h in every.items() if abs(h.macs_kept - m) <= EQUAL_MACS * m}
    bank_psnr = {k: psnr(sampler(h), bank.targets) for k, h in hand.items()}
    if s.handmade_top is not None:  # the quick run holds out those that score best on the bank
        hand = {k: hand[k] for k in sorted(hand, key=bank_psnr.get, reverse=True)[:s.handmade_top]}
    schedules = {lk: learned, fk: found.schedule, sk: ste.schedule, **hand}
    quality = evaluate(MODEL, schedules, per_class=s.per_class, progress=False)
    by_set = best_by(quality, list(hand), "psnr_vs_full")
    by_mean = best_by(quality, list(hand), "psnr_image_mean")
    compared = {k: schedules[k] for k in dict.fromkeys([lk, fk, sk, by_set, by_mean]) if k}
    return {"target": target, "calls": s.calls, "learned": lk, "searched": fk, "ste": sk,
            "handmade_best": by_set, "handmade_best_mean": by_mean,
            "deepcache": best_by(quality, [k for k in hand if k.startswith("deepcache")], "psnr_vs_full"),
            "skip_steps": best_by(quality, [k for k in hand if k.startswith("skip_steps")], "psnr_vs_full"),
            "handmade_within": sorted(hand), "handmade_bank_psnr": bank_psnr, "start": start_key,
            "learn": {"seconds": res.seconds, "time_budget_s": s.seconds, "start_psnr": res.start_psnr,
                      "bank_psnr": res.psnr, "moves": len(res.history) - 1, "evaluations": res.evaluations,
                      "bank_samples": s.bank, "estimate_samples": s.estimate_size, "history": res.history},
            "search": {"start": start_key, "time_budget_s": s.seconds, "seconds": found.seconds,
                       "evaluations": found.evaluations, "moves": len(found.history), "bank_samples": s.bank,
                       "bank_psnr_start": found.start_psnr, "bank_psnr": found.psnr, "history": found.history},
            "train": {"settings": {**STE, "target": ste_target, "iters": ste.config.iters, "bank_size": s.bank},
                      "config": asdict(ste.config), "time_budget_s": s.seconds, "iterations": len(ste.history),
                      "train_seconds": ste.seconds, "wall_s": ste.seconds,
                      "history": [{k: h[k] for k in ("iteration", "consistency", "sparsity", "kept_macs", "seconds")}
                                  for h in ste.history]},
            "cost": cost, "equal_macs": equal_macs_check(compared),
            "schedules": {k: v.to_dict() for k, v in compared.items()}, "quality": quality}, compared


def run(out_dir=None, full: bool = False, s: Settings | None = None) -> dict:
    from shortcut_kernels import zoo
    from shortcut_kernels.dipgo import accelerate
    from shortcut_kernels.zoo.dipgo_eval import EVAL_SEED

    torch.set_num_threads(1)  # the toy model runs fastest on one thread on a shared 2-core box
    s = s or settings(full)
    z = zoo.load(MODEL)
    model, cfg = z.model, z.scheduler_config
    scheduler = zoo.make_scheduler(cfg)
    scheduler.set_timesteps(s.calls)
    runs = [run_target(model, scheduler, anchored(model, s.calls, t), s) for t in s.targets]
    doc = {"model": MODEL, "settings": asdict(s), **runs[0][0], "more_targets": [r for r, _ in runs[1:]]}
    if s.estimate_bank:
        doc["estimate_quality"] = estimate_quality(model, scheduler, s.estimate_bank)
    if s.grid:
        first = runs[0][1]
        loop = Loop("zoo-unet", model.unet, s.calls, batch=s.timing_batch, latent_hw=16)
        doc["timing"] = efficiency_case(loop, first, s.timing_reps)
        grid_sched = zoo.make_scheduler(cfg)
        samples = {"labels": list(range(10))}
        for key, sch in [("full", None)] + list(first.items()):
            if sch is None:
                x = zoo.sample(model, grid_sched, labels=range(10), steps=s.calls, seed=EVAL_SEED, progress=False)
            else:
                with accelerate(model, sch, scheduler=grid_sched):
                    x = zoo.sample(model, grid_sched, labels=range(10), steps=s.calls, seed=EVAL_SEED,
                                   progress=False)
            samples[key] = images_to_json(x)
        doc["samples"] = samples
    else:
        doc["timing"] = []
    return doc
