"""SDO measurements on the zoo's digits-unet, JSON out: the parts no `make bench` section runs,
and the section's fidelity and finetune parts with every setting on the command line.

    python -m experiments.sdo_parts --part fidelity cost memory latents --out sdo.json

Parts:
  fidelity  cosine of each policy's gradient (w.r.t. x_T and w.r.t. LoRA weights) to the exact
            full-backprop gradient, beside DRaFT-K (K = 1, 2) and AlignProp, with each one's cost.
  cost      seconds per iteration (chain + reward + backward), interleaved rounds: full
            (per-call checkpointing) vs SDO memory-light vs the SDO autograd reference.
  memory    peak memory as max RSS of one subprocess per method, model loading subtracted,
            against one call's forward + backward.
  latents   latent optimisation per digit (null class, guidance 1, DDIM): fraction of the
            batch that an independent classifier (an RBF SVM trained here on the real digits,
            not the reward's CNN) assigns to the target, and optionally `full` at equal
            wall-clock.
  finetune  the LoRA fine-tuning protocol (bench.sections.sdo.finetune): learning rates picked
            on a tuning seed, the baseline to its plateau on the reported seeds, time to each
            reward level, the final samples judged for reward hacking.
  direct-sum  the ceiling of the one-call policies: the cosine to the exact gradient of the sum
            of every call's shortcut gradient (what `per-sample` averages to), and of the best
            weighting of the calls (least squares on the exact gradient: an upper bound).
  adapter-merge  seconds per LoRA fine-tuning iteration with the no-graph chain's adapters
            merged (the default) and apart, interleaved rounds.
  importance-variance  the one-call LoRA gradient estimator's variance under uniform,
            |gamma_k| (importance), running |gamma_k| * |v_k| and oracle draws of the kept call.
fidelity and finetune are bench.sections.sdo's (the `make bench` section; finetune under FULL).
Run it under `flock /tmp/sk_heavy.lock` on a shared machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.sections.sdo import PLAIN_FULL, Settings, chain_of, cos, fidelity, finetune, gradient_case, grad_of, peak_memory, setup
from shortcut_kernels import sdo, zoo


def part_cost(args) -> dict:
    model, sched = setup(args.steps)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    reward = zoo.digits_reward(args.target)
    x_T = zoo.initial_noise(args.batch, seed=args.seed)
    from shortcut_kernels import dipgo

    # DeepCache interval 3, branch 0: 40.3% of the MACs kept on digits-unet at 50 calls
    cache = dipgo.deepcache(model, args.steps, interval=3, branch=0)
    methods = {"sdo_light": ("first", True, None), "sdo_reference": ("first", False, None),
               "full": ("full", None, None), PLAIN_FULL: (PLAIN_FULL, None, None),
               "sdo_light_deepcache": ("first", True, cache)}
    times = {m: [] for m in methods}
    for r in range(args.rounds + 1):
        for name, (pol, light, chain) in methods.items():
            _, _, sec = grad_of(fn, sched, x_T, reward, pol, [], r, light, chain)
            if r:  # round 0 warms up
                times[name].append(sec)
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        out[name] = {"median_s": statistics.median(ts), "p20_s": ts[int(0.2 * (len(ts) - 1))],
                     "p80_s": ts[int(math.ceil(0.8 * (len(ts) - 1)))], "rounds": len(ts)}
    out["full_over_sdo_light"] = out["full"]["median_s"] / out["sdo_light"]["median_s"]
    out["full_over_sdo_reference"] = out["full"]["median_s"] / out["sdo_reference"]["median_s"]
    out["full_over_sdo_light_deepcache"] = out["full"]["median_s"] / out["sdo_light_deepcache"]["median_s"]
    # the faster exact baseline where memory allows (every activation kept)
    out["plain_full_over_sdo_light"] = out[PLAIN_FULL]["median_s"] / out["sdo_light"]["median_s"]
    out["plain_full_over_sdo_light_deepcache"] = out[PLAIN_FULL]["median_s"] / out["sdo_light_deepcache"]["median_s"]
    return {"steps": args.steps, "batch": args.batch, "deepcache_macs_kept": cache.macs_kept, "methods": out}


def part_memory(args) -> dict:
    """Peak RSS of one iteration per method, each in a fresh process, model loading subtracted."""
    methods = {"load": ("load", None), "one_call": ("one_call", None), "sdo_light": ("first", True),
               "sdo_reference": ("first", False), "full": ("full", None)}
    out = {}
    for name, (method, light) in methods.items():
        out[name] = peak_memory(method, args.steps, args.batch, memory_light=light, threads=args.threads)
        print(name, out[name], flush=True)
    one = max(out["one_call"]["delta_mib"], 1e-3)
    out["sdo_light_over_one_call"] = out["sdo_light"]["delta_mib"] / one
    return {"steps": args.steps, "batch": args.batch, "methods": out}


def latent_statistics(latents, x_T) -> dict:
    """How Gaussian the optimised latents still look (sdo.gaussian_prior: 0 for typical noise,
    fixed orders) and how far they moved (cosine to their start)."""
    g = torch.Generator().manual_seed(0)
    prior = sdo.gaussian_prior(latents, generator=g)
    return {"latent_prior_mean": prior.mean().item(), "latent_prior_flagged": (prior > 0).float().mean().item(),
            "start_prior_mean": sdo.gaussian_prior(x_T, generator=torch.Generator().manual_seed(0)).mean().item(),
            "cosine_to_start": torch.nn.functional.cosine_similarity(latents.flatten(1), x_T.flatten(1)).mean().item()}


def latent_objective(args, digit: int):
    """The reward optimised for ``digit`` and optimize_latents' stopping options: the zoo
    classifier's log p (``--reward-shift S``: averaged over the shifts of up to S pixels,
    ``sdo.ShiftAveraged``, the digits' background shifted in), stopping once every sample has
    p >= ``--stop-prob``, or with ``--freeze-prob P`` each sample frozen once it has p >= P."""
    reward = zoo.digits_reward(digit)
    if args.reward_shift:
        reward = sdo.ShiftAveraged(reward, args.reward_shift, fill=-1.0)
    p = args.freeze_prob if args.freeze_prob is not None else args.stop_prob
    return reward, sdo.RewardTarget(math.log(p), 1.0, freeze=args.freeze_prob is not None)


def latent_run(args, policy: str, seed: int, time_budget: float | None = None) -> tuple:
    """optimize_latents' config and keyword arguments for these settings."""
    config = sdo.OptimizeConfig(iters=args.iters, seed=seed, time_budget=time_budget,
                                chain=sdo.ChainConfig(policy=policy))
    return config, dict(optimizer=sdo.latent_optimizer(args.optimizer, args.lr),
                        regularizer=sdo.latent_regularizer(0.01, args.prior_weight))


def objective_record(args) -> dict:
    return {"reward_shift": args.reward_shift, "freeze_prob": args.freeze_prob, "stop_prob": args.stop_prob}


def part_latents(args) -> dict:
    model, sched = setup(args.steps)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    judge, judge_cnn = zoo.judges.svm_judge(), zoo.judges.cnn_judge()
    judge_acc, judge_cnn_acc = judge.test_accuracy, judge_cnn.test_accuracy
    rows = []
    for digit in args.digits:
        reward = zoo.digits_reward(digit)  # reported: the plain log p
        objective, stopping = latent_objective(args, digit)
        x_T = zoo.initial_noise(args.batch, seed=args.noise_seed + digit)
        config, kw = latent_run(args, args.policy, digit)
        res = sdo.optimize_latents(fn, sched, objective, x_T, config, stop=stopping, progress=False, **kw)
        with torch.no_grad():
            x0 = sdo.shortcut_sample(fn, sched, res.latents, "first").clamp(-1, 1)
            r_sdo = reward(x0).mean().item()
        row = {"digit": digit, "iterations": len(res.history), "seconds": res.history[-1]["seconds"],
               "reward_first": res.history[0]["reward_mean"], "reward_final": r_sdo,
               **zoo.judges.judged_fractions(x0, digit, judge, judge_cnn),
               "reward_classifier_target_fraction": zoo.metrics.class_accuracy(x0, digit),
               "latent_norm_mean": res.latents.flatten(1).norm(dim=1).mean().item(),
               **latent_statistics(res.latents, x_T)}
        if args.compare_full:
            budget = row["seconds"]
            config, kw = latent_run(args, "full", digit, time_budget=budget)
            # full runs its whole budget (as in the earlier runs), freezing as SDO does
            full = sdo.optimize_latents(fn, sched, objective, x_T, config, stop=stopping if stopping.freeze else None,
                                        progress=False, **kw)
            with torch.no_grad():
                r_full = reward(sdo.shortcut_sample(fn, sched, full.latents, "first")).mean().item()
            row.update({"full_iterations_at_equal_time": len(full.history), "full_reward_final": r_full})
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r["judged_target_fraction"] >= 0.9 for r in rows]
    ok_cnn = [r["judged_target_fraction_cnn"] >= 0.9 for r in rows]
    return {"steps": args.steps, "batch": args.batch, "iters": args.iters, "lr": args.lr, "optimizer": args.optimizer,
            "noise_seed": args.noise_seed,
            "policy": args.policy,
            "prior_weight": args.prior_weight, **objective_record(args),
            "judge": "sklearn SVC(rbf, C=10) on the real train digits", "judge_test_accuracy": judge_acc,
            "judge_cnn": "shortcut_kernels.zoo.judges.cnn_judge", "judge_cnn_test_accuracy": judge_cnn_acc,
            "digits_reaching_90pct": sum(ok), "digits_reaching_90pct_cnn_judge": sum(ok_cnn), "rows": rows}


def part_judge_agreement(args) -> dict:
    """Do the reward's CNN and the judge agree on the model's own samples? 320 null-class
    samples (guidance 1, --steps DDIM calls, noise that latent optimisation never uses); the
    judge's agreement with the CNN's class, over all samples and where the CNN is confident; and
    both judges' accuracy on the model's own class-conditional samples (guidance 1 and 3)."""
    model, sched = setup(args.steps)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    judge = zoo.judges.svm_judge()
    x_T = zoo.initial_noise(320, seed=4242)
    with torch.no_grad():
        x0 = torch.cat([sdo.shortcut_sample(fn, sched, x_T[i:i + 64], "first") for i in range(0, 320, 64)]).clamp(-1, 1)
        log_p = torch.stack([zoo.digits_reward(d)(x0) for d in range(10)], 1)
    cnn, p = log_p.argmax(1).numpy(), log_p.max(1).values.exp().numpy()
    svm = judge.predict(x0)
    out = {"samples": 320, "agree_all": float((svm == cnn).mean())}
    for thr in (0.5, 0.9):
        m = p >= thr
        out[f"cnn_p_ge_{thr:g}"] = int(m.sum())
        out[f"agree_where_cnn_p_ge_{thr:g}"] = float((svm[m] == cnn[m]).mean())
    # how well each judge reads the model's own class-conditional samples (32 per digit)
    judge_cnn = zoo.judges.cnn_judge()
    labels = torch.arange(10).repeat_interleave(32)
    for w in (1.0, 3.0):
        cond = zoo.sample(model, sched, labels, steps=args.steps, guidance=w, seed=9100, progress=False).clamp(-1, 1)
        out[f"svm_accuracy_conditional_guidance_{w:g}"] = float((judge.predict(cond)
                                                                 == labels.numpy()).mean())
        out[f"cnn_judge_accuracy_conditional_guidance_{w:g}"] = float((judge_cnn.predict(cond) == labels.numpy()).mean())
    print(json.dumps(out), flush=True)
    return out


def part_latents_fd(args) -> dict:
    """Are the optimised samples still digits? ``--fd-samples`` latents optimised for ``--target``
    (null class, guidance 1, as ``latents``), their digits FD against the real digits of that
    class, beside the FD of the model's own conditional samples of the class from other noise
    (guidance 1 and the zoo's 3). The bar: within 2x of the conditional samples' FD."""
    model, sched = setup(args.steps)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    digit, n = args.target, args.fd_samples
    x, y = zoo.load_digits("all")
    real = x[y == digit]
    objective, stopping = latent_objective(args, digit)
    x_T = zoo.initial_noise(n, seed=args.fd_noise_seed + digit)
    config, kw = latent_run(args, "first", digit)
    res = sdo.optimize_latents(fn, sched, objective, x_T, config, stop=stopping, **kw)
    with torch.no_grad():
        before = sdo.shortcut_sample(fn, sched, x_T, "first").clamp(-1, 1)
        after = sdo.shortcut_sample(fn, sched, res.latents, "first").clamp(-1, 1)
    row = {"target": digit, "samples": n, "real_reference_images": int(real.shape[0]),
           "prior_weight": args.prior_weight, **objective_record(args), "noise_seed": args.fd_noise_seed + digit,
           "iterations": len(res.history), "seconds": res.history[-1]["seconds"],
           "target_fraction_after": zoo.metrics.class_accuracy(after, digit),
           **zoo.judges.judged_fractions(after, digit, zoo.judges.svm_judge(), zoo.judges.cnn_judge()),
           "fd_optimised": zoo.metrics.digits_fd(after, real),
           "fd_null_class_before": zoo.metrics.digits_fd(before, real)}
    for w in (1.0, 3.0):
        cond = zoo.sample(model, sched, digit, steps=args.steps, guidance=w, n=n, seed=7000 + digit, progress=False)
        row[f"fd_conditional_guidance_{w:g}"] = zoo.metrics.digits_fd(cond, real)
    ref = min(row["fd_conditional_guidance_1"], row["fd_conditional_guidance_3"])
    row["fd_ratio_to_best_conditional"] = row["fd_optimised"] / ref
    row["holds_2x"] = row["fd_ratio_to_best_conditional"] <= 2.0
    print(json.dumps(row), flush=True)
    return row


def part_direct_sum(args) -> dict:
    """Cosine to the exact gradient of sum_k g_k, g_k the shortcut gradient keeping call k."""
    case, (gx_exact, gp_exact, _) = gradient_case(args.steps, args.batch, args.target, args.seed)
    fn, sched, x_T, reward, params = case
    per_call = [grad_of(fn, sched, x_T, reward, f"fixed:{k}", params, 0) for k in range(args.steps)]
    gp = torch.stack([c[1] for c in per_call]).double()
    w = torch.linalg.lstsq(gp.T, gp_exact.double()[:, None]).solution
    out = {"steps": args.steps, "batch": args.batch,
           "cos_lora_each_call": [cos(c[1], gp_exact) for c in per_call],
           "cos_xT_each_call": [cos(c[0], gx_exact) for c in per_call],
           "cos_lora_sum": cos(gp.sum(0), gp_exact),
           "cos_xT_sum": cos(sum(c[0] for c in per_call), gx_exact),
           "cos_lora_best_weights": cos(gp.T @ w, gp_exact)}
    print(json.dumps({k: v for k, v in out.items() if "each" not in k}), flush=True)
    return out


def part_importance_variance(args) -> dict:
    """Variance of the one-call LoRA gradient estimator under each draw of the kept call.

    Per sample i, g_ik is the shortcut gradient keeping call k (``fixed:k``, the fidelity case's
    LoRA); drawing k with probability p_k and taking g_ik / p_k estimates G_i = sum_k g_ik with
    variance V_i(p) = sum_k |g_ik|^2 / p_k - |G_i|^2, computed exactly. Draws: uniform;
    ``importance`` (p_k ~ |dx_0/d out_k|, ``Plan.importance``, what the policies use); ``running``
    (p_k ~ the mean |g_jk| over the *other* samples j: |gamma_k| times a running estimate of the
    VJP norm |v_k|, what an estimator could keep from earlier iterations); ``oracle`` (p_k ~ |g_ik|,
    the least variance any draw of one call can have). Reported: sum_i V_i / sum_i |G_i|^2."""
    from shortcut_kernels.samplers import Plan

    case, _ = gradient_case(args.steps, args.batch, args.target, args.seed)
    fn, sched, x_T, reward, params = case
    g = torch.stack([torch.stack([grad_of(fn, sched, x_T[i:i + 1], reward, f"fixed:{k}", params, 0)[1]
                                  for k in range(args.steps)]) for i in range(args.batch)]).double()  # [B, K, P]
    norms = g.norm(dim=2)  # [B, K]
    total = g.sum(1).norm(dim=1) ** 2  # |G_i|^2
    gamma_p = Plan(sched).importance(0)
    others = (norms.sum(0, keepdim=True) - norms) / (args.batch - 1)
    draws = {"uniform": torch.full_like(norms, 1.0 / args.steps), "importance": gamma_p.expand_as(norms),
             "running": others / others.sum(1, keepdim=True), "oracle": norms / norms.sum(1, keepdim=True)}
    out = {"steps": args.steps, "batch": args.batch, "relative_variance": {}}
    for name, p in draws.items():
        var = (norms ** 2 / p).sum(1) - total
        out["relative_variance"][name] = float(var.sum() / total.sum())
    print(json.dumps(out), flush=True)
    return out


def part_adapter_merge(args) -> dict:
    """Seconds per ``finetune`` iteration (LoRA rank 4) with ``merge_adapters`` on and off, in
    interleaved rounds; each run's first iteration warms up and is left out."""
    methods = [m for m in (args.methods or ["per-sample:importance+deepcache:2"]) if "full" not in m]
    times = {f"{m} {state}": [] for m in methods for state in ("merged", "apart")}
    for r in range(args.rounds):
        for method in methods:
            for merge in (True, False):
                model, sched = setup(args.steps)
                policy, chain = chain_of(method, model, args.steps)
                config = sdo.FinetuneConfig(lora=4, iters=6, batch_size=args.batch, seed=r, chain=sdo.ChainConfig(
                    policy=policy, chain_schedule=chain, merge_adapters=merge))
                res = sdo.finetune(model, sched, zoo.digits_reward(args.target), config, progress=False)
                secs = [b["seconds"] - a["seconds"] for a, b in zip(res.history, res.history[1:])]
                times[f"{method} {'merged' if merge else 'apart'}"].extend(secs)
    rows = {k: {"median_s": statistics.median(v), "min_s": min(v), "iterations": len(v)} for k, v in times.items()}
    for m in methods:
        rows[f"{m} speedup"] = rows[f"{m} apart"]["median_s"] / rows[f"{m} merged"]["median_s"]
    print(json.dumps(rows), flush=True)
    return {"steps": args.steps, "batch": args.batch, "rounds": args.rounds, "rows": rows}


def section_settings(args) -> Settings:
    """The command line's values of the section's settings (bench.sections.sdo.Settings)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name, None) is not None}
    if "ft_levels" in given:
        given["ft_levels"] = tuple(given["ft_levels"])
    return Settings(**given)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", default=["fidelity", "cost", "memory"],
                    choices=["fidelity", "cost", "memory", "latents", "latents-fd", "judge-agreement", "finetune",
                             "direct-sum", "adapter-merge", "importance-variance"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--target", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-seed", type=int, default=100,
                    help="latents: digit d starts from zoo.initial_noise(seed=NOISE_SEED + d); the optimiser's "
                         "settings were chosen on 100, held-out runs use another")
    ap.add_argument("--draws", type=int, default=4, help="draws of the random policies (fidelity)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (cost)")
    ap.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--lr", type=float, default=None, help="latents: step size (optimize_latents' default)")
    ap.add_argument("--optimizer", default="normalized", choices=["normalized", "adam"], help="latents: the step")
    ap.add_argument("--prior-weight", type=float, default=0.0,
                    help="latents: weight of sdo.gaussian_prior (keeps the noise's statistics Gaussian)")
    ap.add_argument("--stop-prob", type=float, default=0.9, help="latents: early stop at this target probability")
    ap.add_argument("--freeze-prob", type=float, default=None,
                    help="latents: freeze each sample once the reward's CNN gives it this probability")
    ap.add_argument("--reward-shift", type=int, default=0,
                    help="latents: optimise log p averaged over shifts of up to this many pixels (sdo.ShiftAveraged)")
    ap.add_argument("--fd-samples", type=int, default=256, help="latents-fd: optimised samples")
    ap.add_argument("--fd-noise-seed", type=int, default=5000,
                    help="latents-fd: the noise is zoo.initial_noise(seed=FD_NOISE_SEED + target)")
    ap.add_argument("--compare-full", action="store_true", help="latents: run full at SDO's wall-clock")
    ap.add_argument("--policy", default="first", help="latents: the kept-call policy, or a baseline (full, draft:K)")
    ft = ap.add_argument_group("finetune (bench.sections.sdo.finetune; unset: the section's FULL settings)")
    ft.add_argument("--methods", nargs="+", default=None,
                    help="the baseline first, then POLICY or POLICY+deepcache:N (the chain through deepcache)")
    ft.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates tried on the tuning seed")
    ft.add_argument("--budget-fraction", type=float, default=None,
                    help="the other methods train for this fraction of the baseline's time")
    ft.add_argument("--ft-iters", type=int, default=None, help="the baseline's iterations when tuning")
    ft.add_argument("--ft-seeds", type=int, default=None, help="reported seeds (SEED, SEED+1, ...)")
    ft.add_argument("--ft-tune-seed", type=int, default=None, help="the seed the learning rates are picked on")
    ft.add_argument("--ft-max-iters", type=int, default=None, help="the baseline's cap when run to its plateau")
    ft.add_argument("--ft-levels", type=float, nargs="+", default=None, help="reward levels timed")
    ft.add_argument("--eval-every", type=int, default=None, help="held-out evaluation interval")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="sdo.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = {"section": "sdo", "bench": "sdo", "device": "cpu", "threads": args.threads, "torch": torch.__version__,
              "python": platform.python_version(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": " ".join(sys.argv)}
    parts = {"fidelity": lambda a: fidelity(section_settings(a)), "cost": part_cost, "memory": part_memory, "latents": part_latents,
             "latents-fd": part_latents_fd, "judge-agreement": part_judge_agreement,
             "finetune": lambda a: finetune(section_settings(a)), "direct-sum": part_direct_sum,
             "adapter-merge": part_adapter_merge, "importance-variance": part_importance_variance}
    for name in args.part:
        t0 = time.perf_counter()
        record[name] = parts[name](args)
        record[name]["wall_s"] = time.perf_counter() - t0
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(f"== {name} done in {record[name]['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

