"""SDO: the one-step gradient shortcut through a diffusion sampler (docs/design.md).

    from shortcut_kernels import sdo
    x0 = sdo.shortcut_sample(model_fn, scheduler, x_T, "first")          # one call keeps its graph
    reward(x0).sum().backward()                                         # gradient to x_T / weights

Submodules: ``config`` (ChainConfig and the loops' configs), ``chain`` (shortcut_sample,
warmup), ``policy``, ``rewards``, ``optimize`` (optimize_latents), ``finetuning`` (finetune,
LoRA save/load), ``lora_merge``. Imported lazily: this package stays light. The ``sdo``
command lives in ``shortcut_kernels.zoo.sdo_commands``.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "shortcut_sample": "chain", "warmup": "chain", "WarmStart": "chain",
    "ClassConditional": "..models.conditioning", "TextConditional": "..models.conditioning",
    "DiTConditional": "..models.conditioning", "Plan": "..samplers", "Policy": "policy", "parse_policy": "policy",
    "ClassifierReward": "rewards", "ShiftAveraged": "rewards", "ClipReward": "rewards", "Decoded": "rewards",
    "check_reward": "rewards",
    "optimize_latents": "optimize", "OptimizeResult": "optimize", "gaussian_shell": "optimize",
    "gaussian_prior": "optimize", "NormalizedAscent": "optimize",
    "ChainConfig": "config", "OptimizeConfig": "config", "FinetuneConfig": "config", "RewardTarget": "optimize",
    "latent_regularizer": "optimize", "latent_optimizer": "optimize", "finetune": "finetuning", "weight_optimizer": "finetuning", "FinetuneResult": "finetuning", "add_lora": "finetuning",
    "save_lora": "finetuning", "load_lora": "finetuning",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        where = _EXPORTS[name]  # "..x": a module below sdo, re-exported for convenience
        module = importlib.import_module(where if where.startswith("..") else f".{where}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
