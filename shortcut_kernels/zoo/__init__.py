"""Embedded default models, trained by this package's own scripts on scikit-learn's
handwritten digits (16x16, [-1, 1]). The zoo is a user of the library: it holds the
models, their metrics, the digits reward and the DiP-GO evaluation on them
(:mod:`.dipgo_eval`, imported on its own).

    from shortcut_kernels import zoo
    model, scheduler_config = zoo.load("digits-unet")
    images = zoo.sample(model, zoo.make_scheduler(scheduler_config), labels=range(10), steps=50, guidance=3.0)
    zoo.metrics.class_accuracy(images, range(10))
    reward = zoo.digits_reward(7)         # log p(7 | x0) under the zoo classifier, for SDO

Models: ``digits-unet`` (class-conditional UNet2DConditionModel), ``digits-dit``
(class-conditional DiTTransformer2DModel), ``digits-classifier`` (CNN; its penultimate
features define the digits Fréchet distance). Reproduce the weights with
``python -m shortcut_kernels.zoo.train NAME``.
"""
from __future__ import annotations

from . import data, judges, metrics, models, rewards
from .data import load_digits
from .models import NULL_LABEL, DigitsClassifier, DigitsDiT, DigitsUNet
from .registry import NAMES, WEIGHTS_DIR, ZooModel, info, load, weights_path
from .rewards import digits_reward
from .sampling import initial_noise, make_scheduler, sample

__all__ = [
    "NAMES", "WEIGHTS_DIR", "NULL_LABEL", "ZooModel", "load", "info", "weights_path",
    "sample", "make_scheduler", "initial_noise", "load_digits", "metrics", "models", "data",
    "rewards", "digits_reward", "DigitsUNet", "DigitsDiT", "DigitsClassifier",
]
