"""Rewards: any callable ``x0 -> [B]`` (higher is better), differentiable in ``x0``.

A reward may include a decoder: for latent diffusion models, ``reward(x0) =
score(vae.decode(x0 / vae.config.scaling_factor).sample)``. Built in here: the digits
classifier's log-probability of a target class (``digits_reward``). A CLIP or aesthetic
scorer plugs in the same way from local weights (nothing is downloaded), e.g.::

    clip = transformers.CLIPModel.from_pretrained("/path/to/clip", local_files_only=True)
    text = clip.get_text_features(**tokenizer(["a photo of a cat"], return_tensors="pt"))
    def clip_reward(x0):                       # x0: decoded images in [-1, 1], [B, 3, H, W]
        pix = F.interpolate((x0 + 1) / 2, size=224, mode="bilinear")
        pix = (pix - MEAN) / STD               # CLIP's normalisation constants
        img = clip.get_image_features(pixel_values=pix)
        return F.cosine_similarity(img, text)  # [B]
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Reward", "ClassifierReward", "ShiftAveraged", "digits_reward", "check_reward", "RewardError"]


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

    Measured on digits-unet (docs/sdo.md): latent optimisation for a digit with the zoo
    classifier's log-probability, shift 1, each sample frozen at p = 0.97: independent judges
    accept more samples, and the samples' FD against real digits falls to that of the model's
    own class samples. It costs ``(2 shift + 1)^2`` reward evaluations (cheap for a small
    classifier; for a CLIP scorer on a decoded image, weigh it against the sampler)."""

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


def digits_reward(target: int | Sequence[int] | Tensor, classifier: torch.nn.Module | None = None) -> ClassifierReward:
    """The zoo digits classifier's log-probability of ``target`` (images ``[B,1,16,16]`` in [-1, 1])."""
    if classifier is None:
        from ..zoo import metrics

        classifier = metrics.classifier()
    return ClassifierReward(classifier, target)


def as_reward(reward: Callable) -> Callable:
    if not callable(reward):
        raise TypeError(f"reward must be callable x0 -> [B], got {type(reward).__name__}")
    return reward
