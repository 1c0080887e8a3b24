"""Rewards: any callable ``x0 -> [B]`` (higher is better), differentiable in ``x0``.

Built in: a classifier's log-probability of a target class (``ClassifierReward``), CLIP's
image-text similarity (``ClipReward``, a ``transformers.CLIPModel`` from local weights:
nothing is downloaded), ``ShiftAveraged``, which averages a reward over small translations,
and ``Decoded``, which puts a latent model's VAE decoder in front of a pixel-space reward::

    clip = transformers.CLIPModel.from_pretrained("/path/to/clip", local_files_only=True)
    ids = transformers.CLIPTokenizer.from_pretrained("/path/to/clip")(["a photo of a cat"], return_tensors="pt")
    reward = sdo.Decoded(pipe.vae, sdo.ClipReward(clip, ids.input_ids, ids.attention_mask))
    sdo.optimize_latents(model_fn, pipe.scheduler, reward, x_T)

An aesthetic scorer is a head on CLIP's image embedding: ``ClipReward.image_embeds(x0)`` gives
that embedding (normalised) to put the head on.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Reward", "ClassifierReward", "ShiftAveraged", "ClipReward", "Decoded", "check_reward", "RewardError"]

# CLIP's image normalisation (the OpenAI checkpoints and the open_clip ones trained like them)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Reward(Protocol):
    def __call__(self, x0: Tensor) -> Tensor:  # [B]
        ...


class RewardError(ValueError):
    """A reward returned the wrong shape or non-finite values. ``result`` holds the run's
    state before the bad evaluation (nothing was updated with it)."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


def check_reward(value, batch: int, name: str = "reward") -> Tensor:
    """``value`` must be a tensor of shape ``[batch]`` with finite values."""
    if not isinstance(value, Tensor):
        raise RewardError(f"{name} must return a tensor of shape [{batch}], got {type(value).__name__}")
    if tuple(value.shape) != (batch,):
        raise RewardError(f"{name} must return one value per sample, shape [{batch}]; got {tuple(value.shape)}")
    if not bool(torch.isfinite(value.detach()).all()):
        bad = int((~torch.isfinite(value.detach())).sum())
        raise RewardError(f"{name} returned {bad} non-finite value(s) (nan/inf); nothing was updated")
    return value


class ClassifierReward(torch.nn.Module):
    """``log p(target | x0)`` under a classifier ``classifier(x) -> logits``. ``target`` is one
    class or one per sample; the classifier's weights are frozen."""

    def __init__(self, classifier: torch.nn.Module, target: int | Sequence[int] | Tensor,
                 num_classes: int | None = None):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        t = torch.as_tensor(target, dtype=torch.long).flatten()
        n = num_classes or getattr(classifier, "num_classes", None)
        if t.numel() == 0 or int(t.min()) < 0 or (n is not None and int(t.max()) >= n):
            raise ValueError(f"target must lie in 0..{(n or 1) - 1}, got {t.tolist()}")
        self.register_buffer("target", t, persistent=False)

    def forward(self, x0: Tensor) -> Tensor:
        p = next(self.classifier.parameters())
        logits = self.classifier(x0.to(p.dtype)).float()
        logp = torch.log_softmax(logits, dim=-1)
        target = self.target.to(logp.device)
        if target.numel() == 1:
            target = target.expand(x0.shape[0])
        elif target.numel() != x0.shape[0]:
            raise ValueError(f"{target.numel()} targets for a batch of {x0.shape[0]}")
        return logp.gather(1, target[:, None]).squeeze(1).to(x0.dtype)


class ShiftAveraged(torch.nn.Module):
    """``reward`` averaged over every translation of ``x0`` by up to ``shift`` pixels (the
    ``(2 shift + 1)^2`` shifts of the last two dims; ``fill``: the value shifted in, or None to
    repeat the edge). A classifier's score can be raised by a pixel pattern that only works
    where it is; the average over shifts cannot, so the optimisation moves the shape instead:
    the same idea as the random augmentations of CLIP-guided sampling, made deterministic so
    that the reward of a latent stays exact (``optimize_latents`` keeps each sample's best).
    It costs ``(2 shift + 1)^2`` reward evaluations (cheap for a small classifier; for a CLIP
    scorer on a decoded image, weigh it against the sampler)."""

    def __init__(self, reward: Callable, shift: int = 1, fill: float | None = None):
        super().__init__()
        if not callable(reward):
            raise TypeError(f"reward must be callable x0 -> [B], got {type(reward).__name__}")
        if int(shift) != shift or shift < 0:
            raise ValueError(f"shift must be a whole number of pixels >= 0, got {shift}")
        self.reward, self.shift, self.fill = reward, int(shift), fill

    def forward(self, x0: Tensor) -> Tensor:
        s = self.shift
        if s == 0:
            return self.reward(x0)
        if x0.dim() < 3:
            raise ValueError(f"x0 must be images [B, ..., H, W], got shape {tuple(x0.shape)}")
        h, w = x0.shape[-2:]
        if self.fill is None:
            lead = x0.shape[:-2]
            padded = F.pad(x0.reshape(-1, 1, h, w), (s, s, s, s), mode="replicate").reshape(*lead, h + 2 * s, w + 2 * s)
        else:
            padded = F.pad(x0, (s, s, s, s), value=float(self.fill))
        offsets = range(-s, s + 1)
        views = [padded[..., s + dy:s + dy + h, s + dx:s + dx + w] for dy in offsets for dx in offsets]
        # one call per view, not one call on a 9x batch: a reward may hold one target per sample
        return torch.stack([self.reward(v) for v in views]).mean(0)


class ClipReward(torch.nn.Module):
    """Cosine similarity between CLIP's embeddings of ``x0`` (images ``[B, 3, H, W]`` in
    [-1, 1]) and of a prompt. ``clip``: a ``transformers.CLIPModel`` (frozen here).

    text: the CLIP tokenizer's ``input_ids`` ``[1 or B, L]`` (with ``attention_mask``), or
        text embeddings ``[1 or B, projection_dim]`` computed before (floating point). One row
        serves the whole batch; B rows give each sample its own prompt.
    image_size: the side CLIP sees (default: its vision config's); the images are resized to
        it (bilinear, antialiased) and normalised with ``mean``/``std``.
    """

    def __init__(self, clip: torch.nn.Module, text: Tensor, attention_mask: Tensor | None = None,
                 image_size: int | None = None, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        for part in ("vision_model", "visual_projection", "text_model", "text_projection"):
            if not hasattr(clip, part):
                raise TypeError(f"clip must be a transformers CLIPModel (no .{part} on {type(clip).__name__})")
        self.clip = clip.eval().requires_grad_(False)
        if not isinstance(text, Tensor) or text.dim() != 2:
            raise ValueError("text must be input_ids [1 or B, L] or text embeddings [1 or B, projection_dim]")
        with torch.no_grad():
            if text.is_floating_point():
                emb = text
            else:
                device = next(clip.parameters()).device
                mask = attention_mask.to(device) if attention_mask is not None else None
                emb = clip.text_projection(clip.text_model(input_ids=text.to(device), attention_mask=mask).pooler_output)
        self.register_buffer("text", F.normalize(emb.float(), dim=-1), persistent=False)
        self.image_size = int(image_size or clip.config.vision_config.image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def pixel_values(self, x0: Tensor) -> Tensor:
        """``x0`` as CLIP's input: [0, 1], resized, normalised (float32)."""
        if x0.dim() != 4 or x0.shape[1] != 3:
            raise ValueError(f"x0 must be RGB images [B, 3, H, W] in [-1, 1], got shape {tuple(x0.shape)}")
        pix = (x0.float() + 1) / 2
        if tuple(pix.shape[-2:]) != (self.image_size, self.image_size):
            pix = F.interpolate(pix, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                                antialias=True)
        return (pix - self.mean.to(pix.device)) / self.std.to(pix.device)

    def image_embeds(self, x0: Tensor) -> Tensor:
        """CLIP's normalised image embedding of ``x0``, ``[B, projection_dim]``."""
        p = next(self.clip.parameters())
        pooled = self.clip.vision_model(pixel_values=self.pixel_values(x0).to(p.dtype)).pooler_output
        return F.normalize(self.clip.visual_projection(pooled).float(), dim=-1)

    def forward(self, x0: Tensor) -> Tensor:
        img = self.image_embeds(x0)
        text = self.text.to(img.device)
        if text.shape[0] not in (1, img.shape[0]):
            raise ValueError(f"{text.shape[0]} prompts for a batch of {img.shape[0]}: give 1 or {img.shape[0]}")
        return (img * text).sum(-1).to(x0.dtype)


class Decoded(torch.nn.Module):
    """``reward(vae.decode(z / scaling_factor + shift_factor).sample)``: a pixel-space reward
    on a latent diffusion model's final latent ``z`` (the factors from ``vae.config`` unless
    given: SD/SDXL have no shift, SD3/Flux VAEs do). The VAE is frozen; the gradient reaches
    ``z`` through the decoder."""

    def __init__(self, vae: torch.nn.Module, reward: Callable, scaling_factor: float | None = None,
                 shift_factor: float | None = None):
        super().__init__()
        if not hasattr(vae, "decode"):
            raise TypeError(f"vae must have .decode (a diffusers AutoencoderKL), got {type(vae).__name__}")
        if not callable(reward):
            raise TypeError(f"reward must be callable images -> [B], got {type(reward).__name__}")
        self.vae = vae.eval().requires_grad_(False)
        self.reward = reward
        cfg = getattr(vae, "config", {})
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.get("scaling_factor", 1.0))
        self.shift_factor = float(shift_factor if shift_factor is not None else (cfg.get("shift_factor") or 0.0))

    def forward(self, z: Tensor) -> Tensor:
        p = next(self.vae.parameters())
        images = self.vae.decode((z / self.scaling_factor + self.shift_factor).to(p.dtype)).sample
        return self.reward(images)


def as_reward(reward: Callable) -> Callable:
    if not callable(reward):
        raise TypeError(f"reward must be callable x0 -> [B], got {type(reward).__name__}")
    return reward
