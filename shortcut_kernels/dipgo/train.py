"""Learning a cache schedule: ``train(model, scheduler, target=0.4)``.

``method="learn"`` (the default) runs :func:`.learn.learn`, the estimate-guided learner: moves
proposed by a forward-difference shortcut estimate and validated on a bank of training noise.
``method="ste"`` runs DiP-GO's few-step gradient optimisation of a pruner network (the paper's
straight-through method, kept as a baseline), in two modes, below. Both results carry
``.schedule`` (at most ``target`` of the MACs), ``.history`` and ``.seconds``.

The pruner's training:

Both modes run the SuperNet (:mod:`.supernet`) over a whole sampling run with the
pruner's straight-through gates and compare the final sample with the full model's from
the same noise (:func:`.losses.consistency_loss`), plus the sparsity loss.

* ``exact`` (the published method): the whole chain keeps its graph, one checkpoint per
  denoiser call (only each call's inputs and caches are stored; the call is recomputed at
  backward time). Every gate gets its exact gradient, through the caches as well.
* ``shortcut`` (this library's): the SDO gradient shortcut. The chain runs without a graph;
  each sample of the batch keeps one call ``k_i`` (stratified over calls 1..n-1, so a batch
  covers the whole chain). With the other calls' outputs held fixed the final sample is
  linear in call ``k_i``'s output, ``dx_0 / d out_k = gamma_k`` (a scalar from the
  scheduler's coefficients, :class:`shortcut_kernels.samplers.Plan`), so the gradient of
  the gates of call ``k_i`` is ``gamma_k * <dL/dx_0, d out_k / d gates>``. All kept calls are
  recomputed in ONE batched SuperNet call (per-sample timesteps, per-sample gate rows, the
  cache rows stored at each sample's call): an iteration costs one no-grad run plus one
  batched call with graph. What it drops: the gradient that reaches a gate through the
  caches it leaves for later calls.

Training data: ``bank_size`` (noise, label) pairs from training seeds and their full-model
samples, computed once; iterations draw batches from that bank. Evaluate on other seeds.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ..models.conditioning import sample_shape
from ..ops.guided_step import guided_step
from .gated_chain import _Chain, full_samples
from .learn import LearnConfig, LearnResult, learn
from .losses import consistency_loss, kept_macs_fraction, sparsity_loss
from .pruner import Pruner
from ..runtime.schedule import Schedule
from .supernet import SuperNet

__all__ = ["TrainConfig", "TrainResult", "train", "full_samples", "MODES", "METHODS"]

MODES = ("exact", "shortcut")
METHODS = ("learn", "ste")


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train` (saved with every checkpoint).

    The defaults are tuned on the zoo models (16x16 digits, 50 DDIM calls); the paper's
    SD-1.5 settings are SGD lr 0.2, weight decay 1e-4, cosine decay, 10 warm-up
    iterations, 500 iterations, ``1 - SSIM`` on decoded images.
    """

    method: str = "learn"  # "learn": dipgo.learn (LearnConfig's fields apply); "ste": the pruner (the rest)
    mode: str = "shortcut"  # ste: "exact" | "shortcut"
    target: float = 0.4  # kept-MAC share: the sparsity term's budget and the one the schedule is selected at
    # ranked rows pass over a reuse that would keep fewer than target * (1 - slack) of the MACs
    # (budgeted forward and selection alike), so the schedule lands within it of the target
    slack: float | None = 0.01
    iters: int = 200
    batch_size: int = 8
    lr: float = 0.01
    optimizer: str = "adam"  # or "sgd" (the paper's, with momentum 0.9)
    weight_decay: float = 1e-4
    warmup: int = 10
    sparsity_weight: float = 1.0
    consistency: str = "mse"
    consistency_weight: float = 100.0  # MSE on [-1, 1] images is ~1e-2: bring it to the sparsity's scale
    gumbel_tau: float | None = None  # Gumbel noise on the gates (None: none, as the paper)
    guidance: float = 3.0
    bank_size: int = 64
    seed: int = 0
    granularity: str = "fine"
    # "penalty": the paper's sparsity loss; "anneal": no sparsity loss, the gates are the
    # ranked keep-mask at a MAC budget (Pruner.budget_gates) that falls linearly from 1 to
    # ``target`` over the first ``anneal`` share of the iterations, so the forward always
    # meets the budget and the gradient only has to rank the decisions
    budget: str = "penalty"
    anneal: float = 0.5
    pruner_dim: int = 64
    pruner_hidden: int = 32
    checkpoint_every: int = 25


@dataclass
class TrainResult:
    """The trained pruner and ``schedule``: its reuse scores by rank (:func:`.from_ranking`)
    at ``config.target`` within ``config.slack``, the budget it was trained at (the budgeted mode's forward gates,
    the sparsity term's target), so training and selection share one budget."""

    pruner: Pruner
    history: list[dict] = field(default_factory=list)
    config: TrainConfig | None = None
    seconds: float = 0.0
    schedule: Schedule | None = None


# ----------------------------------------------------------------------------- one iteration


def _stratified_calls(n: int, batch: int, generator: torch.Generator) -> Tensor:
    """One call per sample from 1..n-1, stratified: sample i draws from the i-th of
    ``batch`` equal slices of the chain (call 0 has no learnable gate)."""
    edges = torch.linspace(1, n, batch + 1)
    u = torch.rand(batch, generator=generator)
    k = (edges[:-1] + u * (edges[1:] - edges[:-1])).floor().long()
    return k.clamp(1, n - 1)


def _shortcut_loss(chain: _Chain, x_T: Tensor, labels: Tensor, target: Tensor, gates: Tensor, kind: str,
                   kept: Tensor, plan) -> tuple[Tensor, Tensor]:
    """(surrogate whose gradient is the shortcut gradient, the consistency loss's value);
    ``kept[i]``: the call whose graph sample i keeps."""
    b = x_T.shape[0]
    kept_x = torch.empty_like(x_T)
    kept_caches: list | None = None

    def on_call(i, x, caches):
        nonlocal kept_caches
        rows = (kept == i).nonzero().flatten()
        if rows.numel() == 0:
            return
        if kept_caches is None:  # [2B] rows per cached tensor: uncond half, cond half
            kept_caches = [[torch.empty_like(t) for t in c] for c in caches]
        both = torch.cat([rows, rows + b])
        kept_x[rows] = x[rows]
        for dst, src in zip(kept_caches, caches):
            for d, s in zip(dst, src):
                d[both] = s[both]

    with torch.no_grad():
        x0 = chain.run(x_T, labels, gates.detach(), on_call=on_call)
    x0 = x0.requires_grad_()
    loss = consistency_loss(x0, target, kind).mean()
    (g_x0,) = torch.autograd.grad(loss, x0)
    # the kept calls, all at once: per-sample timesteps, input scales and gate rows
    ks = kept.tolist()
    t = chain.timesteps[kept]
    scale = torch.tensor([chain.steps[k].input_scale for k in ks], dtype=x_T.dtype).view(-1, *[1] * (x_T.dim() - 1))
    eu, ec, _ = chain.call(scale * kept_x, t, labels, gates[kept], kept_caches)
    out = guided_step(kept_x, eu, ec, 0.0, 1.0, chain.w)  # the guided output of each kept call
    gamma = torch.tensor([plan.output_sensitivity(k, 0) for k in ks], dtype=out.dtype).view_as(scale)
    # sum over the n-1 learnable calls of which each sample saw one: unbiased over the noise
    surrogate = (chain.n - 1) * (gamma * g_x0 * out).sum()
    return surrogate, loss.detach()


# ----------------------------------------------------------------------------- distributed


def _world() -> tuple[int, int]:
    """(rank, world size): under ``torchrun`` / ``accelerate launch`` with an initialised
    process group each rank trains on its slice of every global batch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_mean_(tensors) -> None:
    """Average tensors over the ranks, in place (gradients, logged values)."""
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)
        t /= dist.get_world_size()


def _all_gather_rows(x: Tensor, world: int) -> Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------- train


def _optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")


def _lr_lambda(cfg: TrainConfig):
    def f(it: int) -> float:  # linear warm-up, then cosine decay to 0
        if it < cfg.warmup:
            return (it + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (it - cfg.warmup) / max(1, cfg.iters - cfg.warmup)))
    return f


def _annealed_target(cfg: TrainConfig, it: int) -> float:
    """The budgeted mode's MAC budget at iteration ``it``: 1 -> ``target`` linearly."""
    span = max(1, round(cfg.anneal * cfg.iters))
    return 1.0 - (1.0 - cfg.target) * min(1.0, (it + 1) / span)


_LEARN_FIELDS = tuple(LearnConfig.__dataclass_fields__)


def train(model: torch.nn.Module, scheduler, config: TrainConfig | LearnConfig | None = None, *,
          pruner: Pruner | None = None, start: Schedule | None = None, bank=None,
          checkpoint_path: str | Path | None = None, resume: bool = False, progress: bool = True,
          log_path: str | Path | None = None, time_budget: float | None = None,
          callback: Callable[[dict], bool] | None = None, **overrides) -> LearnResult | TrainResult:
    """Learn a cache schedule for ``model`` sampled with ``scheduler`` (``set_timesteps``
    called: one row per denoiser call) keeping at most ``target`` (default 0.4) of the MACs.

    model: a class-conditional zoo-style model ``model(x, t, labels) -> eps`` (e.g.
        ``zoo.load("digits-unet").model``, or :class:`.learn.LabelConditioned` around a bare
        diffusers denoiser), sampled with classifier-free guidance.
    config / overrides: ``method`` - ``"learn"`` (default) or ``"ste"``; ``target``; then the
        method's settings: :class:`.learn.LearnConfig` fields for ``learn`` (a ``LearnConfig``
        may be the config), :class:`TrainConfig` fields for ``ste`` (``mode="exact"|"shortcut"``,
        ``iters``, ``lr``, ...). A setting of the other method is refused by name.
    start, bank: ``learn`` - the first schedule (default: the best hand-made one on the bank
        within the budget) and the training bank (:func:`.learn.make_bank`).
    pruner, checkpoint_path, resume, log_path, callback: ``ste`` - continue from this pruner
        (default: a new one, keeping everything); save pruner, optimiser, iteration, RNG and
        history every ``checkpoint_every`` iterations, with ``resume`` continue from that file;
        a JSON-lines log; ``callback(record)`` after each iteration, True stops.
    time_budget: stop after this many seconds of learning.
    Returns a :class:`.learn.LearnResult` or a :class:`TrainResult`; both have ``.schedule``.
    """
    if isinstance(config, LearnConfig):
        method = overrides.pop("method", "learn")
        if method != "learn":
            raise ValueError(f"config is a LearnConfig, the settings of method='learn'; got method={method!r}: "
                             "give a TrainConfig for method='ste'")
        target = overrides.pop("target", TrainConfig.target)
        lcfg = LearnConfig(**{**config.__dict__, **overrides})
    else:
        method = overrides.get("method", config.method if config is not None else TrainConfig.method)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "ste":
            if start is not None or bank is not None:
                raise ValueError("start and bank are settings of method='learn'; to start the pruner from a "
                                 "schedule pass pruner=Pruner.from_schedule(start)")
            wrong = [k for k in overrides if k in _LEARN_FIELDS and k not in TrainConfig.__dataclass_fields__]
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: settings of method='learn', not of method='ste'")
            cfg = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
            return _train_ste(model, scheduler, cfg, pruner, checkpoint_path, resume, progress, log_path,
                              time_budget, callback)
        defaults = TrainConfig()
        wrong = [k for k in overrides if k not in _LEARN_FIELDS and k not in ("method", "target")]
        if config is not None:
            wrong += [k for k, v in asdict(config).items()
                      if k not in ("method", "target", "guidance", "bank_size") and v != getattr(defaults, k)]
        wrong += [k for k, v in (("pruner", pruner), ("checkpoint_path", checkpoint_path), ("resume", resume),
                                 ("log_path", log_path), ("callback", callback)) if v not in (None, False)]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: settings of method='ste' (the pruner's straight-through "
                             "training); pass method='ste', or leave them out for the default learner")
        base = {} if config is None else {k: getattr(config, k) for k in ("guidance", "bank_size")
                                          if getattr(config, k) != getattr(defaults, k)}
        lcfg = LearnConfig(**{**base, **{k: v for k, v in overrides.items() if k in _LEARN_FIELDS}})
        target = overrides.get("target", config.target if config is not None else defaults.target)
    return learn(model, scheduler, target, start=start, bank=bank, time_budget=time_budget, config=lcfg,
                 progress=progress)


def _train_ste(model, scheduler, cfg: TrainConfig, pruner, checkpoint_path, resume, progress, log_path,
               time_budget, callback) -> TrainResult:
    """The pruner's training (method "ste"): see the module docstring and :func:`train`."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.budget not in ("penalty", "anneal"):
        raise ValueError(f"budget must be 'penalty' or 'anneal', got {cfg.budget!r}")
    if not 1 <= cfg.batch_size <= cfg.bank_size:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be between 1 and bank_size ({cfg.bank_size}): a batch "
                         "is drawn from the bank without repeats")
    if getattr(scheduler, "timesteps", None) is None or not len(scheduler.timesteps):
        raise ValueError("call scheduler.set_timesteps(calls) first: the pruner has one gate row per call")
    torch.manual_seed(cfg.seed)
    net = SuperNet(model, cfg.granularity)
    null_label = getattr(model, "null_label", None)
    if null_label is None:
        raise TypeError(f"model must be class-conditional with a null_label attribute (the unconditional class "
                        f"of classifier-free guidance), got {type(model).__name__}")
    chain = _Chain(net, scheduler, cfg.guidance, int(null_label))
    calls = chain.n
    if pruner is None:
        pruner = Pruner.for_graph(net.graph, calls, dim=cfg.pruner_dim, hidden=cfg.pruner_hidden)
    pruner.check_compatible(net.graph, calls)
    opt = _optimizer(cfg, pruner.parameters())
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    plan = chain.plan

    # the training bank: seeds 10_000+ (evaluation uses its own)
    bank_noise = torch.randn((cfg.bank_size, *sample_shape(model)), dtype=torch.float32,
                             generator=torch.Generator().manual_seed(10_000 + cfg.seed))
    bank_labels = torch.arange(cfg.bank_size) % 10
    rank, world = _world()
    if cfg.batch_size % world or cfg.bank_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) and bank_size ({cfg.bank_size}) must be multiples of the "
                         f"number of ranks ({world})")
    local = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    result = TrainResult(pruner, [], cfg)
    start = 0
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if resume and ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{ckpt} was written with another configuration: {state['config']}")
        pruner.load_state_dict(state["pruner"])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # Gumbel noise continues where it stopped
        result.history = state["history"]
        start = state["iteration"]
    with torch.no_grad():  # each rank samples its share of the bank
        part = slice(rank * cfg.bank_size // world, (rank + 1) * cfg.bank_size // world)
        bank_full = full_samples(net, scheduler, bank_noise[part], bank_labels[part], cfg.guidance, chain.null)
        if world > 1:
            bank_full = _all_gather_rows(bank_full, world)
    log = open(log_path, "a") if log_path and rank == 0 else None
    # training seconds: the bank of full samples is set-up, not training
    t0 = time.perf_counter() - (result.history[-1]["seconds"] if result.history else 0.0)
    bar = tqdm(range(start, cfg.iters), desc=f"dipgo {cfg.mode}", disable=not progress or rank > 0, initial=start,
               total=cfg.iters)
    try:
        for it in bar:
            # the global batch (the same draws on every rank), then this rank's slice
            idx = torch.randperm(cfg.bank_size, generator=gen)[:cfg.batch_size][local]
            x_T, labels, target = bank_noise[idx], bank_labels[idx], bank_full[idx]
            if cfg.budget == "anneal":
                gates = pruner.budget_gates(_annealed_target(cfg, it), cfg.slack)
                sparsity = torch.zeros(())
            else:  # the sparsity of the cascaded gates, two-sided about the target (losses.sparsity_loss)
                gates = pruner(cfg.gumbel_tau)
                sparsity = sparsity_loss(gates, net.graph, cfg.target)
            # the chain runs what the schedule will: a block whose consumers all reuse is not
            # computed and keeps its cache (exact on 0/1 gates, differentiable; a no-op for the
            # budgeted gates, which are cascaded already), so the shortcut's no-graph run can skip it
            gates = net.graph.cascade(gates)
            if cfg.mode == "exact":
                x0 = chain.run(x_T, labels, gates, grad="exact")
                consistency = consistency_loss(x0, target, cfg.consistency).mean()
                total = cfg.consistency_weight * consistency + cfg.sparsity_weight * sparsity
                total.backward()
                consistency = consistency.detach()
            else:
                kept_calls = _stratified_calls(calls, cfg.batch_size, gen)[local]
                surrogate, consistency = _shortcut_loss(chain, x_T, labels, target, gates, cfg.consistency,
                                                        kept_calls, plan)
                (cfg.consistency_weight * surrogate + cfg.sparsity_weight * sparsity).backward()
            if world > 1:  # rank means -> the global batch's mean
                consistency = consistency.clone()
                _all_mean_([p.grad for p in pruner.parameters() if p.grad is not None] + [consistency])
            opt.step()
            opt.zero_grad(set_to_none=True)
            lr_sched.step()
            with torch.no_grad():
                kept = float(kept_macs_fraction(gates.detach() > 0.5, net.graph))
            rec = {"iteration": it + 1, "consistency": float(consistency), "sparsity": float(sparsity.detach()),
                   "kept_macs": kept, "seconds": time.perf_counter() - t0}
            result.history.append(rec)
            bar.set_postfix(loss=f"{rec['consistency']:.4f}", kept=f"{kept:.2f}")
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            stop = ((time_budget is not None and rec["seconds"] >= time_budget)
                    or (callback is not None and bool(callback(rec))))
            if world > 1:  # every rank stops at the same iteration
                flag = torch.tensor(float(stop))
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop = bool(flag)
            done = it + 1 == cfg.iters or stop
            if ckpt is not None and rank == 0 and ((it + 1) % cfg.checkpoint_every == 0 or done):
                tmp = ckpt.with_suffix(ckpt.suffix + ".tmp")
                torch.save({"config": asdict(cfg), "pruner": pruner.state_dict(), "optimizer": opt.state_dict(),
                            "lr_scheduler": lr_sched.state_dict(), "generator": gen.get_state(),
                            "torch_rng": torch.get_rng_state(),
                            "history": result.history, "iteration": it + 1}, tmp)
                tmp.replace(ckpt)  # never a half-written checkpoint
            if done:
                break
    finally:
        bar.close()
        if log:
            log.close()
        net.remove()
    result.seconds = result.history[-1]["seconds"] if result.history else 0.0
    result.schedule = pruner.to_schedule(cfg.target, ranked=True, slack=cfg.slack)
    return result
