"""``shortcut-kernels sdo``: steer a zoo model's samples to a target digit by optimising the
initial noise through the sampler with the SDO shortcut.

    shortcut-kernels sdo --model digits-unet --target-class 7 --iters 30 -o out.png

writes ``out.png`` (the samples before and after, one row each) and ``out_reward.png`` (the
mean reward per iteration), and prints the classifier accuracy before and after.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .. import zoo
from ..models.conditioning import ClassConditional
from ..sdo.chain import shortcut_sample
from ..sdo.config import ChainConfig, OptimizeConfig
from ..sdo.optimize import RewardTarget, latent_optimizer, latent_regularizer, optimize_latents
from ..sdo.rewards import ShiftAveraged
from ..zoo.rewards import digits_reward


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("sdo", help="optimise a zoo model's initial noise for a target digit (SDO)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-unet", choices=["digits-unet", "digits-dit"])
    p.add_argument("--target-class", type=int, required=True, help="digit 0-9 the reward asks for")
    p.add_argument("--label", type=int, default=10, help="class the model is conditioned on (10 = unconditional)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale when --label is a digit")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--steps", type=int, default=50, help="sampler calls")
    p.add_argument("--scheduler", default="DDIMScheduler", help="a diffusers scheduler class name")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--optimizer", default="normalized", choices=["normalized", "adam"],
                   help="per-sample normalised steps (default) or Adam")
    p.add_argument("--lr", type=float, default=None, help="step size (default 0.2 normalized, 0.25 adam)")
    p.add_argument("--policy", default="first",
                   help="first, fixed:k, random, per-sample, random:importance, per-sample:importance, full, draft:K, alignprop")
    p.add_argument("--shell-weight", type=float, default=0.01)
    p.add_argument("--prior-weight", type=float, default=0.0,
                   help="weight of sdo.gaussian_prior: keeps the noise's statistics those of Gaussian noise")
    p.add_argument("--stop-at", type=float, default=None, help="stop when every sample's reward reaches this")
    p.add_argument("--freeze-prob", type=float, default=None,
                   help="freeze each sample once the classifier gives the target this probability (e.g. 0.97, "
                        "about what real digits get: pushing further leaves the real digits' features)")
    p.add_argument("--reward-shift", type=int, default=0,
                   help="optimise log p averaged over shifts of the sample by up to this many pixels "
                        "(sdo.ShiftAveraged; 1 makes the samples digits an independent judge accepts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("-o", "--output", default="sdo.png", help="before/after grid PNG")
    p.add_argument("--curve", default=None, help="reward curve PNG (default: <output>_reward.png)")
    p.add_argument("--json", default=None, help="also write the reward history here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def _grid(rows, titles, path: Path) -> None:
    import matplotlib  # optional (the bench/dipgo extras): only the figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(0.8 * n, 0.9 * len(rows) + 0.3), squeeze=False)
    for r, (imgs, title) in enumerate(zip(rows, titles)):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve(history, path: Path, target: int) -> None:
    import matplotlib  # optional, as in _grid

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h["iter"] for h in history], [h["reward_mean"] for h in history], marker=".")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"mean log p({target} | x0)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    if not 0 <= args.target_class <= 9:
        raise SystemExit(f"--target-class must be 0..9, got {args.target_class}")
    if not 0 <= args.label <= 10:
        raise SystemExit(f"--label must be 0..10 (10 = unconditional), got {args.label}")
    if args.freeze_prob is not None and (args.stop_at is not None or not 0 < args.freeze_prob < 1):
        raise SystemExit("--freeze-prob must be a probability in (0, 1), and not given with --stop-at")
    if args.reward_shift < 0:
        raise SystemExit(f"--reward-shift must be >= 0 pixels, got {args.reward_shift}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = zoo.load(args.model)
    sched = zoo.make_scheduler(cfg, args.scheduler)
    sched.set_timesteps(args.steps)
    guidance = args.guidance if args.label != 10 else None
    fn = ClassConditional(model, [args.label], guidance=guidance is not None)
    reward = digits_reward(args.target_class)
    objective = ShiftAveraged(reward, args.reward_shift, fill=-1.0) if args.reward_shift else reward
    stop_at = math.log(args.freeze_prob) if args.freeze_prob is not None else args.stop_at
    x_T = zoo.initial_noise(args.batch, seed=args.seed)
    sample_config = ChainConfig(guidance=guidance)
    with torch.no_grad():
        before = shortcut_sample(fn, sched, x_T, sample_config).clamp(-1, 1)
    config = OptimizeConfig(iters=args.iters, seed=args.seed, chain=ChainConfig(policy=args.policy, guidance=guidance))
    stop = RewardTarget(stop_at, freeze=args.freeze_prob is not None) if stop_at is not None else None
    res = optimize_latents(fn, sched, objective, x_T, config, optimizer=latent_optimizer(args.optimizer, args.lr),
                           regularizer=latent_regularizer(args.shell_weight, args.prior_weight), stop=stop,
                           progress=not args.no_progress)
    with torch.no_grad():
        after = shortcut_sample(fn, sched, res.latents, sample_config).clamp(-1, 1)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    _grid([before, after], ["before", "after"], out)
    curve = Path(args.curve) if args.curve else out.with_name(out.stem + "_reward.png")
    _curve(res.history, curve, args.target_class)
    acc_before = zoo.metrics.class_accuracy(before, args.target_class)
    acc_after = zoo.metrics.class_accuracy(after, args.target_class)
    seconds = res.history[-1]["seconds"] if res.history else 0.0
    print(f"target {args.target_class}: classified as target {acc_before:.0%} before, {acc_after:.0%} after "
          f"{len(res.history)} iterations ({seconds:.1f} s, policy {args.policy}); "
          f"reward {res.history[0]['reward_mean']:.3f} -> {res.history[-1]['reward_mean']:.3f}"
          if res.history else "no iterations run")
    print(f"wrote {out} and {curve}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "run"},
                                               "accuracy_before": acc_before, "accuracy_after": acc_after,
                                               "history": res.history}, indent=1))
    return 0
