"""SDO section on digits-unet: the gradient shortcut against exact backprop (``full``), DRaFT-K
and AlignProp, measured in one run.

  fidelity  cosine of each policy's gradient (w.r.t. x_T and LoRA weights) to the exact one;
  cost      seconds per iteration (chain + reward + backward), interleaved rounds;
  memory    peak RSS of one iteration in a fresh process per method, model loading subtracted;
  curves    latent optimisation for the reward "the sample is a 7", the same wall-clock budget
            per method: reward against seconds, and the samples before and after.
FULL: 50 steps, batch 8, more draws and rounds, longer curves, and LoRA fine-tuning curves
(finetune).
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from shortcut_kernels import sdo, zoo

from .common import ROOT, images_to_json

# baselines, then SDO; PLAIN_FULL is exact backprop keeping every activation (no checkpointing):
# faster than `full` where memory allows, so the stronger baseline for time
PLAIN_FULL = "full, no checkpointing"
METHODS = ["full", PLAIN_FULL, "draft:1", "draft:2", "alignprop", "first", "per-sample"]
BEST_OF_N, BEST_OF_N_THEN_SDO = "best-of-N", "best-of-N, then first"
TARGET = 7


@dataclass
class Settings:
    """What the section's parts read: the chain (steps, batch), the reward's digit, the timed
    rounds and draws, the latent curves' optimiser and budget, and the LoRA fine-tuning grid
    (``methods``: POLICY or POLICY+deepcache:N, each at every lr in ``lrs``)."""

    steps: int = 20
    batch: int = 4
    target: int = TARGET
    seed: int = 0
    draws: int = 2
    rounds: int = 2
    threads: int = 1
    curve_seconds: float = 15.0
    lr: float = 0.2
    optimizer: str = "normalized"
    methods: list = field(default_factory=lambda: ["per-sample:importance+deepcache:2", "per-sample", "full",
                                                   "draft:1", "alignprop"])
    lrs: list = field(default_factory=lambda: [3e-3, 1e-2])
    ft_iters: int = 50
    ft_seeds: int = 1
    eval_every: int = 5
    budget_fraction: float = 0.3
    prior_weight: float = 0.0


def settings(full: bool) -> Settings:
    """The quick run's settings, or FULL's: 50 steps, batch 8, more draws and rounds, longer curves."""
    if not full:
        return Settings()
    return Settings(steps=50, batch=8, draws=4, rounds=3, curve_seconds=60.0)


def chain_config(method: str, **kwargs) -> sdo.ChainConfig:
    """The chain of a method name: a policy, or PLAIN_FULL."""
    if method == PLAIN_FULL:
        return sdo.ChainConfig(policy="full", checkpoint=False, **kwargs)
    return sdo.ChainConfig(policy=method, **kwargs)


def setup(steps: int, dtype=torch.float32):
    model, cfg = zoo.load("digits-unet", dtype=dtype)
    sched = zoo.make_scheduler(cfg)
    sched.set_timesteps(steps)
    return model, sched


def grad_of(fn, sched, x_T, reward, policy, params, seed, memory_light=None, chain_schedule=None):
    x = x_T.detach().clone().requires_grad_(True)
    for p in params:
        p.grad = None
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    config = chain_config(policy, memory_light=memory_light, chain_schedule=chain_schedule)
    x0 = sdo.shortcut_sample(fn, sched, x, config, generator=gen, params=params)
    reward(x0).sum().backward()
    sec = time.perf_counter() - t0
    gp = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params]
                   + [torch.zeros(0)])
    return x.grad.detach(), gp, sec


def cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def per_sample_cos(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean().item()


def gradient_case(steps: int, batch: int, target: int, seed: int):
    """The fidelity parts' case: digits-unet with a rank-4 LoRA moved off its zero start (so both
    factors get gradients), the null class, reward log p(target); and the exact gradient."""
    model, sched = setup(steps)
    params = sdo.add_lora(model, rank=4, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    reward = zoo.digits_reward(target)
    x_T = zoo.initial_noise(batch, seed=seed)
    exact = grad_of(fn, sched, x_T, reward, "full", params, 0)
    return (fn, sched, x_T, reward, params), exact


def fidelity(s: Settings) -> dict:
    """Cosine of each policy's gradient (w.r.t. x_T and w.r.t. LoRA weights) to the exact
    full-backprop gradient, beside DRaFT-K (K = 1, 2) and AlignProp, with each one's cost."""
    case, (gx_exact, gp_exact, sec_exact) = gradient_case(s.steps, s.batch, s.target, s.seed)
    fn, sched, x_T, reward, params = case
    n = s.steps
    policies = ["first", f"fixed:{n // 2}", "fixed:-1", "random", "per-sample", "random:importance",
                "per-sample:importance", "draft:1", "draft:2", "alignprop"]
    rows = [{"policy": "full", "cos_xT": 1.0, "cos_lora": 1.0, "seconds": sec_exact}]
    for pol in policies:
        draws = s.draws if pol.partition(":")[0] in ("random", "per-sample", "alignprop") else 1
        cx, cxs, cl, secs, gx_sum, gp_sum = [], [], [], [], 0, 0
        for d in range(draws):
            gx, gp, sec = grad_of(fn, sched, x_T, reward, pol, params, 1000 + d)
            cx.append(cos(gx, gx_exact))
            cxs.append(per_sample_cos(gx, gx_exact))
            cl.append(cos(gp, gp_exact))
            secs.append(sec)
            gx_sum, gp_sum = gx_sum + gx, gp_sum + gp
        rows.append({"policy": pol, "draws": draws, "cos_xT": statistics.mean(cx),
                     "cos_xT_per_sample": statistics.mean(cxs), "cos_lora": statistics.mean(cl),
                     "cos_xT_of_mean": cos(gx_sum, gx_exact), "cos_lora_of_mean": cos(gp_sum, gp_exact),
                     "seconds": statistics.median(secs)})
        print(json.dumps(rows[-1]), flush=True)
    return {"steps": n, "batch": s.batch, "target": s.target, "rows": rows}


def method_cost(s: Settings) -> dict:
    """Seconds per iteration of every method, interleaved (round 0 warms up)."""
    model, sched = setup(s.steps)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    reward = zoo.digits_reward(s.target)
    x_T = zoo.initial_noise(s.batch, seed=s.seed)
    times = {m: [] for m in METHODS}
    for r in tqdm(range(s.rounds + 1), desc="sdo cost rounds"):
        for m in METHODS:
            _, _, sec = grad_of(fn, sched, x_T, reward, m, [], r)
            if r:
                times[m].append(sec)
    return {m: {"median_s": statistics.median(ts), "min_s": min(ts), "rounds": len(ts)} for m, ts in times.items()}


class _PeakRSS:
    """Peak resident memory (KiB) while the block runs, sampled from /proc/self/statm every
    0.5 ms by a thread; ru_maxrss cannot serve: model loading peaks higher than one step."""

    def __enter__(self):
        import os
        import threading

        self.page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page_kib

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def memory_child(method: str, steps: int, batch: int, memory_light: bool | None = None, threads: int = 1) -> None:
    """Runs in a fresh process (peak_memory): prints the RSS with the model loaded and its peak
    over one iteration of ``method``: a kept-call policy or baseline (``memory_light`` as in
    ``shortcut_sample``), ``one_call`` (one call's forward and backward) or ``load`` (nothing)."""
    import ctypes

    torch.set_num_threads(threads)
    model, sched = setup(steps)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    reward = zoo.digits_reward(TARGET)
    x = zoo.initial_noise(batch, seed=0).requires_grad_(True)
    with torch.no_grad():  # lazy inits (kernels, classifier) before the measurement
        reward(fn(x, sched.timesteps[0]))
    try:  # hand freed heap back so that the baseline is the live memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with _PeakRSS() as m:
        if method == "one_call":
            reward(fn(x, sched.timesteps[0])).sum().backward()
        elif method != "load":
            x0 = sdo.shortcut_sample(fn, sched, x, chain_config(method, memory_light=memory_light),
                                     generator=torch.Generator().manual_seed(0))
            reward(x0).sum().backward()
    print(json.dumps({"base_kib": m.base, "peak_kib": m.peak}))


def peak_memory(method: str, steps: int, batch: int, memory_light: bool | None = None, threads: int = 1) -> dict:
    """memory_child in a fresh process (model loading peaks higher than one iteration):
    ``base_kib``, ``peak_kib`` and the difference ``delta_mib``."""
    code = (f"from bench.sections.sdo import memory_child; "
            f"memory_child({method!r}, {steps}, {batch}, {memory_light!r}, {threads})")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    rec["delta_mib"] = (rec["peak_kib"] - rec["base_kib"]) / 1024
    return rec


def method_memory(s: Settings) -> dict:
    methods = tqdm(["one_call"] + METHODS, desc="sdo memory (a process each)")
    return {m: peak_memory(m, s.steps, s.batch) for m in methods}


def latent_curves(s: Settings, cost: dict | None = None) -> dict:
    """optimize_latents per method on the same noise, each for the same wall-clock budget
    (``cost``: method_cost's result, which sizes each method's iteration count); beside them
    best-of-N (fresh noise per sample, the best by the reward) for the same budget, and
    best-of-N for half of it, then SDO (``first``) from the winners for the other half."""
    model, sched = setup(s.steps)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    reward = zoo.digits_reward(s.target)
    x_T = zoo.initial_noise(s.batch, seed=100 + s.target)

    @torch.no_grad()
    def final(latents):
        x0 = sdo.shortcut_sample(fn, sched, latents, "first").clamp(-1, 1)
        return x0, reward(x0).mean().item(), zoo.metrics.class_accuracy(x0, s.target)

    x0, r0, acc0 = final(x_T)
    out = {"budget_s": s.curve_seconds, "optimizer": s.optimizer, "lr": s.lr,
           "before": {"reward": r0, "target_fraction": acc0}, "methods": {}, "samples": {"before": images_to_json(x0)}}
    def optimize(m: str, start, budget: float):
        # the budget stops the run; iters (from the cost part's seconds per iteration) sizes the bar
        per_iter = (cost or {}).get(m, {}).get("median_s")
        iters = int(1.5 * budget / per_iter) + 10 if per_iter else 10_000
        config = sdo.OptimizeConfig(iters=iters, seed=0, time_budget=budget, chain=chain_config(m))
        res = sdo.optimize_latents(fn, sched, reward, start, config, optimizer=sdo.latent_optimizer(s.optimizer, s.lr))
        return res.latents, len(res.history), [{"seconds": h["seconds"], "reward_mean": h["reward_mean"]}
                                                for h in res.history]

    def record(name: str, latents, iterations: int, curve: list) -> None:
        x0, r, acc = final(latents)
        out["methods"][name] = {"iterations": iterations, "reward_final": r, "target_fraction": acc, "curve": curve}
        out["samples"][name] = images_to_json(x0)

    for m in METHODS:
        record(m, *optimize(m, x_T, s.curve_seconds))

    def sample(x):
        with torch.no_grad():
            return sdo.shortcut_sample(fn, sched, x, "first")

    start = (x_T, reward(sample(x_T)))
    latents, _, draws, curve = best_of_n(sample, reward, x_T, s.curve_seconds, seed=1, start=start)
    record(BEST_OF_N, latents, draws, curve)
    latents, _, draws, curve = best_of_n(sample, reward, x_T, s.curve_seconds / 2, seed=1, start=start)
    latents, iterations, more = optimize("first", latents, s.curve_seconds / 2)
    half = curve[-1]["seconds"]
    record(BEST_OF_N_THEN_SDO, latents, draws + iterations,
           curve + [{"seconds": half + c["seconds"], "reward_mean": c["reward_mean"]} for c in more])
    return out


def best_of_n(sample, reward, noise_like, budget_s: float, seed: int, start=None):
    """The gradient-free baseline: fresh noise for every sample until ``budget_s`` is spent,
    each sample keeping its draw of highest reward (``start``: a first candidate and its
    reward). Returns (latents, their rewards, draws per sample, curve)."""
    gen = torch.Generator().manual_seed(seed)
    best, best_r = start if start is not None else (None, None)
    curve, draws, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s or best is None:
        x = torch.randn(noise_like.shape, generator=gen, dtype=noise_like.dtype)
        r = reward(sample(x))
        if best is None:
            best, best_r = x, r
        else:
            better = r > best_r
            best, best_r = torch.where(better.view(-1, *[1] * (x.dim() - 1)), x, best), torch.maximum(r, best_r)
        draws += 1
        curve.append({"seconds": time.perf_counter() - t0, "reward_mean": best_r.mean().item()})
    return best, best_r, draws, curve


def chain_of(method: str, model, steps: int):
    """``POLICY+deepcache:N`` runs the one-call POLICY with its no-graph chain through
    ``deepcache(interval=N, branch=0)``; a plain policy name has no chain schedule."""
    policy, _, chain = method.partition("+")
    if not chain:
        return policy, None
    kind, _, n = chain.partition(":")
    if kind != "deepcache" or not n.isdigit():
        raise ValueError(f"methods: expected POLICY or POLICY+deepcache:N, got {method!r}")
    from shortcut_kernels import dipgo

    return policy, dipgo.deepcache(model, steps, interval=int(n), branch=0)


def finetune_run(s: Settings, method: str, lr: float, seed: int, budget: float | None, eval_noise) -> dict:
    """One LoRA fine-tuning run: ``full`` runs ``s.ft_iters`` iterations; any other method may run
    more, up to ``budget`` training seconds (evaluation excluded)."""
    model, sched = setup(s.steps)
    policy, chain = chain_of(method, model, s.steps)
    iters = s.ft_iters if method == "full" or budget is None else 20 * s.ft_iters
    config = sdo.FinetuneConfig(lora=4, iters=iters, batch_size=s.batch, eval_every=s.eval_every, seed=seed,
                                time_budget=None if method == "full" else budget,
                                chain=sdo.ChainConfig(policy=policy, chain_schedule=chain))
    res = sdo.finetune(model, sched, zoo.digits_reward(s.target), config, optimizer=sdo.weight_optimizer(lr=lr),
                       eval_noise=eval_noise, progress=False)
    run = {"method": method, "lr": lr, "seed": seed, "chain_macs_kept": chain and chain.macs_kept,
           "iterations": res.iterations, "eval": res.eval_history, "final": res.eval_history[-1]["reward_mean"]}
    print(json.dumps({k: v for k, v in run.items() if k != "eval"}), flush=True)
    return run


def against_full(run: dict, full: dict) -> dict:
    """When ``run`` first reaches the held-out reward ``full`` ended at, in seconds and as a
    fraction of ``full``'s training time; its reward at 1/5 of that time."""
    goal, full_s = full["final"], full["eval"][-1]["seconds"]
    hit = next((e for e in run["eval"] if e["reward_mean"] >= goal), None)
    at_fifth = [e for e in run["eval"] if e["seconds"] <= full_s / 5]
    return {"seconds_to_full_final": hit and hit["seconds"], "fraction_of_full_time": hit and hit["seconds"] / full_s,
            "reward_at_fifth_of_full_time": at_fifth[-1]["reward_mean"]}


def finetune(s: Settings) -> dict:
    """LoRA fine-tuning so that the null class draws ``s.target``: every method at every lr on
    ``s.seed``, held-out reward on 32 fixed noises (evaluation time excluded) against training
    seconds. ``s.ft_seeds = N`` reruns each method at its best lr on N-1 more seeds, each paired
    with ``full`` on the same seed (its final reward and time set that seed's goal)."""
    runs = []
    eval_noise = zoo.initial_noise(32, seed=12345)
    methods = sorted(s.methods, key=lambda m: m != "full")  # full first: it sets the time budget
    budget = None
    for method in methods:
        for lr in s.lrs:
            run = finetune_run(s, method, lr, s.seed, None if budget is None else budget * s.budget_fraction,
                               eval_noise)
            if method == "full":
                budget = max(budget or 0.0, run["eval"][-1]["seconds"])
            runs.append(run)
    best = {}
    for r in runs:
        if r["method"] not in best or r["final"] > best[r["method"]]["final"]:
            best[r["method"]] = r
    summary = {}
    if "full" in best:
        for m, r in best.items():
            summary[m] = {"lr": r["lr"], "final": r["final"], **against_full(r, best["full"])}
        paired = {m: [(r, best["full"])] for m, r in best.items()}
        for seed in range(s.seed + 1, s.seed + s.ft_seeds):
            full = finetune_run(s, "full", best["full"]["lr"], seed, None, eval_noise)
            runs.append(full)
            paired["full"].append((full, full))
            for m in methods[1:]:
                if m in best:
                    runs.append(finetune_run(s, m, best[m]["lr"], seed,
                                             full["eval"][-1]["seconds"] * s.budget_fraction, eval_noise))
                    paired[m].append((runs[-1], full))
        if s.ft_seeds > 1:
            for m, pairs in paired.items():
                per_seed = [{"seed": r["seed"], "final": r["final"], "full_final": f["final"], **against_full(r, f)}
                            for r, f in pairs]
                fractions = sorted(s["fraction_of_full_time"] or math.inf for s in per_seed)
                summary[m].update(seeds=per_seed, seeds_within_fifth=sum(f <= 0.2 for f in fractions),
                                  median_fraction_of_full_time=_finite(statistics.median(fractions)))
    return {"steps": s.steps, "batch": s.batch, "target": s.target, "seeds": s.ft_seeds,
            "runs": runs, "best": summary}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run(out_dir=None, full: bool = False) -> dict:
    s = settings(full)
    torch.set_num_threads(s.threads)
    doc = {"steps": s.steps, "batch": s.batch, "target": s.target, "threads": s.threads, "methods": METHODS}
    parts = [("fidelity", lambda: fidelity(s)), ("cost", lambda: method_cost(s)),
             ("memory", lambda: method_memory(s)), ("curves", lambda: latent_curves(s, cost=doc["cost"]))]
    if full:
        parts.append(("finetune", lambda: finetune(s)))
    for name, part in parts:
        t0 = time.perf_counter()
        print(f"-- sdo {name}", flush=True)
        doc[name] = part()
        doc.setdefault("part_seconds", {})[name] = time.perf_counter() - t0
    return doc
