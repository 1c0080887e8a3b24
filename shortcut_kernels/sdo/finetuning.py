"""Reward fine-tuning of a diffusion model's weights through the sampler, full or LoRA.

    result = finetune(model, scheduler, reward, FinetuneConfig(lora=4, iters=50, batch_size=8))
    save_lora(model, "out/")     # diffusers' load_lora_weights / load_lora_adapter format

Each iteration samples fresh noise, runs the chain with one kept call per sample
(``per-sample``: each sample of the batch keeps its own call; the published description
picks one random call per iteration) and takes an optimiser step on ``-mean(reward)``.
Baselines (``full``, ``draft:K``, ``alignprop``) run behind the same loop.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from ..runtime import Schedule
from ..models.conditioning import ClassConditional, DiTConditional, TextConditional
from ..models.conditioning import sample_shape as model_sample_shape
from ..samplers import Plan
from .chain import check_chain_schedule, shortcut_sample
from .config import DEFAULT_LORA_TARGETS, ChainConfig, FinetuneConfig
from .policy import Policy
from .rewards import RewardError, check_reward

__all__ = ["finetune", "FinetuneResult", "weight_optimizer", "add_lora", "save_lora", "load_lora",
           "trainable_parameters", "DEFAULT_LORA_TARGETS"]

STATE_FILE = "finetune_state.pt"


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "backbone", model)


def add_lora(model: torch.nn.Module, rank: int = 4, alpha: float | None = None,
             targets: Sequence[str] = DEFAULT_LORA_TARGETS, seed: int | None = 0) -> list[Tensor]:
    """Freeze ``model`` and add LoRA adapters (peft) to its diffusers backbone; returns the
    trainable LoRA parameters. The adapter starts at zero (B = 0): the model is unchanged."""
    from peft import LoraConfig

    net = _backbone(model)
    if not hasattr(net, "add_adapter"):
        raise TypeError(f"{type(net).__name__} is not a diffusers model with add_adapter (PeftAdapterMixin)")
    model.requires_grad_(False)
    if seed is not None:
        torch.manual_seed(seed)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        init_lora_weights="gaussian", target_modules=list(targets), lora_dropout=0.0)
    net.add_adapter(config)
    return [p for n, p in net.named_parameters() if "lora_" in n and p.requires_grad]


def trainable_parameters(model: torch.nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def save_lora(model: torch.nn.Module, directory: str | os.PathLike, weight_name: str = "pytorch_lora_weights.safetensors") -> Path:
    """Save the backbone's LoRA weights in diffusers' format (``unet.``-prefixed keys,
    ``pytorch_lora_weights.safetensors``), readable by ``pipe.load_lora_weights(directory)`` and
    ``unet.load_lora_adapter(directory, prefix="unet")``."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    net = _backbone(model)
    # peft's key names (lora_A / lora_B), which diffusers reads as they are; its older
    # "lora.down" conversion only renames attention layers and would mix two formats
    state = get_peft_model_state_dict(net)
    if not state:
        raise ValueError("the model has no LoRA adapter to save (finetune with FinetuneConfig(lora=rank) adds one)")
    config = net.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    directory = Path(directory)
    StableDiffusionLoraLoaderMixin.save_lora_weights(directory, unet_lora_layers=state, weight_name=weight_name,
                                                     safe_serialization=True, unet_lora_adapter_metadata=config)
    return directory / weight_name


def load_lora(model: torch.nn.Module, directory: str | os.PathLike,
              weight_name: str = "pytorch_lora_weights.safetensors") -> None:
    """Load LoRA weights saved by ``save_lora`` (or by diffusers' training scripts) into the backbone."""
    _backbone(model).load_lora_adapter(str(directory), prefix="unet", weight_name=weight_name)


@dataclass
class FinetuneResult:
    history: list = field(default_factory=list)       # per iteration: reward mean, train seconds
    eval_history: list = field(default_factory=list)  # held-out reward: iteration, train seconds, mean
    iterations: int = 0

    @property
    def rewards(self) -> list[float]:
        return [h["reward_mean"] for h in self.history]


@torch.no_grad()
def evaluate_reward(model_fn, scheduler, reward, noise: Tensor, config: ChainConfig | None = None, plan=None,
                    batch_size: int = 64) -> float:
    """Mean reward of the samples from fixed ``noise`` (no graph; ``config``'s guidance, eta and
    adapter merging, the full model: no chain schedule)."""
    cfg = replace(ChainConfig.of(config), policy="first", chain_schedule=None, memory_light=None)
    vals = []
    for i in range(0, noise.shape[0], batch_size):
        x0 = shortcut_sample(model_fn, scheduler, noise[i:i + batch_size], cfg, plan=plan)
        vals.append(check_reward(reward(x0), x0.shape[0]).float())
    return float(torch.cat(vals).mean())


def weight_optimizer(name: str = "adamw", lr: float = 3e-3) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    """``optimizer(params)`` for ``finetune``: ``adamw`` (no weight decay; the default, lr 3e-3)
    or ``sgd``."""
    if name == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")


def _rows_of_batch(t: Tensor, batch_size: int, rows: slice, name: str) -> Tensor:
    """``t``'s rows for ``rows`` of the global batch: one row serves every sample, ``batch_size``
    rows are one per sample."""
    if t.shape[0] == 1:
        return t
    if t.shape[0] != batch_size:
        raise ValueError(f"model_fn has {t.shape[0]} {name} for the global batch_size {batch_size}: "
                         f"give 1 (every sample) or {batch_size} (one per sample of the global batch)")
    return t[rows]


def _rank_conditioning(model_fn, batch_size: int, rows: slice):
    """``model_fn`` conditioned on this rank's samples only (``rows`` of the global batch).

    The library's conditioning wrappers hold one label / prompt row per sample of the GLOBAL
    batch (or one row for all); each rank runs only its ``rows``, so it gets a wrapper of those
    rows (a new one: the caller's ``model_fn`` is unchanged and still evaluates the global
    batch). Other callables are returned as they are: they must condition the rank's samples
    themselves. Raises a ValueError naming the fix when the rows match neither 1 nor the batch.
    """
    kind = type(model_fn)
    if kind is ClassConditional:
        labels = _rows_of_batch(model_fn.labels, batch_size, rows, "class labels")
        return ClassConditional(model_fn.model, labels, guidance=model_fn.guidance, null_label=model_fn.null_label)
    if kind is DiTConditional:
        labels = _rows_of_batch(model_fn.labels, batch_size, rows, "class labels")
        return DiTConditional(model_fn.model, labels, guidance=model_fn.guidance, null_class=model_fn.null_class)
    if kind is TextConditional:
        def cut(t, name):
            return None if t is None else _rows_of_batch(t, batch_size, rows, name)

        def cut_added(added, name):
            return {k: cut(v, f"{name} {k} rows") for k, v in added.items()}
        return TextConditional(model_fn.model, cut(model_fn.cond, "prompt_embeds rows"),
                               cut(model_fn.uncond, "negative_prompt_embeds rows"),
                               cut_added(model_fn.added, "added_cond_kwargs"),
                               cut_added(model_fn.negative_added, "negative_added_cond_kwargs"))
    return model_fn


def _global_kept_calls_full(schedule: Schedule, kept: Tensor) -> Schedule:
    """``schedule`` with the row of every call the GLOBAL batch keeps computing in full: each
    rank's chain then caches exactly as one process running the whole batch does (a rank's
    own samples may keep fewer calls)."""
    keep = schedule.keep.clone()
    keep[sorted(set(kept.tolist()))] = True
    return Schedule(keep, schedule.graph, name=schedule.name, params=schedule.params,
                    sampler=schedule.sampler, steps=schedule.steps)


def _any_rank(flag: bool, world: int) -> bool:
    """True on every rank when it is True on any: the ranks stop at the same iteration (a rank
    that left alone would leave the others waiting in the next all_reduce)."""
    if world == 1:
        return flag
    t = torch.tensor(float(flag))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t)


def finetune(
    model: torch.nn.Module,
    scheduler,
    reward: Callable,
    config: FinetuneConfig | None = None,
    *,
    model_fn: Callable | None = None,
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    sample_shape: tuple[int, ...] | None = None,
    eval_noise: Tensor | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict], bool | None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` so that its samples maximise ``reward``.

    model: a zoo diffusion model (``model(x, t, labels)``, sampled for its null class unless
        ``model_fn`` says otherwise) or any module ``model_fn`` calls.
    scheduler: with ``set_timesteps`` called (the number of calls of every chain).
    config: :class:`~shortcut_kernels.sdo.config.FinetuneConfig`: steps, batch, LoRA rank and
        targets, clipping, evaluation and checkpoint cadence, seed, time budget, and the
        chains' :class:`~shortcut_kernels.sdo.config.ChainConfig`. Its ``chain_schedule``
        applies to the no-graph chain of the one-call policies: the calls no sample keeps
        reuse cached blocks, so an iteration costs less (``random`` keeps one call for the
        whole batch, so only one row is made full; ``per-sample`` makes the row of every call
        some sample keeps full). The held-out reward is always evaluated with the full model.
    model_fn: ``model_fn(x, t)`` as in ``shortcut_sample``; default
        ``ClassConditional(model, model.null_label)`` (e.g. ``ClassConditional(model, labels,
        guidance=True)`` for labels with guidance). Per-sample conditioning (``ClassConditional``
        / ``DiTConditional`` labels, ``TextConditional`` prompt rows) has one row per sample of
        the global batch (or one row for all); each rank conditions its slice.
    optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (default ``weight_optimizer()``:
        AdamW, lr 3e-3, no weight decay).
    sample_shape: ``(C, H, W)`` of the noise; default: from the model's config.
    eval_noise: fixed held-out noise; the reward on it is logged every ``eval_every`` iterations
        (evaluation time is not counted in ``seconds``).
    checkpoint_dir / resume: the trainable weights, optimiser, generator and history are saved
        there every ``save_every`` steps; ``resume=True`` continues from the saved iteration.
    callback: called with each iteration's record (``iter``, ``reward_mean``, ``seconds``, and
        ``eval_reward_mean`` after a held-out evaluation, e.g. to stop at a plateau); returning
        True stops (after a checkpoint).
    Distributed: when ``torch.distributed`` is initialised (``torchrun``, ``accelerate launch``,
    or your own ``init_process_group``), ``batch_size`` is the global batch; every rank draws
    the same global noise and kept calls (same ``seed``) and runs its slice, and the gradients
    are averaged with ``all_reduce`` before each step: the weights stay identical on every rank
    and equal one process running the whole batch. Each rank's chain draws the global batch's
    sampler noise and takes its rows; a chain schedule computes in full the rows of every call
    the global batch keeps; a stop (callback or ``time_budget``) on any rank stops every rank
    after the same iteration. Checkpoints are written by rank 0.
    Raises ``RewardError`` (the weights are not updated with a bad reward).
    """
    cfg = config or FinetuneConfig()
    chain = cfg.chain
    if not callable(reward):
        raise TypeError(f"reward must be callable x0 -> [B], got {type(reward).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be the denoiser module (for a pipeline: pipe.unet or pipe.transformer), "
                        f"got {type(model).__name__}")
    plan = Plan(scheduler, chain.eta)
    batch_size, grad_accum = cfg.batch_size, cfg.grad_accum
    world, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} (the global batch) must divide by the world size {world}")
    local = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    pol = chain.policy
    if chain.chain_schedule is not None:  # before the model gets adapters: a bad schedule changes nothing
        check_chain_schedule(chain.chain_schedule, model, plan, pol)
    shape = tuple(sample_shape) if sample_shape is not None else model_sample_shape(model)
    if model_fn is None:
        null = getattr(model, "null_label", None)
        if null is None:
            raise ValueError("give model_fn: the model has no null_label to sample unconditionally "
                             "(e.g. model_fn=ClassConditional(model, labels))")
        model_fn = ClassConditional(model, null, guidance=chain.guidance is not None)
    rank_fn = _rank_conditioning(model_fn, batch_size, local)  # model_fn stays global: evaluation
    if cfg.lora:
        params = [p for n, p in _backbone(model).named_parameters() if "lora_" in n]
        if not params:
            params = add_lora(model, cfg.lora, targets=cfg.lora_targets, seed=cfg.seed)
        for p in params:
            p.requires_grad_(True)
    else:
        model.requires_grad_(True)
        params = trainable_parameters(model)
    model.eval()  # deterministic forward: the kept call is recomputed at backward
    opt = (optimizer or weight_optimizer())(params)
    scaler = chain.loss_scaler(params[0].device)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    result = FinetuneResult()
    start_iter, train_seconds = 0, 0.0
    ckpt = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir is not None else None
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(f"resume=True but no checkpoint at {ckpt}")
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        result.history, result.eval_history = state["history"], state["eval_history"]
        start_iter, train_seconds = state["iteration"], state["seconds"]

    def save():
        if ckpt is None or rank != 0:
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"params": [p.detach().cpu() for p in params], "optimizer": opt.state_dict(),
                    "generator": gen.get_state(), "scaler": scaler.state_dict() if scaler else None,
                    "history": result.history,
                    "eval_history": result.eval_history, "iteration": result.iterations,
                    "seconds": train_seconds, "policy": str(pol), "lora": cfg.lora}, tmp)
        os.replace(tmp, ckpt)

    def evaluate(it):
        if eval_noise is not None:
            result.eval_history.append({"iter": it, "seconds": train_seconds,
                                        "reward_mean": evaluate_reward(model_fn, scheduler, reward, eval_noise,
                                                                       chain, plan)})

    device = params[0].device
    dtype = params[0].dtype
    result.iterations = start_iter
    probs = plan.importance(0) if pol.importance else None  # the chain's call distribution: fixed
    if start_iter == 0:
        evaluate(0)
    iters = cfg.iters
    bar = tqdm(range(start_iter, iters), desc=f"finetune ({pol})", disable=not progress)
    for it in bar:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        rewards = []
        for _ in range(grad_accum):
            # the global batch's noise and kept calls, the same on every rank; this rank's slice
            noise = torch.randn((batch_size, *shape), generator=gen)[local].to(device=device, dtype=dtype)
            run_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
            run_chain = chain
            if pol.one_call:
                kept = pol.kept_calls(0, plan.n, batch_size, run_gen, probs)
                weights = pol.grad_weights(kept, 0, probs)
                run_chain = chain.with_policy(Policy.given(kept[local], None if weights is None else weights[local]))
                if chain.chain_schedule is not None:
                    run_chain = replace(run_chain, chain_schedule=_global_kept_calls_full(chain.chain_schedule, kept))
            x0 = shortcut_sample(rank_fn, scheduler, noise, run_chain, generator=run_gen, params=params, plan=plan,
                                 noise_rows=(batch_size, local))
            try:
                r = check_reward(reward(x0), noise.shape[0])
            except RewardError as err:
                opt.zero_grad(set_to_none=True)
                err.result = result
                raise
            loss = -r.sum() / (batch_size * grad_accum)  # this rank's share of the global mean
            (scaler.scale(loss) if scaler else loss).backward()
            rewards.append(r.detach())
        rd = torch.cat(rewards)
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)  # sum of the shares = the global mean
            total = rd.sum().reshape(1)
            torch.distributed.all_reduce(total)
            reward_mean = float(total) / (batch_size * grad_accum)
        else:
            reward_mean = float(rd.mean())
        if scaler:  # after the all_reduce: every rank sees the same gradients, so skips the same steps
            scaler.unscale_(opt)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        train_seconds += time.perf_counter() - t0
        result.iterations = it + 1
        entry = {"iter": it + 1, "reward_mean": reward_mean, "seconds": train_seconds}
        if scaler:
            entry["loss_scale"] = scaler.get_scale()
        result.history.append(entry)
        bar.set_postfix(reward=f"{entry['reward_mean']:.3f}")
        if eval_noise is not None and ((it + 1) % cfg.eval_every == 0 or it + 1 == iters):
            evaluate(it + 1)
            entry["eval_reward_mean"] = result.eval_history[-1]["reward_mean"]
        asked_to_stop = bool(callback(entry)) if callback else False
        if ckpt is not None and ((it + 1) % cfg.save_every == 0 or it + 1 == iters):
            save()
        out_of_time = cfg.time_budget is not None and train_seconds >= cfg.time_budget
        if _any_rank(asked_to_stop or out_of_time, world):
            if eval_noise is not None and result.eval_history[-1]["iter"] != it + 1:
                evaluate(it + 1)
            save()
            break
    bar.close()
    return result
