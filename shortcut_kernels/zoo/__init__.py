"""Embedded default models, trained by this package's own scripts on scikit-learn's
handwritten digits (16x16, [-1, 1]); see DESIGN.md section 7.

    from shortcut_kernels import zoo
    model, scheduler_config = zoo.load("digits-unet")
    images = zoo.sample(model, zoo.make_scheduler(scheduler_config), labels=range(10), steps=50, guidance=3.0)
    zoo.metrics.class_accuracy(images, range(10))

Models: ``digits-unet`` (class-conditional UNet2DConditionModel), ``digits-dit``
(class-conditional DiTTransformer2DModel), ``digits-classifier`` (CNN; its penultimate
features define the digits Fréchet distance). Reproduce the weights with
``python -m shortcut_kernels.zoo.train NAME``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from . import data, metrics, models
from .data import load_digits
from .models import NULL_LABEL, DigitsClassifier, DigitsDiT, DigitsUNet
from .sampling import initial_noise, make_scheduler, sample

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
NAMES = ("digits-unet", "digits-dit", "digits-classifier")

__all__ = [
    "NAMES", "WEIGHTS_DIR", "NULL_LABEL", "ZooModel", "load", "info", "weights_path",
    "sample", "make_scheduler", "initial_noise", "load_digits", "metrics", "models", "data",
    "DigitsUNet", "DigitsDiT", "DigitsClassifier",
]


class _ModelAndScheduler(NamedTuple):
    model: torch.nn.Module
    scheduler_config: dict | None  # None for the classifier


class ZooModel(_ModelAndScheduler):
    """What ``load`` returns: unpacks as ``model, scheduler_config``; ``.info`` is the
    model's JSON record (kind, configs, training record, measured metrics)."""

    info: dict

    def __new__(cls, model: torch.nn.Module, scheduler_config: dict | None, info: dict):
        self = super().__new__(cls, model, scheduler_config)
        self.info = info
        return self


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(NAMES)}")
    return name


def weights_path(name: str, weights_dir: str | Path | None = None) -> Path:
    """Path of ``name``'s safetensors file (it need not exist)."""
    return Path(weights_dir or WEIGHTS_DIR) / f"{_check_name(name)}.safetensors"


def info(name: str, weights_dir: str | Path | None = None) -> dict:
    """The JSON record of ``name``: kind, model and scheduler configs, training record."""
    p = Path(weights_dir or WEIGHTS_DIR) / f"{_check_name(name)}.json"
    if not p.is_file():
        raise FileNotFoundError(f"zoo model {name!r}: config file not found: {p} "
                                f"(reproduce it with `python -m shortcut_kernels.zoo.train {name}`)")
    return json.loads(p.read_text())


def load(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         weights_dir: str | Path | None = None) -> ZooModel:
    """Load zoo model ``name`` (one of ``NAMES``) in eval mode.

    Returns ``ZooModel``, which unpacks as ``model, scheduler_config`` and carries the
    JSON record as ``.info``. Diffusion models are called as
    ``model(x, t, labels) -> eps`` (``model.backbone`` is the plain diffusers model);
    the classifier as ``model(x) -> logits`` and ``model.features(x)``.
    Raises ValueError for an unknown name (listing the valid ones) and FileNotFoundError,
    naming the path, when the weights or config file is missing.
    """
    from safetensors.torch import load_file

    _check_name(name)
    wp = weights_path(name, weights_dir)
    if not wp.is_file():
        raise FileNotFoundError(f"zoo model {name!r}: weights file not found: {wp} "
                                f"(reproduce it with `python -m shortcut_kernels.zoo.train {name}`)")
    meta = info(name, weights_dir)
    model = models.build(meta["kind"], meta["model_config"])
    state = load_file(str(wp))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"zoo model {name!r}: weights {wp} do not match the architecture "
                           f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sched = meta.get("scheduler_config")
    return ZooModel(model, dict(sched) if sched is not None else None, meta)
