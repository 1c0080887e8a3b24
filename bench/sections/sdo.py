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
    (``methods``: the baseline first, then POLICY or POLICY+deepcache:N; :func:`finetune`)."""

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
    methods: list = field(default_factory=lambda: [PLAIN_FULL, "per-sample:importance+deepcache:2", "draft:1",
                                                   "alignprop"])
    lrs: list = field(default_factory=lambda: [3e-3, 1e-2])
    ft_iters: int = 50
    ft_seeds: int = 3
    ft_tune_seed: int = 100
    ft_max_iters: int = 150
    ft_plateau_window: int = 4
    ft_plateau_tol: float = 0.05
    ft_levels: tuple = (-0.1, -0.03, -0.01)
    eval_every: int = 5
    budget_fraction: float = 0.4
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


def finetune_run(s: Settings, method: str, lr: float, seed: int, stop: dict, eval_noise, judges=None) -> dict:
    """One LoRA fine-tuning run. ``stop``: ``{"iters": N}`` (a fixed count), ``{"seconds": S}``
    (training seconds, evaluation excluded; the last iteration may overrun) or ``{"plateau": True}``
    (until the held-out reward stops improving, :func:`plateaued`, at most ``s.ft_max_iters``).
    With ``judges`` (svm, cnn), the fine-tuned model's samples are judged at the end."""
    model, sched = setup(s.steps)
    policy, chain = chain_of(method, model, s.steps)
    iters = stop.get("iters", s.ft_max_iters if "plateau" in stop else 20 * s.ft_iters)
    base = chain_config(policy)
    config = sdo.FinetuneConfig(lora=4, iters=iters, batch_size=s.batch, eval_every=s.eval_every, seed=seed,
                                time_budget=stop.get("seconds"),
                                chain=sdo.ChainConfig(policy=base.policy, checkpoint=base.checkpoint,
                                                      chain_schedule=chain))
    evals = []

    def at_plateau(record: dict) -> bool:
        if not result_evals(evals, record):
            return False
        return "plateau" in stop and plateaued([e["reward_mean"] for e in evals], s.ft_plateau_window,
                                               s.ft_plateau_tol)

    res = sdo.finetune(model, sched, zoo.digits_reward(s.target), config, optimizer=sdo.weight_optimizer(lr=lr),
                       eval_noise=eval_noise, progress=False, callback=at_plateau)
    run = {"method": method, "lr": lr, "seed": seed, "stop": stop, "chain_macs_kept": chain and chain.macs_kept,
           "iterations": res.iterations, "eval": res.eval_history, "final": res.eval_history[-1]["reward_mean"],
           "best": max(e["reward_mean"] for e in res.eval_history), "seconds": res.eval_history[-1]["seconds"]}
    if judges is not None:
        run["samples"] = judge_samples(model, sched, s, *judges)
    print(json.dumps({k: v for k, v in run.items() if k != "eval"}), flush=True)
    return run


def result_evals(evals: list, record: dict) -> bool:
    """Collect the held-out evaluations from ``finetune``'s per-iteration records; True when
    ``record`` carries a new one."""
    if "eval_reward_mean" not in record:
        return False
    evals.append({"iter": record["iter"], "reward_mean": record["eval_reward_mean"]})
    return True


def plateaued(rewards: list, window: int, tol: float) -> bool:
    """The held-out reward stopped improving: the best of the last ``window`` evaluations is not
    above the best before them by more than ``tol`` of its size (the reward is a mean log p,
    negative, so the relative gain shrinks as p -> 1)."""
    if len(rewards) <= window:
        return False
    before = max(rewards[:-window])
    return max(rewards[-window:]) <= before + tol * abs(before)


def judge_samples(model, sched, s: Settings, svm, cnn, n: int = 64) -> dict:
    """Reward hacking check on the fine-tuned model's samples (fixed noise, seed 777, the null
    class as in training): the reward's own CNN, two independent judges, and the samples'
    diversity against the real digits (``zoo.judges``)."""
    x = zoo.sample(model, sched, labels=zoo.NULL_LABEL, n=n, steps=s.steps, guidance=1.0, seed=777, progress=False)
    reward_cnn = float((zoo.metrics.predict(x) == s.target).float().mean())
    return {"n": n, "reward_cnn_target_fraction": reward_cnn,
            **zoo.judges.judged_fractions(x, s.target, svm, cnn), **zoo.judges.diversity(x, s.target)}


def seconds_to(run: dict, level: float) -> float | None:
    """Training seconds at the first evaluation whose held-out reward reaches ``level``."""
    hit = next((e for e in run["eval"] if e["reward_mean"] >= level), None)
    return hit and hit["seconds"]


def spread(values: list) -> dict:
    """Median, min and max of the finite values; how many were not reached (None)."""
    got = [v for v in values if v is not None]
    return {"median": statistics.median(got) if got else None, "min": min(got, default=None),
            "max": max(got, default=None), "missing": len(values) - len(got)}


def finetune(s: Settings) -> dict:
    """LoRA fine-tuning so that the null class draws ``s.target``, as a reviewer would have it:

    1. tuning, on seed ``s.ft_tune_seed`` (never reported): every method at every lr; the
       baseline (``s.methods[0]``) runs ``s.ft_iters`` iterations, the others
       ``s.budget_fraction`` of its time; each method keeps the lr with the best final reward;
    2. reported seeds ``s.seed .. s.seed + s.ft_seeds - 1``: the baseline at its lr until its
       held-out reward stops improving (:func:`plateaued`), then every other method at its lr for
       ``s.budget_fraction`` of the baseline's seconds on that seed;
    3. per seed and method: training seconds to reach each reward level of ``s.ft_levels`` and
       the baseline's plateau reward, the ratio to the baseline's seconds, and the samples of the
       final weights judged for reward hacking (:func:`judge_samples`); spreads over the seeds.

    Held-out reward on 32 fixed noises every ``s.eval_every`` iterations (evaluation excluded
    from the seconds)."""
    eval_noise = zoo.initial_noise(32, seed=12345)
    judges = (zoo.judges.svm_judge(), zoo.judges.cnn_judge())
    baseline, others = s.methods[0], s.methods[1:]
    tuning, lr_of = [], {}
    budget = None
    for method in s.methods:
        for lr in s.lrs:
            stop = {"iters": s.ft_iters} if method == baseline else {"seconds": budget * s.budget_fraction}
            run = finetune_run(s, method, lr, s.ft_tune_seed, stop, eval_noise)
            tuning.append(run)
            if method == baseline:
                budget = max(budget or 0.0, run["seconds"])
        lr_of[method] = max((r for r in tuning if r["method"] == method), key=lambda r: r["final"])["lr"]
    runs, rows = [], []
    untuned = judge_samples(setup(s.steps)[0], setup(s.steps)[1], s, *judges)
    for seed in range(s.seed, s.seed + s.ft_seeds):
        base = finetune_run(s, baseline, lr_of[baseline], seed, {"plateau": True}, eval_noise, judges)
        runs.append(base)
        levels = [*s.ft_levels, base["best"]]
        for method in s.methods:
            run = base if method == baseline else finetune_run(
                s, method, lr_of[method], seed, {"seconds": base["seconds"] * s.budget_fraction}, eval_noise, judges)
            if run is not base:
                runs.append(run)
            reach = [seconds_to(run, lv) for lv in levels]
            base_reach = [seconds_to(base, lv) for lv in levels]
            rows.append({"method": method, "seed": seed, "lr": run["lr"], "final": run["final"], "best": run["best"],
                         "seconds": run["seconds"], "iterations": run["iterations"], "levels": levels,
                         "seconds_to_level": reach,
                         "fraction_of_baseline": [r / b if r is not None and b else None
                                                  for r, b in zip(reach, base_reach)],
                         "samples": run["samples"]})
    summary = {}
    for method in s.methods:
        mine = [r for r in rows if r["method"] == method]
        summary[method] = {
            "lr": lr_of[method], "final": spread([r["final"] for r in mine]),
            "fraction_of_baseline_per_level": [spread([r["fraction_of_baseline"][i] for r in mine])
                                               for i in range(len(s.ft_levels) + 1)],
            **{k: spread([r["samples"][k] for r in mine]) for k in mine[0]["samples"] if k != "n"}}
    return {"steps": s.steps, "batch": s.batch, "target": s.target, "baseline": baseline, "tune_seed": s.ft_tune_seed,
            "seeds": list(range(s.seed, s.seed + s.ft_seeds)), "levels": list(s.ft_levels) + ["baseline's plateau"],
            "budget_fraction": s.budget_fraction, "plateau": {"window": s.ft_plateau_window, "tol": s.ft_plateau_tol,
                                                             "max_iters": s.ft_max_iters},
            "untuned_samples": untuned, "tuning": tuning, "runs": runs, "rows": rows, "summary": summary}


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
