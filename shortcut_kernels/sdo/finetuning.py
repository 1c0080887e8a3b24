"""Reward fine-tuning of a diffusion model's weights through the sampler, full or LoRA.

    result = finetune(model, scheduler, digits_reward(7), lora=4, iters=50, batch_size=8)
    save_lora(model, "out/")     # diffusers' load_lora_weights / load_lora_adapter format

Each iteration samples fresh noise, runs the chain with one kept call per sample
(``per-sample``: each sample of the batch keeps its own call; the published description
picks one random call per iteration) and takes an optimiser step on ``-mean(reward)``.
Baselines (``full``, ``draft:K``, ``alignprop``) run behind the same loop.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from .chain import ClassConditional, Plan, check_chain_schedule, shortcut_sample
from .optimize import loss_scaler
from .policy import Policy, parse_policy
from .rewards import RewardError, check_reward

__all__ = ["finetune", "FinetuneResult", "add_lora", "save_lora", "load_lora", "trainable_parameters",
           "DEFAULT_LORA_TARGETS"]

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
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
        raise ValueError("the model has no LoRA adapter to save (finetune(..., lora=rank) adds one)")
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


def _sample_shape(model) -> tuple[int, ...]:
    cfg = getattr(_backbone(model), "config", None)
    if cfg is not None and "in_channels" in cfg and "sample_size" in cfg:
        size = cfg["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg["in_channels"], *size)
    raise ValueError("give sample_shape=(C, H, W): it cannot be read from the model's config")


@torch.no_grad()
def evaluate_reward(model_fn, scheduler, reward, noise: Tensor, guidance=None, plan=None, batch_size=64,
                    merge_adapters: bool = True) -> float:
    """Mean reward of the samples from fixed ``noise`` (no graph)."""
    vals = []
    for i in range(0, noise.shape[0], batch_size):
        x0 = shortcut_sample(model_fn, scheduler, noise[i:i + batch_size], "first", guidance=guidance, plan=plan,
                             merge_adapters=merge_adapters)
        vals.append(check_reward(reward(x0), x0.shape[0]).float())
    return float(torch.cat(vals).mean())


def finetune(
    model: torch.nn.Module,
    scheduler,
    reward: Callable,
    *,
    model_fn: Callable | None = None,
    labels=None,
    lora: int | None = 4,
    lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    iters: int = 50,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 3e-3,
    optimizer: str = "adamw",
    policy: str = "per-sample:importance",
    guidance: float | None = None,
    grad_clip: float | None = 1.0,
    autocast: torch.dtype | None = None,
    loss_scale: bool | None = None,
    memory_light: bool | None = None,
    chain_schedule=None,
    merge_adapters: bool = True,
    sample_shape: tuple[int, ...] | None = None,
    eval_noise: Tensor | None = None,
    eval_every: int = 5,
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int = 10,
    resume: bool = False,
    seed: int = 0,
    time_budget: float | None = None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` so that its samples maximise ``reward``.

    model: a zoo diffusion model (``model(x, t, labels)``) or any module ``model_fn`` calls.
    model_fn: ``model_fn(x, t)`` as in ``shortcut_sample``; default
        ``ClassConditional(model, labels)`` (``labels`` default: the null class).
    lora: LoRA rank (adapters on ``lora_targets`` of the diffusers backbone, peft), or None to
        train all weights.
    scheduler: with ``set_timesteps`` called (the number of calls of every chain).
    optimizer: ``adamw`` (default, no weight decay) or ``sgd``.
    autocast / loss_scale: model calls in bf16/fp16; fp16 uses a dynamic loss scale
        (``torch.amp.GradScaler``: a step whose gradients overflow is skipped and the scale
        lowered; the history logs ``loss_scale``) unless ``loss_scale=False``.
    policy: ``per-sample:importance`` (default: each sample keeps one call, drawn in proportion to
        its reach on the sample and reweighted; the uniform draws' expected gradient at far less
        variance), ``per-sample``, ``random[:importance]``, ``first``, ``fixed:k`` or a baseline.
    chain_schedule: a DiP-GO ``Schedule`` for the no-graph chain of the one-call policies (see
        ``shortcut_sample``): the calls no sample keeps reuse cached blocks, so an iteration
        costs less. ``random`` keeps one call for the whole batch, so only one row is made full;
        ``per-sample`` makes the row of every call some sample keeps full. The held-out reward
        is always evaluated with the full model.
    merge_adapters: run the calls that keep no graph (and the held-out evaluation) with the LoRA
        adapters merged into their base weights (restored bit-exactly after each chain; see
        ``shortcut_sample``).
    eval_noise: fixed held-out noise; the reward on it is logged every ``eval_every`` iterations
        (evaluation time is not counted in ``seconds``).
    checkpoint_dir / save_every / resume: the trainable weights, optimiser, generator and
        history are saved there; ``resume=True`` continues from the saved iteration.
    time_budget: stop after this many training seconds.
    Distributed: when ``torch.distributed`` is initialised (``torchrun``, ``accelerate launch``,
    or your own ``init_process_group``), ``batch_size`` is the global batch; every rank draws
    the same global noise and kept calls (same ``seed``) and runs its slice, and the gradients
    are averaged with ``all_reduce`` before each step: the weights stay identical on every rank
    and equal one process running the whole batch. Checkpoints are written by rank 0.
    Raises ``RewardError`` (the weights are not updated with a bad reward).
    """
    if iters < 0 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"need iters >= 0, batch_size >= 1, grad_accum >= 1; got {iters}, {batch_size}, {grad_accum}")
    if not callable(reward):
        raise TypeError(f"reward must be callable x0 -> [B], got {type(reward).__name__}")
    plan = Plan(scheduler)
    world, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} (the global batch) must divide by the world size {world}")
    local = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    pol = parse_policy(policy)
    if chain_schedule is not None:  # before the model gets adapters: a bad schedule changes nothing
        check_chain_schedule(chain_schedule, model, plan, pol)
    shape = tuple(sample_shape) if sample_shape is not None else _sample_shape(model)
    if model_fn is None:
        null = getattr(model, "null_label", None)
        if labels is None and null is None:
            raise ValueError("give model_fn (or labels for a zoo model)")
        model_fn = ClassConditional(model, null if labels is None else labels, guidance=guidance is not None)
    if lora:
        params = [p for n, p in _backbone(model).named_parameters() if "lora_" in n]
        if not params:
            params = add_lora(model, lora, targets=lora_targets, seed=seed)
        for p in params:
            p.requires_grad_(True)
    else:
        model.requires_grad_(True)
        params = trainable_parameters(model)
    model.eval()  # deterministic forward: the kept call is recomputed at backward
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    scaler = loss_scaler(autocast, loss_scale, params[0].device)
    gen = torch.Generator().manual_seed(int(seed))
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
                    "seconds": train_seconds, "policy": policy, "lora": lora, "lr": lr}, tmp)
        os.replace(tmp, ckpt)

    def evaluate(it):
        if eval_noise is not None:
            result.eval_history.append({"iter": it, "seconds": train_seconds,
                                        "reward_mean": evaluate_reward(model_fn, scheduler, reward, eval_noise,
                                                                       guidance, plan,
                                                                       merge_adapters=merge_adapters)})

    device = params[0].device
    dtype = params[0].dtype
    result.iterations = start_iter
    probs = plan.importance(0) if pol.importance else None  # the chain's call distribution: fixed
    if start_iter == 0:
        evaluate(0)
    bar = tqdm(range(start_iter, iters), desc=f"finetune ({policy})", disable=not progress)
    for it in bar:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        rewards = []
        for _ in range(grad_accum):
            # the global batch's noise and kept calls, the same on every rank; this rank's slice
            noise = torch.randn((batch_size, *shape), generator=gen)[local].to(device=device, dtype=dtype)
            run_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
            run_policy = pol
            if pol.one_call:
                kept = pol.kept_calls(0, plan.n, batch_size, run_gen, probs)
                weights = pol.grad_weights(kept, 0, probs)
                run_policy = Policy.given(kept[local], None if weights is None else weights[local])
            x0 = shortcut_sample(model_fn, scheduler, noise, run_policy, guidance=guidance, generator=run_gen,
                                 params=params, memory_light=memory_light, autocast=autocast, plan=plan,
                                 chain_schedule=chain_schedule, merge_adapters=merge_adapters)
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
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
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
        if eval_noise is not None and ((it + 1) % eval_every == 0 or it + 1 == iters):
            evaluate(it + 1)
        if callback:
            callback(entry)
        if ckpt is not None and ((it + 1) % save_every == 0 or it + 1 == iters):
            save()
        if time_budget is not None and train_seconds >= time_budget:
            if eval_noise is not None and result.eval_history[-1]["iter"] != it + 1:
                evaluate(it + 1)
            save()
            break
    bar.close()
    return result
