"""DiP-GO's few-step gradient optimisation of the pruner, in two modes.

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
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..chain import Chain
from ..models.conditioning import guidance_batch, sample_shape
from ..ops.guided_step import guided_step
from .losses import consistency_loss, kept_macs_fraction, sparsity_loss
from .pruner import Pruner
from ..runtime.cache import accelerate
from ..runtime.schedule import Schedule
from .supernet import SuperNet, _flatten

__all__ = ["TrainConfig", "TrainResult", "train", "full_samples", "MODES"]

MODES = ("exact", "shortcut")


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train` (saved with every checkpoint).

    The defaults are tuned on the zoo models (16x16 digits, 50 DDIM calls); the paper's
    SD-1.5 settings are SGD lr 0.2, weight decay 1e-4, cosine decay, 10 warm-up
    iterations, 500 iterations, ``1 - SSIM`` on decoded images.
    """

    mode: str = "shortcut"
    target: float = 0.4  # kept-MAC share: the sparsity term's budget and the one the schedule is selected at
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
    at ``config.target``, the budget it was trained at (the budgeted mode's forward gates,
    the sparsity term's target), so training and selection share one budget."""

    pruner: Pruner
    history: list[dict] = field(default_factory=list)
    config: TrainConfig | None = None
    seconds: float = 0.0
    schedule: Schedule | None = None


# ----------------------------------------------------------------------------- the chain


class _Chain:
    """One sampling run of a class-conditional zoo-style model ``model(x, t, labels) -> eps``
    with classifier-free guidance, through the SuperNet: the gates of call ``i`` are row ``i``,
    the caches pass from call to call."""

    def __init__(self, net: SuperNet, scheduler, guidance: float, null_label: int):
        self.net = net
        self.chain = Chain(scheduler, guidance)
        self.plan = self.chain.plan
        if self.plan is None:
            raise ValueError(f"{type(scheduler).__name__} has no linear form: DiP-GO training needs one "
                             "(see shortcut_kernels.samplers)")
        self.steps, self.timesteps, self.n = self.plan.steps, self.plan.timesteps, self.plan.n
        self.w = self.chain.w
        self.null = null_label

    def call(self, x: Tensor, t: Tensor, labels: Tensor, gates: Tensor, caches):
        """One guided denoiser call on ``x`` (already input-scaled): (eps_u, eps_c, caches)."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        g = gates if gates.dim() == 1 else torch.cat([gates, gates])  # per-sample rows: both halves
        out, caches = self.net(*guidance_batch(x, t, labels, self.null), gates=g, caches=caches)
        eu, ec = out.chunk(2)
        return eu, ec, caches

    def schedule_of(self, gates: Tensor) -> Schedule | None:
        """The schedule that hard, cascade-normalised gates describe (None for any other gates:
        soft values, per-sample rows, call 0 not computing, or nothing reused)."""
        if gates.dim() != 2 or not bool(((gates == 0) | (gates == 1)).all()) or bool(gates.all()):
            return None
        keep = gates.detach().cpu() > 0.5
        if not bool(keep[0].all()) or not torch.equal(self.net.graph.cascade(keep), keep):
            return None
        return Schedule(keep, self.net.graph)

    def _run_skipping(self, x_T: Tensor, labels: Tensor, schedule: Schedule, on_call: Callable | None,
                      on_output: Callable | None = None):
        """The no-graph run through the runtime (:func:`.accelerate`): reused blocks are not
        computed, so the run costs the kept MACs. With hard cascade-normalised gates the
        SuperNet computes the same sample (it computes every block and then discards the
        reused ones) and leaves the same caches, which ``on_call`` receives in its format."""
        with accelerate(self.net.model, schedule, store_all=on_call is not None) as handle, handle.run():
            def seen(i: int, x: Tensor) -> None:
                on_call(i, x, None if i == 0 else [_flatten(c)[0] for c in handle.state.cache])

            def call(i: int, x_in: Tensor, t: Tensor):
                t = t.expand(x_in.shape[0]) if t.dim() == 0 else t
                return self.net.model(*guidance_batch(x_in, t, labels, self.null)).chunk(2)

            return self.chain.run(self.chain.first_latent(x_T), call, on_call=seen if on_call is not None else None,
                                  on_output=on_output)

    def run(self, x_T: Tensor, labels: Tensor, gates: Tensor, *, grad: str = "none", on_call: Callable | None = None,
            skip_reused: bool = True, on_output: Callable | None = None):
        """The final sample. ``grad``: ``"none"`` (no graph), ``"exact"`` (graph through every
        call, one checkpoint per call). ``on_call(i, x, caches)`` sees each call's inputs,
        ``on_output(i, eps_u, eps_c) -> (eps_u, eps_c)`` its outputs (:meth:`Chain.run`).
        Without a graph and with hard gates (``skip_reused``) reused blocks are skipped."""
        schedule = self.schedule_of(gates) if skip_reused and grad == "none" and not torch.is_grad_enabled() else None
        if schedule is not None:
            return self._run_skipping(x_T, labels, schedule, on_call, on_output)
        caches = None

        def seen(i: int, x: Tensor) -> None:
            on_call(i, x, caches)

        def call(i: int, x_in: Tensor, t: Tensor):
            nonlocal caches
            if grad == "exact":  # the caches pass as inputs, so the recompute sees this call's
                eu, ec, caches = checkpoint(self.call, x_in, t, labels, gates[i], caches, use_reentrant=False)
            else:
                eu, ec, caches = self.call(x_in, t, labels, gates[i], caches)
            return eu, ec

        return self.chain.run(self.chain.first_latent(x_T), call, on_call=seen if on_call is not None else None,
                              on_output=on_output)


@torch.no_grad()
def full_samples(net: SuperNet, scheduler, noise: Tensor, labels: Tensor, guidance: float, null_label: int,
                 batch_size: int = 64) -> Tensor:
    """The full model's samples (every gate at 1: the model itself, bit for bit)."""
    chain = _Chain(net, scheduler, guidance, null_label)
    ones = torch.ones(chain.n, net.num_blocks)
    return torch.cat([chain.run(noise[i:i + batch_size], labels[i:i + batch_size], ones)
                      for i in range(0, noise.shape[0], batch_size)])


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


def train(model: torch.nn.Module, scheduler, config: TrainConfig | None = None, *, pruner: Pruner | None = None,
          checkpoint_path: str | Path | None = None, resume: bool = False, progress: bool = True,
          log_path: str | Path | None = None, time_budget: float | None = None,
          callback: Callable[[dict], bool] | None = None, **overrides) -> TrainResult:
    """Learn a pruner for ``model`` sampled with ``scheduler`` (``set_timesteps`` called:
    one gate row per denoiser call).

    model: a class-conditional zoo-style model ``model(x, t, labels) -> eps`` (e.g.
        ``zoo.load("digits-unet").model``), sampled with classifier-free guidance.
    config / overrides: :class:`TrainConfig` fields (``mode="exact"|"shortcut"``, ``target``,
        ``iters``, ...).
    pruner: continue from this pruner (default: a new one, keeping everything).
    checkpoint_path / resume: save pruner, optimiser, iteration, RNG and history every
        ``checkpoint_every`` iterations; with ``resume`` continue from that file if it exists.
    time_budget: stop after this many seconds (the measured comparisons run both modes on
        the same wall-clock budget).
    callback: called with each iteration's record; returning True stops (after a checkpoint).
    Returns a :class:`TrainResult` (the pruner, a history of per-iteration records).
    """
    cfg = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.budget not in ("penalty", "anneal"):
        raise ValueError(f"budget must be 'penalty' or 'anneal', got {cfg.budget!r}")
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
                gates = pruner.budget_gates(_annealed_target(cfg, it))
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
    result.schedule = pruner.to_schedule(cfg.target, ranked=True)
    return result
