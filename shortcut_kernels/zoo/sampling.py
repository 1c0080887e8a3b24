"""Classifier-free-guided sampling of the zoo diffusion models with any diffusers scheduler."""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from ..chain import Chain
from ..models.conditioning import ClassConditional
from .models import NULL_LABEL

__all__ = ["sample", "make_scheduler", "initial_noise"]


def make_scheduler(scheduler_config: dict, cls=None, **overrides):
    """Build a diffusers scheduler from a zoo scheduler config. ``cls`` is a scheduler class
    or its name (e.g. ``DDIMScheduler``, ``"DPMSolverMultistepScheduler"``); default
    DDIMScheduler."""
    import diffusers

    if cls is None:
        cls = diffusers.DDIMScheduler
    elif isinstance(cls, str):
        try:
            cls = getattr(diffusers, cls)
        except AttributeError:
            raise ValueError(f"diffusers has no scheduler class {cls!r}") from None
    return cls.from_config(dict(scheduler_config), **overrides)


def initial_noise(n: int, seed: int | None = None, generator: torch.Generator | None = None,
                  shape=(1, 16, 16)) -> torch.Tensor:
    """The starting noise ``sample`` uses for ``n`` images: float32 (n, *shape) on the CPU,
    one draw for all n, so the same seed gives the same noise whatever the batch size."""
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    return torch.randn((n, *shape), generator=generator, dtype=torch.float32)


def _labels_tensor(labels, n: int | None) -> torch.Tensor:
    if isinstance(labels, int):
        if n is None:
            raise ValueError("give n (the number of samples) when labels is a single int")
        labels = [labels] * n
    lab = torch.as_tensor(labels, dtype=torch.long).flatten()
    if lab.numel() == 0:
        raise ValueError("labels is empty")
    if int(lab.min()) < 0 or int(lab.max()) > NULL_LABEL:
        raise ValueError(f"labels must lie in 0..{NULL_LABEL} ({NULL_LABEL} = unconditional); got "
                         f"{int(lab.min())}..{int(lab.max())}")
    return lab


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    scheduler,
    labels: int | Sequence[int] | torch.Tensor,
    steps: int = 50,
    guidance: float = 3.0,
    *,
    n: int | None = None,
    seed: int | None = 0,
    noise: torch.Tensor | None = None,
    batch_size: int = 256,
    progress: bool = True,
    device: str | torch.device | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Sample one image per label with classifier-free guidance.

    model: a zoo diffusion model called as ``model(x, t, labels) -> eps``.
    scheduler: any diffusers scheduler instance (DDIM, DDPM, DPM-Solver, Euler, PNDM, ...);
        a zoo scheduler config dict is accepted too (DDIM is built from it). Build it from
        the zoo config (``make_scheduler(cfg, cls)``) so that it keeps the config's
        ``clip_sample=False`` and ``timestep_spacing="leading"``. The scheduler is reset
        with ``set_timesteps(steps)`` for every batch.
    labels: an int (with ``n``), a sequence or a tensor of digits 0..9 (10 = unconditional).
    guidance: eps = eps_uncond + guidance * (eps_cond - eps_uncond); 1.0 (or labels of 10)
        runs the conditional branch only.
    seed / noise: the starting noise is ``initial_noise(N, seed)`` unless ``noise``
        (N, 1, 16, 16) is given; stochastic schedulers draw from the same generator. Same
        seed, same images, whatever ``batch_size``, for deterministic schedulers.
    Returns float32 (N, 1, 16, 16) on the CPU, clamped to [-1, 1] unless ``clamp=False``.
    """
    if isinstance(scheduler, dict):
        scheduler = make_scheduler(scheduler)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lab = _labels_tensor(labels, n)
    N = lab.numel()
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    if noise is None:
        noise = initial_noise(N, generator=generator)
    elif noise.shape[0] != N:
        raise ValueError(f"noise has {noise.shape[0]} samples for {N} labels")
    if device is None:
        device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(total=((N + batch_size - 1) // batch_size) * steps, desc="sampling", disable=not progress, leave=False)
    try:
        for b0 in range(0, N, batch_size):
            lb = lab[b0:b0 + batch_size].to(device)
            scheduler.set_timesteps(steps, device=device)
            guided = guidance != 1.0 and bool((lb != NULL_LABEL).any())
            denoiser = ClassConditional(model, lb, guidance=guided, null_label=NULL_LABEL)
            chain = Chain(scheduler, float(guidance) if guided else None, generator=generator)
            x = chain.first_latent(noise[b0:b0 + batch_size].to(device=device, dtype=torch.float32))
            x = chain.run(x, lambda i, x_in, t: denoiser(x_in.to(dtype), t), progress=bar)
            out.append(x.float().cpu())
    finally:
        bar.close()
        model.train(was_training)
    x = torch.cat(out)
    return x.clamp(-1.0, 1.0) if clamp else x
