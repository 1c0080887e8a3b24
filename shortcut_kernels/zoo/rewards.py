"""The digits reward for SDO: the zoo classifier's log-probability of a target digit.

    reward = digits_reward(7)                      # x0 [B, 1, 16, 16] in [-1, 1] -> [B]
    sdo.optimize_latents(model_fn, scheduler, reward, x_T)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..sdo.rewards import ClassifierReward
from .metrics import classifier as zoo_classifier

__all__ = ["digits_reward"]


def digits_reward(target: int | Sequence[int] | Tensor, classifier: torch.nn.Module | None = None) -> ClassifierReward:
    """The zoo digits classifier's log-probability of ``target`` (images ``[B,1,16,16]`` in [-1, 1]);
    ``classifier`` replaces the zoo one (e.g. a float64 copy)."""
    return ClassifierReward(zoo_classifier() if classifier is None else classifier, target)
