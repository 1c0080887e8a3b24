"""DiP-GO commands of ``shortcut-kernels`` (registered by :func:`add_commands`).

    shortcut-kernels schedule deepcache --model digits-unet --calls 50 --interval 3 --branch 0 -o s.json
    shortcut-kernels schedule skip-steps --model digits-unet --calls 50 --count 10 --placement power -o s.json
    shortcut-kernels schedule fora --model digits-dit --calls 50 --interval 3 [--forecast 1] -o s.json
    shortcut-kernels schedule full --model sd-1.5 --calls 50 -o s.json
    shortcut-kernels schedule show s.json [--plot map.png] [--shape 2 4 64 64]
    shortcut-kernels sample --model digits-unet --schedule s.json --steps 50 -o grid.png [--compare]
    shortcut-kernels prune --model digits-unet --steps 50 --target 0.4 --mode shortcut -o s.json [--iters 150]
    shortcut-kernels prune --model digits-unet --steps 50 --target 0.2 --mode search -o s.json [--time-budget 300]

Models: the zoo's ``digits-unet`` / ``digits-dit`` (trained weights), or a bundled
architecture (``sd-1.5``, ``sd-2.1``, ``sdxl``, ``dit-xl-2``; schedules only, built on the
meta device), or a local diffusers directory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .. import zoo
from ..models import available_models, build_model, load_model
from ..report.plots import schedule_map
from ..zoo.dipgo_eval import search
from ..runtime import builders as S
from ..dipgo.learn import learn, make_bank
from ..runtime.cache import accelerate
from ..runtime.schedule import Schedule
from ..dipgo.train import train

ZOO_MODELS = ("digits-unet", "digits-dit")
SCHEDULER_HELP = ("a diffusers scheduler class compatible with the model's (e.g. DDIMScheduler, "
                  "EulerDiscreteScheduler; default %(default)s)")


def _load_model(name: str):
    """(model for graphs and sampling, zoo scheduler config or None)."""
    if name in ZOO_MODELS:
        z = zoo.load(name)
        return z.model, z.scheduler_config
    if name.lower() in available_models() or name.lower().replace("_", "-") in available_models():
        return build_model(name, device="meta"), None
    if Path(name).expanduser().exists():
        return load_model(name, device="meta"), None
    raise SystemExit(f"unknown model {name!r}: use one of {', '.join(ZOO_MODELS + tuple(available_models()))} "
                     "or a local diffusers directory")


def _scheduler(cfg: dict, name: str):
    """The zoo scheduler ``name`` built from ``cfg``; ValueError naming the scheduler classes
    diffusers lists as compatible with the model's (the commands print it as one line)."""
    import diffusers

    choices = sorted(c.__name__ for c in getattr(diffusers, cfg["_class_name"])._get_compatibles())
    if name not in choices:
        raise ValueError(f"--scheduler {name!r} is not a scheduler for this model; choose one of {', '.join(choices)}")
    return zoo.make_scheduler(cfg, name)


def _run_calls(scheduler, steps: int) -> int:
    """Denoiser calls of a ``steps``-step run (multi-call samplers such as Heun make more)."""
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def _sample_schedule(args, model, scheduler) -> Schedule:
    """The schedule ``sample`` runs: the file (checked against the model and the run's calls
    unless ``--resize``) or the full model; ValueError with the fix in CLI terms."""
    if not args.schedule:
        return S.full(model, _run_calls(scheduler, args.steps))
    s = Schedule.load(args.schedule, model=model)
    calls = _run_calls(scheduler, args.steps)
    if calls != s.calls and not args.resize:
        raise ValueError(f"{args.schedule} has {s.calls} denoiser calls but --steps {args.steps} with "
                         f"{type(scheduler).__name__} makes {calls}; add --resize to resize the schedule to "
                         f"{calls} calls, or build one for {calls} calls")
    return s


def _shape(args, model):
    return tuple(args.shape) if getattr(args, "shape", None) else None


def _build_schedule(args):
    model, _ = _load_model(args.model)
    shape = _shape(args, model)
    kind = args.builder
    if kind == "full":
        s = S.full(model, args.calls, granularity=args.granularity, sample_shape=shape)
    elif kind == "deepcache":
        s = S.deepcache(model, args.calls, args.interval, None if args.skip is not None else args.branch,
                        skip=args.skip, uniform=not args.non_uniform, center=args.center, power=args.power,
                        sample_shape=shape, forecast=args.forecast)
    elif kind == "skip-steps":
        s = S.skip_steps(model, args.calls, compute=args.compute, count=args.count, placement=args.placement,
                         exponent=args.exponent, lead=args.lead, granularity=args.granularity, sample_shape=shape,
                         forecast=args.forecast)
    elif kind == "fora":
        s = S.fora(model, args.calls, args.interval, granularity=args.granularity, sample_shape=shape,
                   forecast=args.forecast)
    else:  # pragma: no cover - argparse restricts the choices
        raise SystemExit(f"unknown builder {kind}")
    return s


def _cmd_schedule(args) -> int:
    if args.builder == "show":
        s = Schedule.load(args.file)
    else:
        try:
            s = _build_schedule(args)
        except (ValueError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.output:
            s.save(args.output)
            print(f"wrote {args.output}")
    print(s.summary(sample_shape=tuple(args.shape) if args.shape else None))
    if args.plot:
        schedule_map(s.to_dict(), args.plot)
        print(f"wrote {args.plot}")
    return 0


def _save_grid(images, path: Path, ncol: int = 10) -> None:
    import matplotlib  # optional (the dipgo extra): only writing a grid needs it

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = images.shape[0]
    nrow = (n + ncol - 1) // ncol
    h, w = images.shape[-2:]
    grid = torch.full((nrow * (h + 1), ncol * (w + 1)), -1.0)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = images[i, 0]
    plt.imsave(path, ((grid + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)


def _cmd_sample(args) -> int:
    if args.model not in ZOO_MODELS:
        print(f"error: sample runs the zoo models ({', '.join(ZOO_MODELS)}); got {args.model!r}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads) if args.threads else None
    model, cfg = _load_model(args.model)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    try:
        scheduler = _scheduler(cfg, args.scheduler)
        s = _sample_schedule(args, model, scheduler)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kw = dict(steps=args.steps, guidance=args.guidance, seed=args.seed, progress=not args.quiet)
    try:
        with accelerate(model, s, scheduler=scheduler, auto_resize=args.resize):
            images = zoo.sample(model, scheduler, labels, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _save_grid(images, Path(args.output), ncol=10)
    print(f"{s}")
    print(f"wrote {args.output}: {len(labels)} samples; class accuracy "
          f"{100 * zoo.metrics.class_accuracy(images, labels):.1f}%")
    if args.compare:
        ref = zoo.sample(model, scheduler, labels, **kw)
        print(f"vs. the full model from the same noise: PSNR {zoo.metrics.psnr(images, ref):.2f} dB, "
              f"digits-FD {zoo.metrics.digits_fd(images):.2f} (full: {zoo.metrics.digits_fd(ref):.2f})")
    return 0


def _cmd_prune(args) -> int:
    if args.model not in ZOO_MODELS:
        print(f"error: prune trains on the zoo models ({', '.join(ZOO_MODELS)}); got {args.model!r}", file=sys.stderr)
        return 2
    if not 0 < args.target <= 1:
        print(f"error: --target is the kept-MAC fraction in (0, 1], got {args.target}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads) if args.threads else None
    model, cfg = _load_model(args.model)
    try:
        scheduler = _scheduler(cfg, args.scheduler)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scheduler.set_timesteps(args.steps)
    out = Path(args.output)
    if args.mode in ("learn", "search"):
        if args.mode == "learn":
            bank = make_bank(model, scheduler, args.bank, guidance=args.guidance, seed=10_000 + args.seed)
            found = learn(model, scheduler, args.target, bank=bank, time_budget=args.time_budget,
                          guidance=args.guidance, progress=not args.quiet)
        else:
            found = search(model, scheduler, args.target, calls=args.steps, bank=args.bank, guidance=args.guidance,
                           time_budget=args.time_budget, progress=not args.quiet)
        found.schedule.save(out)
        print(found.schedule.summary())
        print(f"wrote {out} ({found.seconds:.0f} s of {args.mode}, {found.evaluations} bank runs; training-bank "
              f"PSNR {found.start_psnr:.2f} dB at the best hand-made start -> {found.psnr:.2f} dB)")
        return 0
    result = train(model, scheduler, method="ste", mode=args.mode, target=args.target, iters=args.iters,
                   batch_size=args.batch_size, lr=args.lr, guidance=args.guidance, granularity=args.granularity,
                   seed=args.seed, checkpoint_path=out.with_suffix(".pruner.pt"), resume=args.resume,
                   log_path=out.with_suffix(".log.jsonl"), progress=not args.quiet, time_budget=args.time_budget)
    s = result.schedule  # the pruner's ranking read at the budget it trained at
    s.save(out)
    print(s.summary())
    print(f"wrote {out} ({result.seconds:.0f} s of training, {len(result.history)} iterations; "
          f"pruner {out.with_suffix('.pruner.pt')}, log {out.with_suffix('.log.jsonl')})")
    return 0


def add_commands(subparsers) -> None:
    """Register ``schedule``, ``sample`` and ``prune``."""
    sp = subparsers.add_parser("schedule", help="build, inspect and save DiP-GO schedules")
    sub = sp.add_subparsers(dest="builder", required=True)

    def common(p, granularity=True, default_gran="coarse"):
        p.add_argument("--model", required=True, help="digits-unet, digits-dit, sd-1.5, dit-xl-2, ... or a path")
        p.add_argument("--calls", "--steps", type=int, default=50, dest="calls",
                       help="denoiser calls per run (= steps for one-call-per-step samplers)")
        if granularity:
            p.add_argument("--granularity", choices=["coarse", "fine"], default=default_gran)
        p.add_argument("--shape", type=int, nargs=4, metavar=("B", "C", "H", "W"),
                       help="latent shape for MACs and cache memory (default: native size, batch 1)")
        p.add_argument("-o", "--output", help="write the schedule JSON here")
        p.add_argument("--plot", help="also save the calls x blocks map as a PNG")
        p.set_defaults(run=_cmd_schedule)

    def forecast(p):
        p.add_argument("--forecast", type=int, choices=[0, 1, 2], default=0,
                       help="reused blocks: 0 repeat their cached output (default), 1 / 2 extrapolate it "
                            "linearly / quadratically from their last computed outputs")

    common(sub.add_parser("full", help="every block at every call"))
    p = sub.add_parser("deepcache", help="DeepCache: full calls every N, shallow path in between (UNets)")
    common(p, granularity=False)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--branch", type=int, default=0, help="the DeepCache package's cache_branch_id")
    p.add_argument("--skip", type=int, help="skip index instead of --branch")
    p.add_argument("--non-uniform", action="store_true", help="centre-dense full calls (--center, --power)")
    p.add_argument("--center", type=int, default=15)
    p.add_argument("--power", type=float, default=1.4)
    forecast(p)
    p = sub.add_parser("skip-steps", help="whole-call reuse: the model runs only at some calls")
    common(p)
    p.add_argument("--compute", type=int, nargs="+", help="the calls that compute (0 is added)")
    p.add_argument("--count", type=int, help="how many calls compute")
    p.add_argument("--placement", choices=["uniform", "power", "lead"], default="uniform")
    p.add_argument("--exponent", type=float, default=1.5)
    p.add_argument("--lead", type=int, help="--placement lead: the first calls that all compute (default count // 5)")
    forecast(p)
    p = sub.add_parser("fora", help="transformers: every block reused between full calls")
    common(p, default_gran="fine")
    p.add_argument("--interval", type=int, default=3)
    forecast(p)
    p = sub.add_parser("show", help="summary (and plot) of a schedule file")
    p.add_argument("file")
    p.add_argument("--plot")
    p.add_argument("--shape", type=int, nargs=4, metavar=("B", "C", "H", "W"))
    p.set_defaults(run=_cmd_schedule)

    p = subparsers.add_parser("sample", help="sample a grid of digits from a zoo model, optionally with a schedule")
    p.add_argument("--model", default="digits-unet", choices=ZOO_MODELS, help="the zoo model (default %(default)s)")
    p.add_argument("--schedule", help="schedule JSON (default: the full model)")
    p.add_argument("--steps", type=int, default=50,
                   help="sampler steps (denoiser calls for one-call-per-step samplers; default %(default)s)")
    p.add_argument("--scheduler", default="DDIMScheduler", help=SCHEDULER_HELP)
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance scale (1: the conditional output alone; default %(default)s)")
    p.add_argument("--per-class", type=int, default=4, help="samples per digit class (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default %(default)s)")
    p.add_argument("--resize", action="store_true", help="resize the schedule to the run's calls if they differ")
    p.add_argument("--compare", action="store_true", help="also sample the full model: PSNR and digits-FD")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", default="grid.png", help="the PNG grid to write (default %(default)s)")
    p.set_defaults(run=_cmd_sample)

    p = subparsers.add_parser("prune", help="learn a schedule with DiP-GO (train a pruner) on a zoo model")
    p.add_argument("--model", default="digits-unet", choices=ZOO_MODELS)
    p.add_argument("--steps", type=int, default=50, help="denoiser calls of the sampler")
    p.add_argument("--scheduler", default="DDIMScheduler", help=SCHEDULER_HELP)
    p.add_argument("--target", type=float, default=0.4, help="fraction of the MACs to keep")
    p.add_argument("--mode", choices=["learn", "shortcut", "exact", "search"], default="learn",
                   help="learn (default): moves ranked by the forward-difference estimate, validated on a bank, "
                        "from the best hand-made schedule (dipgo.learn); shortcut / exact: train the pruner "
                        "(exact: the published full-chain backprop; shortcut: SDO's); search: validated local "
                        "search from the best hand-made schedule (UNets: with trades of whole calls for "
                        "DeepCache-branch rows)")
    p.add_argument("--bank", type=int, default=30,
                   help="learn / search: training samples each candidate is scored on")
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--granularity", choices=["coarse", "fine"], default="fine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT's .pruner.pt checkpoint")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("-o", "--output", default="learned.json")
    p.set_defaults(run=_cmd_prune)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="shortcut-kernels")
    add_commands(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args()
    sys.exit(a.run(a))
