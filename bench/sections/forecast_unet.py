"""Forecast reuse on a UNet (``forecast-unet``): on ``digits-unet``, the best hand-made and the
learned schedule at 40% and 60% of the MACs, each repeating its caches (forecast order 0) and
extrapolating them (orders 1 and 2), beside the DeepCache package's own rows (issue 28, must
hold 2). cache-dit does not run UNets; the DeepCache package is the peer there.

Protocol: 50 DDIM calls, guidance 3 batched into one call, ``per_class`` samples of each digit
(quick 5, FULL 20) from the held-out noise of ``zoo.dipgo_eval.EVAL_SEED``; set PSNR (one MSE
over all images) and the mean per-image PSNR against the full model's samples from the same
noise, and class accuracy. The budgets are those of the ``dipgo-learn`` section
(``dipgo_learn.anchored``: what ``skip_steps`` with 20 / 30 of 50 computed calls keeps, since
the overhead outside the blocks runs at every call).

Per budget:
  * hand-made: every ``zoo.dipgo_eval.handmade`` schedule (``deepcache`` at every interval and
    skip branch, uniform and non-uniform; ``skip_steps`` at every even count of computed calls,
    uniform and early-dense) within the budget that keeps at least
    ``top`` of the most MACs any of them keeps there (as ``dipgo.learn`` picks its start),
    scored on a training bank (noise seeds 10,000+, never the held-out noise); the best at
    order 0 is "the best hand-made schedule";
  * learned: ``dipgo.learn`` from that schedule on the same bank for ``seconds``, with the
    ``dipgo-learn`` section's settings. The learner moves keep rows and returns an order-0
    schedule; its forecast rows are ``.with_forecast(order)`` of the result;
  * the DeepCache package (``DeepCacheSDHelper``, through ``dipgo._deepcache_package``) at the
    setting (interval, branch) whose MAC share is nearest the budget (FULL: the nearest at or
    below and the nearest above), sampled through the package itself. Its MAC share is that of
    our equal ``deepcache(model, calls, interval, branch)`` schedule, which runs beside it
    (order 0 gives the package's images up to rounding: the row records the largest
    difference; FULL also runs it at orders 1 and 2).

Every schedule is also scored at orders 1 and 2 on the bank, so a forecast order can be chosen
without the held-out noise. Each group (one keep pattern) records its held-out set PSNR per
order, the gain of its best forecast order over order 0, the gain at the order the bank picks,
and ``improves`` (the best forecast order beats order 0); ``forecast_improves`` holds for the
hand-made and the learned group at every budget (the must-hold).
"""
from __future__ import annotations

import math
import time
import types
from dataclasses import asdict, dataclass, field

import torch

from .dipgo import _deepcache_package
from .dipgo_learn import LEARN, anchored

MODEL = "digits-unet"
CALLS = 50
GUIDANCE = 3.0
TARGETS = (0.4, 0.6)
ORDERS = (0, 1, 2)


@dataclass
class Settings:
    """The quick run's settings (``settings(full=False)``) or FULL's."""

    calls: int = CALLS
    targets: tuple = TARGETS
    per_class: int = 5          # held-out samples per digit
    seconds: float = 40.0       # learning wall-clock per budget
    bank: int = 8               # training noises (seeds 10,000+) the hand-made pick and the learner use
    estimate_size: int = 2      # of them, those the learner's estimate runs on
    top: float = 0.9            # hand-made candidates keep at least this share of the most MACs within the budget
    package_rows: int = 1       # package settings per budget: 1 the nearest, 2 the nearest at/below and above
    package_orders: tuple = (0,)  # orders our equal deepcache runs at beside the package (0: the parity check)
    guidance: float = GUIDANCE
    seed: int | None = None     # held-out noise (None: zoo.dipgo_eval.EVAL_SEED)
    extra: dict = field(default_factory=dict)  # more learn overrides (tests)


def settings(full: bool) -> Settings:
    if not full:
        return Settings()
    return Settings(per_class=20, seconds=300.0, estimate_size=4, package_rows=2, package_orders=ORDERS)


# ----------------------------------------------------------------------------- held-out rows


class HeldOut:
    """Samples the held-out set with the full model, with our schedules and with the DeepCache
    package, and turns each run into a row against the full model's samples."""

    def __init__(self, model, scheduler_config: dict, s: Settings):
        from shortcut_kernels.zoo.dipgo_eval import EVAL_SEED

        self.model, self.scheduler_config, self.s = model, scheduler_config, s
        self.seed = EVAL_SEED if s.seed is None else s.seed
        self.labels = torch.arange(10).repeat_interleave(s.per_class)
        self.ref = None
        self.images: dict[str, torch.Tensor] = {}  # every row's samples, by key (the package's parity check)
        self._done: list[tuple] = []  # (schedule, row) sampled so far: an equal schedule is not sampled twice

    def scheduler(self):
        from shortcut_kernels import zoo

        return zoo.make_scheduler(self.scheduler_config)

    def _sample(self, scheduler) -> tuple[torch.Tensor, float]:
        from shortcut_kernels import zoo

        t0 = time.perf_counter()
        x = zoo.sample(self.model, scheduler, self.labels, steps=self.s.calls, guidance=self.s.guidance,
                       seed=self.seed, progress=False)
        return x, time.perf_counter() - t0

    def _row(self, key: str, x: torch.Tensor, seconds: float, **extra) -> dict:
        from shortcut_kernels.zoo import metrics

        if self.ref is None:
            raise RuntimeError("sample the full model first (HeldOut.full())")
        self.images[key] = x
        return dict(key=key, psnr=metrics.psnr(x, self.ref),
                    psnr_image_mean=float(metrics.psnr(x, self.ref, per_image=True).mean()),
                    class_accuracy=metrics.class_accuracy(x, self.labels), seconds=seconds, **extra)

    @torch.no_grad()
    def full(self) -> dict:
        from shortcut_kernels.zoo import metrics

        x, dt = self._sample(self.scheduler())
        self.ref = x
        self.images["full"] = x
        return dict(key="full", kind="full", group=None, order=None, macs_kept=1.0, psnr=math.inf,
                    psnr_image_mean=math.inf, class_accuracy=metrics.class_accuracy(x, self.labels), seconds=dt)

    @torch.no_grad()
    def ours(self, key: str, schedule, **extra) -> dict:
        from shortcut_kernels.runtime import accelerate

        info = dict(macs_kept=schedule.macs_kept, builder=schedule.name,
                    params={k: v for k, v in schedule.params.items() if k != "forecast"}, **extra)
        for done, row in self._done:  # e.g. a learner that kept its start: the same samples
            if done == schedule:
                self.images[key] = self.images[row["key"]]
                return {**row, "key": key, **info, "same_as": row["key"]}
        sched = self.scheduler()
        with accelerate(self.model, schedule, scheduler=sched, auto_resize=False):
            x, dt = self._sample(sched)
        row = self._row(key, x, dt, **info)
        self._done.append((schedule, row))
        return row

    @torch.no_grad()
    def package(self, key: str, interval: int, branch: int, equal, **extra) -> dict:
        """The DeepCache package at (``interval``, ``branch``) on the zoo UNet; ``equal`` is our
        ``deepcache`` schedule of the same setting, whose MAC share the row reports. The
        package finds the step from a 0-d timestep (``scheduler.timesteps.index(t.item())``);
        the zoo model passes one timestep per sample, all equal, so the first is handed on."""
        unet = self.model.unet
        sched = self.scheduler()
        sched.set_timesteps(self.s.calls)
        undo = _deepcache_package(types.SimpleNamespace(model=unet, scheduler=sched), interval, branch)
        package_forward = unet.forward

        def one_timestep(x, t, *args, **kwargs):
            if t.ndim:
                if not bool((t == t.flatten()[0]).all()):
                    raise RuntimeError("the DeepCache package needs one timestep per call")
                t = t.flatten()[0]
            return package_forward(x, t, *args, **kwargs)

        unet.forward = one_timestep
        try:
            x, dt = self._sample(sched)
        finally:
            undo()  # also drops one_timestep: it removes every instance-level forward
        return self._row(key, x, dt, macs_kept=equal.macs_kept, builder="DeepCache package",
                         params=dict(cache_interval=interval, cache_branch_id=branch), **extra)


# ----------------------------------------------------------------------------- the schedules


def forecast_key(key: str, order: int) -> str:
    return key if order == 0 else f"{key} forecast{order}"


def handmade_candidates(model, calls: int, target: float, top: float) -> dict:
    """The hand-made schedules within ``target`` that keep at least ``top`` of the most MACs
    any of them keeps within it. ``skip_steps`` runs every even count up to ``calls`` (the
    default stops at half the calls, below a 60% budget)."""
    from shortcut_kernels.zoo.dipgo_eval import handmade

    every = handmade(model, calls, counts=range(4, calls + 1, 2))
    within = {k: s for k, s in every.items() if s.macs_kept <= target + 1e-9}
    if not within:
        raise ValueError(f"no hand-made schedule keeps <= {target:.1%} of the MACs at {calls} calls")
    most = max(s.macs_kept for s in within.values())
    return {k: s for k, s in within.items() if s.macs_kept >= top * most}


def package_settings(model, calls: int, target: float, rows: int = 1) -> list[tuple[int, int]]:
    """The DeepCache package settings (interval 2..calls, branch 0..num_branches - 1) whose
    MAC share (our equal ``deepcache`` schedule's) is nearest ``target``: ``rows`` 1 the
    nearest (ties: the one at or below), 2 the nearest at or below and the nearest above.
    Settings with the same keep rows count once (the lowest branch, the smallest interval)."""
    from shortcut_kernels.dipgo import deepcache
    from shortcut_kernels.models.deepcache import num_branches
    from shortcut_kernels.runtime.schedule import graph_of

    seen, options = [], []
    for branch in range(num_branches(graph_of(model, "fine"))):
        for interval in range(2, calls + 1):
            s = deepcache(model, calls, interval, branch)
            if any(torch.equal(s.keep, k) for k in seen):
                continue
            seen.append(s.keep)
            options.append((s.macs_kept, (interval, branch)))
    below = [o for o in options if o[0] <= target + 1e-9]
    above = [o for o in options if o[0] > target + 1e-9]
    near_below = max(below, key=lambda o: o[0], default=None)
    near_above = min(above, key=lambda o: o[0], default=None)
    if rows == 2:
        return [o[1] for o in (near_below, near_above) if o is not None]
    best = min((o for o in (near_below, near_above) if o is not None), key=lambda o: abs(o[0] - target))
    return [best[1]]


def gain(group: dict) -> dict:
    """From a group's held-out set PSNR per order (``orders``) and bank PSNR per order
    (``bank``): the best forecast order and its gain over order 0, the gain at the order the
    bank picks, and whether forecasting improves the schedule."""
    held = {int(o): v for o, v in group["orders"].items()}
    if not any(held):
        return {}  # repeat only (the package's setting in the quick run)
    best = max((o for o in held if o), key=lambda o: held[o])
    out = dict(best_order=best, gain_db=held[best] - held[0], improves=held[best] > held[0])
    bank = {int(o): v for o, v in group.get("bank", {}).items() if int(o)}
    if bank:
        pick = max(bank, key=bank.get)
        out.update(bank_order=pick, gain_at_bank_order_db=held[pick] - held[0])
    return out


# ----------------------------------------------------------------------------- one budget


def run_target(model, scheduler, held: HeldOut, bank, target_share: float, s: Settings) -> dict:
    """The hand-made pick, the learned schedule, the package rows and every held-out row at
    one budget."""
    from shortcut_kernels.dipgo import deepcache
    from shortcut_kernels.dipgo.learn import bank_sampler, learn
    from shortcut_kernels.dipgo.search import psnr

    target = anchored(model, s.calls, target_share)
    sampler = bank_sampler(model, scheduler, bank)

    scored: list[tuple] = []

    def on_bank(schedule) -> float:
        for done, value in scored:
            if done == schedule:
                return value
        value = psnr(sampler(schedule), bank.targets)
        scored.append((schedule, value))
        return value

    t0 = time.perf_counter()
    cands = handmade_candidates(model, s.calls, target, s.top)
    cand_bank = {k: on_bank(c) for k, c in cands.items()}
    hand_key = max(cand_bank, key=cand_bank.get)
    hand = cands[hand_key]
    print(f"{100 * target_share:.0f}%: hand-made pick {hand_key} ({cand_bank[hand_key]:.2f} dB on the bank, "
          f"{len(cands)} candidates, {time.perf_counter() - t0:.0f} s)", flush=True)

    res = learn(model, scheduler, target, start=hand, bank=bank, time_budget=s.seconds, progress=False,
                estimate_size=s.estimate_size, **{**LEARN, **s.extra})
    learned = res.schedule
    print(f"{100 * target_share:.0f}%: learned {len(res.history) - 1} moves, bank {res.start_psnr:.2f} -> "
          f"{res.psnr:.2f} dB", flush=True)

    groups: dict[str, dict] = {}
    rows: list[dict] = []

    def add_group(name: str, kind: str, key: str, schedule, bank0: float | None = None, orders=ORDERS) -> dict:
        g = dict(kind=kind, key=key, macs_kept=schedule.macs_kept, orders={}, bank={})
        for o in orders:
            sch = schedule.with_forecast(o)
            g["bank"][o] = bank0 if (o == 0 and bank0 is not None) else on_bank(sch)
            k = forecast_key(key, o)
            row = held.ours(k, sch, kind=kind, group=name, order=o)
            rows.append(row)
            g["orders"][o] = row["psnr"]
            print(f"  {k:44s} kept {100 * row['macs_kept']:5.1f}%  set {row['psnr']:6.2f} dB  "
                  f"mean {row['psnr_image_mean']:6.2f} dB  bank {g['bank'][o]:6.2f} dB", flush=True)
        g.update(gain(g))
        groups[name] = g
        return g

    add_group("handmade", "handmade", hand_key, hand, cand_bank[hand_key])
    add_group("learned", "learned", "learned", learned, res.psnr)

    packages = []
    for interval, branch in package_settings(model, s.calls, target, s.package_rows):
        equal = deepcache(model, s.calls, interval, branch)
        ours_key = f"deepcache({interval},{branch})"
        same = next((n for n, sch in (("handmade", hand), ("learned", learned))
                     if sch.graph.names == equal.graph.names and torch.equal(sch.keep, equal.keep)), None)
        group = same or f"package-equal {ours_key}"
        if same is None:
            add_group(group, "package-equal", ours_key, equal, orders=s.package_orders)
        ours0 = next(r for r in rows if r["group"] == group and r["order"] == 0)
        pkey = f"DeepCache package ({interval},{branch})"
        row = held.package(pkey, interval, branch, equal, kind="package", group=group, order=None)
        diff = (held.images[pkey] - held.images[ours0["key"]]).abs().max().item()
        row.update(equal_to=ours0["key"], max_abs_diff_vs_equal=diff, within_target=equal.macs_kept <= target + 1e-9)
        rows.append(row)
        packages.append(dict(interval=interval, branch=branch, key=pkey, group=group, macs_kept=equal.macs_kept,
                             equal_to=ours0["key"], max_abs_diff_vs_equal=diff))
        print(f"  {pkey:44s} kept {100 * row['macs_kept']:5.1f}%  set {row['psnr']:6.2f} dB  "
              f"mean {row['psnr_image_mean']:6.2f} dB  (max |package - ours| {diff:.1e})", flush=True)

    return {"target": target_share, "target_macs": target, "rows": rows, "groups": groups, "packages": packages,
            "forecast_improves": {"handmade": groups["handmade"]["improves"],
                                  "learned": groups["learned"]["improves"]},
            "handmade": {"pick": hand_key, "top": s.top, "bank_psnr": cand_bank},
            "learn": {"time_budget_s": s.seconds, "seconds": res.seconds, "start": hand_key,
                      "start_psnr": res.start_psnr, "bank_psnr": res.psnr, "moves": len(res.history) - 1,
                      "evaluations": res.evaluations, "estimates": res.estimates, "settings": {**LEARN, **s.extra}},
            "schedules": {"handmade": hand.to_dict(), "learned": learned.to_dict()}}


def measure(s: Settings, held: HeldOut | None = None) -> dict:
    """The section's measurement at settings ``s`` (the test runs it at a tiny setting and
    passes its own ``held`` to read the samples of every row)."""
    from shortcut_kernels import zoo
    from shortcut_kernels.dipgo.learn import make_bank

    z = zoo.load(MODEL)
    model = z.model
    scheduler = zoo.make_scheduler(z.scheduler_config)
    scheduler.set_timesteps(s.calls)
    held = held or HeldOut(model, z.scheduler_config, s)
    full_row = held.full()
    bank = make_bank(model, scheduler, s.bank, guidance=s.guidance)
    targets = [run_target(model, scheduler, held, bank, t, s) for t in s.targets]
    return {"model": MODEL, "calls": s.calls, "guidance": s.guidance, "samples": len(held.labels),
            "seed": held.seed, "settings": asdict(s), "full": full_row, "targets": targets,
            "holds": all(all(t["forecast_improves"].values()) for t in targets),
            "deepcache_package": _package_version()}


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("DeepCache")
    except PackageNotFoundError:
        return None


def run(out_dir=None, full: bool = False, s: Settings | None = None) -> dict:
    torch.set_num_threads(1)  # the toy model runs fastest on one thread on a shared 2-core box
    if _package_version() is None:
        return {"skipped": "the DeepCache package is not installed (pip install DeepCache)"}
    return measure(s or settings(full))
