"""Conditioned denoisers as ``model_fn(x, t)``: the form every sampling chain calls.

With guidance, one batched call on the doubled batch (the unconditional half first) returns
``(output_uncond, output_cond)``; :func:`guidance_batch` builds that batch for the
class-conditional models.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ClassConditional", "TextConditional", "DiTConditional", "guidance_batch", "sample_shape"]


def sample_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """``(C, H, W)`` of one sample, from the config of ``model`` (or of its ``.backbone``, as the
    zoo models wrap a diffusers model)."""
    cfg = getattr(getattr(model, "backbone", model), "config", None)
    if cfg is not None and "in_channels" in cfg and "sample_size" in cfg:
        size = cfg["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg["in_channels"], *size)
    raise ValueError("give sample_shape=(C, H, W): it cannot be read from the model's config")


def guidance_batch(x: Tensor, t, labels: Tensor, null_label: int) -> tuple[Tensor, Tensor, Tensor]:
    """Classifier-free guidance as one call on a doubled batch: ``(x, t, labels)`` with the
    unconditional half (``null_label``) first. A 0-d ``t`` stays 0-d."""
    return torch.cat([x, x]), _doubled_timestep(t, x), torch.cat([torch.full_like(labels, int(null_label)), labels])


def _doubled_timestep(t, like: Tensor) -> Tensor:
    """The timestep of a doubled batch: per-sample timesteps twice, a 0-d one as it is."""
    t = torch.as_tensor(t, device=like.device)
    return torch.cat([t, t]) if t.ndim else t


class ClassConditional(torch.nn.Module):
    """A zoo model (``model(x, t, labels)``) as an SDO ``model_fn(x, t)``: returns
    ``(eps_uncond, eps_cond)`` (one batched call) when ``guidance`` is on, else the output for
    ``labels`` (e.g. all ``NULL_LABEL`` for the unconditional model)."""

    def __init__(self, model: torch.nn.Module, labels, guidance: bool = False, null_label: int | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("labels", torch.as_tensor(labels, dtype=torch.long).flatten(), persistent=False)
        self.guidance = bool(guidance)
        self.null_label = int(null_label if null_label is not None else getattr(model, "null_label", 10))

    def forward(self, x: Tensor, t) -> Tensor | tuple[Tensor, Tensor]:
        labels = self.labels.to(x.device)
        if labels.numel() == 1:
            labels = labels.expand(x.shape[0])
        if not self.guidance:
            return self.model(x, t, labels)
        uncond, cond = self.model(*guidance_batch(x, t, labels, self.null_label)).chunk(2)
        return uncond, cond


class TextConditional(torch.nn.Module):
    """A diffusers text-conditioned UNet (``UNet2DConditionModel``: SD-1.x/2.x, SDXL) as an
    SDO ``model_fn(x, t)``.

    prompt_embeds: ``[1 or B, tokens, dim]`` from the pipeline's text encoder (e.g.
        ``pipe.encode_prompt``); one row is broadcast over the batch.
    negative_prompt_embeds: the unconditional embeddings; given, the call is one batched
        pass returning ``(eps_uncond, eps_cond)`` for classifier-free guidance.
    added_cond_kwargs: SDXL's ``{"text_embeds": [1 or B, d], "time_ids": [1 or B, 6]}``, for
        the conditional half; ``negative_added_cond_kwargs`` for the unconditional one (default:
        the same).
    """

    def __init__(self, unet: torch.nn.Module, prompt_embeds: Tensor, negative_prompt_embeds: Tensor | None = None,
                 added_cond_kwargs: dict | None = None, negative_added_cond_kwargs: dict | None = None):
        super().__init__()
        self.model = unet
        if prompt_embeds.dim() != 3:
            raise ValueError(f"prompt_embeds must be [1 or B, tokens, dim], got shape {tuple(prompt_embeds.shape)}")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:]:
            raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} does not match "
                             f"prompt_embeds {tuple(prompt_embeds.shape)} after the batch dimension")
        self.cond, self.uncond = prompt_embeds, negative_prompt_embeds
        self.added = dict(added_cond_kwargs or {})
        self.negative_added = dict(negative_added_cond_kwargs or self.added)
        self.guidance = negative_prompt_embeds is not None

    @staticmethod
    def _rows(t: Tensor, batch: int, name: str) -> Tensor:
        if t.shape[0] == batch:
            return t
        if t.shape[0] != 1:
            raise ValueError(f"{name} has {t.shape[0]} rows for a batch of {batch}: give 1 or {batch}")
        return t.expand(batch, *t.shape[1:])

    def _kwargs(self, embeds: Tensor, added: dict, batch: int, like: Tensor, which: str) -> dict:
        kw = {"encoder_hidden_states": self._rows(embeds, batch, which).to(like.device)}
        if added:
            kw["added_cond_kwargs"] = {k: self._rows(v, batch, f"{which} {k}").to(like.device)
                                       for k, v in added.items()}
        return kw

    def forward(self, x: Tensor, t) -> Tensor | tuple[Tensor, Tensor]:
        n = x.shape[0]
        cond = self._kwargs(self.cond, self.added, n, x, "prompt_embeds")
        if not self.guidance:
            return self.model(x, t, **cond, return_dict=False)[0]
        uncond = self._kwargs(self.uncond, self.negative_added, n, x, "negative_prompt_embeds")
        t2 = _doubled_timestep(t, x)
        both = {"encoder_hidden_states": torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])}
        if "added_cond_kwargs" in cond:
            both["added_cond_kwargs"] = {k: torch.cat([uncond["added_cond_kwargs"][k], v])
                                         for k, v in cond["added_cond_kwargs"].items()}
        out = self.model(torch.cat([x, x]), t2, **both, return_dict=False)[0]
        eu, ec = out.chunk(2)
        return eu, ec


class DiTConditional(torch.nn.Module):
    """A diffusers class-conditional transformer (``DiTTransformer2DModel``: DiT-XL/2) as an SDO
    ``model_fn(x, t)``: the eps channels of its output (a learned-sigma model's variance half is
    dropped, as ``DiTPipeline`` does). With ``guidance``, one batched call returns
    ``(eps for null_class, eps for class_labels)``; ``null_class`` defaults to the model's
    number of classes (1000 for DiT-XL/2), the label its pipeline uses."""

    def __init__(self, transformer: torch.nn.Module, class_labels, guidance: bool = False,
                 null_class: int | None = None):
        super().__init__()
        cfg = getattr(transformer, "config", None)
        if cfg is None or "in_channels" not in cfg:
            raise TypeError(f"transformer must be a diffusers model with a config, got {type(transformer).__name__}")
        self.model = transformer
        self.channels = int(cfg["in_channels"])
        self.register_buffer("labels", torch.as_tensor(class_labels, dtype=torch.long).flatten(), persistent=False)
        if null_class is None:
            null_class = cfg.get("num_embeds_ada_norm")
        if guidance and null_class is None:
            raise ValueError("give null_class: the model's config has no num_embeds_ada_norm")
        self.guidance, self.null_class = bool(guidance), null_class

    def forward(self, x: Tensor, t) -> Tensor | tuple[Tensor, Tensor]:
        n = x.shape[0]
        labels = self.labels.to(x.device)
        if labels.numel() == 1:
            labels = labels.expand(n)
        elif labels.numel() != n:
            raise ValueError(f"{labels.numel()} class labels for a batch of {n}: give 1 or {n}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(n) if t.ndim == 0 else t
        if not self.guidance:
            return self.model(x, timestep=t, class_labels=labels).sample[:, :self.channels]
        xx, tt, ll = guidance_batch(x, t, labels, self.null_class)
        out = self.model(xx, timestep=tt, class_labels=ll).sample
        eu, ec = out[:, :self.channels].chunk(2)
        return eu, ec
