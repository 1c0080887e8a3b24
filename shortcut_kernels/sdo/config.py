"""The settings of SDO's sampling chains and of the two loops that run them.

:class:`ChainConfig` says how every chain runs (which call keeps its graph, guidance, noise,
precision, a cache schedule); ``shortcut_sample`` takes it, and :class:`OptimizeConfig` /
:class:`FinetuneConfig` carry one for each chain of ``optimize_latents`` / ``finetune``,
beside the loop's own settings. Objects with behaviour (the optimiser, the regulariser, the
stopping rule) are passed to the loops as arguments, not as settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .policy import Policy, parse_policy

__all__ = ["ChainConfig", "OptimizeConfig", "FinetuneConfig", "DEFAULT_LORA_TARGETS"]

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


@dataclass(frozen=True)
class ChainConfig:
    """How one sampling chain runs.

    policy: which call keeps its graph: ``first``, ``fixed:k``, ``random``, ``per-sample``,
        ``random:importance``, ``per-sample:importance``; or a baseline that keeps several,
        ``full``, ``draft:K``, ``alignprop`` (``sdo.policy``).
    guidance: the CFG scale ``w`` (``out_u + w * (out_c - out_u)``): the model returns
        ``(output_uncond, output_cond)``; None: it returns one output.
    eta: DDIM's noise weight.
    autocast: ``torch.bfloat16`` / ``torch.float16`` for the model calls, or None.
    loss_scale: a dynamic loss scale (``torch.amp.GradScaler``) in the loops; None: on exactly
        when autocasting to fp16.
    memory_light: one-call policies run the memory-light shortcut (None: True); False runs the
        reference autograd chain. Baselines always run the autograd chain.
    chain_schedule: a DiP-GO ``Schedule`` for the calls that keep no graph (one-call policies):
        they reuse cached blocks as it says; the kept calls compute everything.
    merge_adapters: the calls that keep no graph run with the model's LoRA adapters merged
        into their base weights (restored bit-exactly after).
    checkpoint: the baselines that keep several calls (``full``, ``draft:K``, ``alignprop``) run
        each kept call under activation checkpointing (memory of one call, a second forward
        at backward time); False keeps every activation: faster, where memory allows.
    """

    policy: str | Policy = "first"
    guidance: float | None = None
    eta: float = 0.0
    autocast: torch.dtype | None = None
    loss_scale: bool | None = None
    memory_light: bool | None = None
    chain_schedule: object | None = None
    merge_adapters: bool = True
    checkpoint: bool = True

    def __post_init__(self):
        object.__setattr__(self, "policy", parse_policy(self.policy))
        if self.guidance is not None:
            g = float(self.guidance)
            if not math.isfinite(g):
                raise ValueError(f"guidance must be finite, got {self.guidance}")
            object.__setattr__(self, "guidance", g)
        if self.autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {self.autocast}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.memory_light and not self.policy.one_call:
            raise ValueError(f"policy {str(self.policy)!r} keeps several calls: memory_light applies to one-call "
                             "policies")

    def with_policy(self, policy: str | Policy) -> "ChainConfig":
        return replace(self, policy=policy)

    @classmethod
    def of(cls, config: "ChainConfig | str | Policy | None") -> "ChainConfig":
        """A config from a config, a policy (a name, a ``Policy`` or one kept call per sample) or
        None (the defaults)."""
        if config is None:
            return cls()
        if isinstance(config, ChainConfig):
            return config
        return cls(policy=config)  # a policy: parse_policy says what it accepts

    def loss_scaler(self, device) -> torch.amp.GradScaler | None:
        """The dynamic loss scale of an fp16 run, or None."""
        use = (self.autocast == torch.float16) if self.loss_scale is None else bool(self.loss_scale)
        return torch.amp.GradScaler(torch.device(device).type) if use else None


@dataclass
class OptimizeConfig:
    """The settings of ``optimize_latents``.

    iters: optimisation steps (each one chain and one backward).
    decay_to: the learning rate follows a cosine from the optimiser's lr to ``decay_to`` times
        it over ``iters`` (1 keeps it constant): late steps of full length overshoot.
    keep_best: each sample's result is the best latent it had by the (exact) reward; else the
        latent after the last step, evaluated once more. With DDPM or eta > 0 every iteration
        draws the same noise (``result.noise_generator()``), so the result is reproducible.
    project: after each step, rescale each sample's latent back to its starting norm (on the
        Gaussian shell, for noise), so the sample stays a sample of the model.
    warmup_calls: run the first calls once and optimise the latent after them.
    grad_clip: clip each sample's latent gradient to this norm.
    seed: the generator of the chains' noise and policy draws (None: the global RNG).
    time_budget: stop after this many seconds (equal-wall-clock comparisons).
    chain: how each chain runs.
    """

    iters: int = 30
    decay_to: float = 0.2
    keep_best: bool = True
    project: bool = True
    warmup_calls: int = 0
    grad_clip: float | None = None
    seed: int | None = 0
    time_budget: float | None = None
    chain: ChainConfig = field(default_factory=ChainConfig)

    def __post_init__(self):
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if not 0 < self.decay_to <= 1:
            raise ValueError(f"decay_to must lie in (0, 1], got {self.decay_to}")
        if self.warmup_calls < 0:
            raise ValueError(f"warmup_calls must be >= 0, got {self.warmup_calls}")
        self.chain = ChainConfig.of(self.chain)


@dataclass
class FinetuneConfig:
    """The settings of ``finetune``.

    iters / batch_size / grad_accum: optimiser steps; samples per step (the global batch under
        ``torch.distributed``); chains whose gradients each step sums.
    lora / lora_targets: the LoRA rank of the adapters added to the diffusers backbone's
        ``lora_targets`` (peft), or None to train all weights.
    grad_clip: clip the weights' gradient to this global norm.
    eval_every: the held-out reward is evaluated every this many steps.
    save_every: with a checkpoint directory, save every this many steps.
    seed: the generator of the noise, the kept calls and the chains' draws.
    time_budget: stop after this many training seconds.
    chain: how each chain runs; the default policy draws each sample's kept call in proportion
        to its reach on the sample (``per-sample:importance``).
    """

    iters: int = 50
    batch_size: int = 8
    grad_accum: int = 1
    lora: int | None = 4
    lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS
    grad_clip: float | None = 1.0
    eval_every: int = 5
    save_every: int = 10
    seed: int = 0
    time_budget: float | None = None
    chain: ChainConfig = field(default_factory=lambda: ChainConfig(policy="per-sample:importance"))

    def __post_init__(self):
        if self.iters < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"need iters >= 0, batch_size >= 1, grad_accum >= 1; got {self.iters}, "
                             f"{self.batch_size}, {self.grad_accum}")
        self.chain = ChainConfig.of(self.chain)
