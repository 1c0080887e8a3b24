"""Bundled architectures (random weights, offline) and loading real weights from disk.

The JSON files in ``configs/`` are the public diffusers configs of the denoisers:

========== ================================================== ===========================
name       source (model card, config file)                   class
========== ================================================== ===========================
sd-1.5     runwayml/stable-diffusion-v1-5, unet/config.json    UNet2DConditionModel
sd-2.1     stabilityai/stable-diffusion-2-1, unet/config.json  UNet2DConditionModel
sdxl       stabilityai/stable-diffusion-xl-base-1.0, unet      UNet2DConditionModel
dit-xl-2   facebook/DiT-XL-2-256, transformer/config.json      DiTTransformer2DModel
========== ================================================== ===========================

Nothing is downloaded: :func:`build_model` instantiates the architecture with random
weights (use ``device="meta"`` for shape/MAC work without memory), :func:`load_model`
reads a local ``from_pretrained`` directory.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .adapters import SUPPORTED_CLASSES

_NAMES = {
    "sd-1.5": "sd-1.5.json",
    "sd-2.1": "sd-2.1.json",
    "sdxl": "sdxl.json",
    "dit-xl-2": "dit-xl-2.json",
}
_ALIASES = {
    "sd1.5": "sd-1.5", "sd15": "sd-1.5", "sd-15": "sd-1.5", "stable-diffusion-v1-5": "sd-1.5",
    "sd2.1": "sd-2.1", "sd21": "sd-2.1", "sd-21": "sd-2.1", "stable-diffusion-2-1": "sd-2.1",
    "sd-xl": "sdxl", "stable-diffusion-xl-base-1.0": "sdxl",
    "dit-xl/2": "dit-xl-2", "dit-xl2": "dit-xl-2", "dit-xl-2-256": "dit-xl-2",
}

def available_models() -> list[str]:
    """Names accepted by :func:`build_model` and :func:`model_config`."""
    return list(_NAMES)


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _NAMES:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(_NAMES)}")
    return key


def config_path(name: str):
    """Path (a ``Traversable``) of the bundled JSON config of ``name``."""
    return resources.files(__package__).joinpath("configs", _NAMES[_canonical(name)])


def model_config(name: str) -> dict:
    """The bundled diffusers config of ``name`` (a fresh dict; ``_class_name`` included)."""
    return json.loads(config_path(name).read_text(encoding="utf-8"))


def _model_class(class_name: str):
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"diffusers has no model class {class_name!r}")
    return cls


def build_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int | None = 0, overrides: dict | None = None) -> nn.Module:
    """Instantiate a bundled architecture with random weights, offline.

    ``device="meta"`` builds it without allocating weights (for block graphs / MACs).
    ``seed`` makes the random weights reproducible (``None``: the global RNG).
    ``overrides`` replaces config entries (e.g. ``{"num_layers": 2}`` for a shallow
    variant); unknown keys raise ValueError. SD-1.5 in float32 needs about 3.5 GB on CPU.
    """
    cfg = model_config(name)
    for k, v in (overrides or {}).items():
        if k.startswith("_") or k not in cfg:
            raise ValueError(f"override {k!r} is not a config entry of {_canonical(name)}; "
                             f"entries: {', '.join(x for x in cfg if not x.startswith('_'))}")
        cfg[k] = v
    cls = _model_class(cfg["_class_name"])
    init = {k: v for k, v in cfg.items() if not k.startswith("_")}
    dev = torch.device(device)
    if seed is None or dev.type == "meta":
        with dev:
            model = cls.from_config(init)
    else:
        with torch.random.fork_rng(devices=[]), dev:
            torch.manual_seed(seed)
            model = cls.from_config(init)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    return model.eval()


def _read_config(cfg_file: Path) -> dict:
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file} is not a readable JSON model config: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} is not a model config (expected a JSON object)")
    return cfg


_LOADABLE = set(SUPPORTED_CLASSES) | {"Transformer2DModel"}  # legacy DiT/PixArt checkpoints


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               subfolder: str | None = None) -> nn.Module:
    """Load real weights from a local diffusers directory (``from_pretrained``, offline).

    ``path`` is either a model directory (``config.json`` + weights) or a pipeline
    directory (``model_index.json``), in which case its ``unet`` or ``transformer``
    subfolder is loaded (or ``subfolder``). Raises FileNotFoundError when ``path`` does
    not exist and ValueError when it is not a supported diffusers model.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"model path does not exist: {root}")
    if not root.is_dir():
        raise ValueError(f"model path must be a diffusers model or pipeline directory, got a file: {root}")
    model_dir = root / subfolder if subfolder else root
    if subfolder and not model_dir.is_dir():
        raise FileNotFoundError(f"subfolder {subfolder!r} not found in {root}")
    if not (model_dir / "config.json").is_file():
        if (model_dir / "model_index.json").is_file():
            for sub in ("unet", "transformer"):
                if (model_dir / sub / "config.json").is_file():
                    model_dir = model_dir / sub
                    break
            else:
                raise ValueError(f"pipeline directory {root} has no unet/ or transformer/ model with a config.json")
        else:
            raise ValueError(f"{root} is not a diffusers model directory (no config.json or model_index.json)")
    cfg = _read_config(model_dir / "config.json")
    class_name = cfg.get("_class_name")
    if class_name not in _LOADABLE:
        raise ValueError(f"{model_dir}: model class {class_name!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_CLASSES)}")
    cls = _model_class(class_name)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        model = cls.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"could not load a {class_name} from {model_dir}: {e}") from e
    if type(model).__name__ not in SUPPORTED_CLASSES:
        raise ValueError(f"{model_dir}: loaded a {type(model).__name__}, which is not supported; "
                         f"supported: {', '.join(SUPPORTED_CLASSES)}")
    return model.to(device).eval()
