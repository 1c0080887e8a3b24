"""The zoo models by name: where their weights and JSON records are, and ``load``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file

from . import models

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
NAMES = ("digits-unet", "digits-dit", "digits-classifier")

__all__ = ["NAMES", "WEIGHTS_DIR", "ZooModel", "load", "info", "weights_path"]


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
