"""Architectures of the zoo models and thin wrappers giving them one calling convention.

The diffusion wrappers keep the diffusers model itself a plain ``UNet2DConditionModel``
(``.unet``) or ``DiTTransformer2DModel`` (``.transformer``), also reachable as
``.backbone``, so the package's model adapters apply to them unchanged. Both wrappers are
called as ``model(x, t, labels) -> eps`` with labels in 0..9, or ``NULL_LABEL`` (10) for
the unconditional (classifier-free guidance) branch.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IMAGE_SIZE, NUM_CLASSES

NULL_LABEL = NUM_CLASSES  # index of the learned "no class" embedding

__all__ = [
    "NULL_LABEL",
    "UNET_CONFIG",
    "DIT_CONFIG",
    "CLASSIFIER_CONFIG",
    "SCHEDULER_CONFIG",
    "DigitsUNet",
    "DigitsDiT",
    "DigitsClassifier",
    "build",
]

# Training noise schedule shared by both diffusion models (a DDPMScheduler config; any
# diffusers scheduler can be built from it with ``Cls.from_config``).
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    # No x0 clipping inside the samplers: DDIM's clip_sample clips x0 but keeps the
    # unclipped eps, which with guidance 3 washes the background out to grey and costs class
    # accuracy. ``sample`` clamps the final images to [-1, 1] instead.
    "clip_sample": False,
    # "leading" spacing (DDIM's and PNDM's default) for every scheduler built from this
    # config: the cosine schedule's last timesteps have near-zero SNR (sigma ~ 645 at t=999),
    # and sigma-space samplers (Euler, DPM-Solver, UniPC, LMS, Heun) that start there
    # amplify the eps error about 645-fold and lose class accuracy at few steps.
    "timestep_spacing": "leading",
}

UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

DIT_CONFIG = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,  # diffusers adds one more row: the null class (10)
    "norm_type": "ada_norm_zero",
}

CLASSIFIER_CONFIG = {"width": 32, "feature_dim": 64, "num_classes": NUM_CLASSES}


def _timesteps(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


class DigitsUNet(nn.Module):
    """Class-conditional UNet: an ``nn.Embedding`` of 11 entries (10 digits + null) gives
    the ``encoder_hidden_states`` (sequence length 1) of a plain UNet2DConditionModel."""

    kind = "unet"
    num_classes = NUM_CLASSES
    null_label = NULL_LABEL

    def __init__(self, config: dict | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.model_config = copy.deepcopy(config or UNET_CONFIG)
        self.unet = UNet2DConditionModel(**self.model_config)
        self.class_embed = nn.Embedding(NUM_CLASSES + 1, self.model_config["cross_attention_dim"])

    @property
    def backbone(self) -> nn.Module:
        return self.unet

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """``encoder_hidden_states`` (B, 1, D) for labels (B,) in 0..10."""
        return self.class_embed(labels.to(self.class_embed.weight.device).long())[:, None, :]

    def forward(self, x: torch.Tensor, t, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, _timesteps(t, x), encoder_hidden_states=self.condition(labels)).sample


class DigitsDiT(nn.Module):
    """Class-conditional DiT: a plain DiTTransformer2DModel, conditioned through its own
    ``class_labels`` input (label 10 is its built-in null class). Its built-in random label
    dropout is switched off, so the forward is deterministic in train mode too; the
    training script drops labels itself."""

    kind = "dit"
    num_classes = NUM_CLASSES
    null_label = NULL_LABEL

    def __init__(self, config: dict | None = None):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.model_config = copy.deepcopy(config or DIT_CONFIG)
        self.transformer = DiTTransformer2DModel(**self.model_config)
        for m in self.transformer.modules():
            if type(m).__name__ == "LabelEmbedding":
                m.dropout_prob = 0.0  # the table keeps its 11th (null) row

    @property
    def backbone(self) -> nn.Module:
        return self.transformer

    def forward(self, x: torch.Tensor, t, labels: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=_timesteps(t, x), class_labels=labels.to(x.device).long()).sample


class DigitsClassifier(nn.Module):
    """Small CNN digit classifier for 16x16 inputs in [-1, 1]. ``features(x)`` (the
    penultimate layer, ``feature_dim`` wide) defines the digits Fréchet distance."""

    kind = "classifier"
    num_classes = NUM_CLASSES

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.model_config = copy.deepcopy(config or CLASSIFIER_CONFIG)
        w, f = self.model_config["width"], self.model_config["feature_dim"]
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
        )
        self.fc = nn.Linear(2 * w * 16, f)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(f, self.model_config["num_classes"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


_KINDS = {"unet": DigitsUNet, "dit": DigitsDiT, "classifier": DigitsClassifier}


def build(kind: str, config: dict | None = None) -> nn.Module:
    """An untrained model of ``kind`` ("unet", "dit", "classifier")."""
    try:
        cls = _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(_KINDS)}") from None
    return cls(config)
