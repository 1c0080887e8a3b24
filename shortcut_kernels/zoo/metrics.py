"""Quality metrics for digit samples.

- ``class_accuracy``: fraction of conditional samples that the zoo classifier assigns to
  their class.
- ``digits_fd``: Fréchet distance between the zoo classifier's penultimate features of a
  set of images and those of a reference set (default: the real test split).
- ``memorisation``: how close samples lie to their nearest training image, against the
  same distance for held-out real digits (a model that copies its training set puts its
  samples much closer than new real digits are).
- ``psnr``: peak signal-to-noise ratio of a sample against a reference sample (e.g. a
  pruned/cached sampler vs. the full one, from the same noise); ``inf`` for identical images.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from .data import load_digits
from .registry import load

__all__ = ["classifier", "predict", "features", "class_accuracy", "frechet_distance", "digits_fd",
           "reference_features", "nearest_train_distance", "memorisation", "psnr"]


@functools.lru_cache(maxsize=1)
def classifier() -> torch.nn.Module:
    """The zoo digits classifier (loaded once, CPU, eval mode)."""
    return load("digits-classifier").model


def _check_images(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1:] != (1, 16, 16):
        raise ValueError(f"expected images of shape (N, 1, 16, 16), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no images")
    return x


@torch.no_grad()
def _run(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    x = _check_images(x)
    clf = fn.__self__ if hasattr(fn, "__self__") else None
    p = next(clf.parameters()) if clf is not None else None
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        if p is not None:
            xb = xb.to(device=p.device, dtype=p.dtype)
        outs.append(fn(xb).float().cpu())
    return torch.cat(outs)


def predict(images: torch.Tensor, model: torch.nn.Module | None = None, batch_size: int = 512) -> torch.Tensor:
    """Predicted digit (N,) of each image (N, 1, 16, 16) in [-1, 1]."""
    model = model or classifier()
    return _run(model.forward, images, batch_size).argmax(1)


def features(images: torch.Tensor, model: torch.nn.Module | None = None, batch_size: int = 512) -> torch.Tensor:
    """Classifier penultimate features (N, D), float32."""
    model = model or classifier()
    return _run(model.features, images, batch_size)


def class_accuracy(images: torch.Tensor, labels: int | Sequence[int] | torch.Tensor,
                   model: torch.nn.Module | None = None) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels`` (one per image, or one int)."""
    pred = predict(images, model)
    lab = torch.as_tensor(labels, dtype=torch.long).flatten()
    if lab.numel() == 1:
        lab = lab.expand(pred.shape[0])
    if lab.shape != pred.shape:
        raise ValueError(f"{pred.shape[0]} images but {lab.numel()} labels")
    return (pred == lab).float().mean().item()


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1, f2) -> float:
    """Fréchet distance between Gaussians fitted to feature sets f1 (N1, D) and f2 (N2, D):
    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64. Needs N >= 2."""
    f1 = np.asarray(torch.as_tensor(f1).double().cpu())
    f2 = np.asarray(torch.as_tensor(f2).double().cpu())
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {f1.shape} and {f2.shape}")
    if f1.shape[0] < 2 or f2.shape[0] < 2:
        raise ValueError("each feature set needs at least 2 samples")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_cross)
    return max(fd, 0.0)


@functools.lru_cache(maxsize=4)
def _reference_features(split: str) -> torch.Tensor:
    return features(load_digits(split)[0])


def reference_features(split: str = "test") -> torch.Tensor:
    """Classifier features of the real digits of ``split`` ("train", "test", "all"), cached."""
    return _reference_features(split).clone()


def digits_fd(images: torch.Tensor, reference: str | torch.Tensor = "test",
              model: torch.nn.Module | None = None) -> float:
    """Digits Fréchet distance of ``images`` against ``reference``: a split name of the
    real digits (default "test", 360 images) or a tensor of reference images. Lower is
    better. The real train split against the test split is the reference point (recorded as
    ``reference_fd_train_vs_test`` in the model JSONs' ``metrics``)."""
    f = features(images, model)
    if isinstance(reference, str) and model is None:
        ref = reference_features(reference)
    elif isinstance(reference, str):
        ref = features(load_digits(reference)[0], model)
    else:
        ref = features(reference, model)
    return frechet_distance(f, ref)


def nearest_train_distance(images: torch.Tensor) -> torch.Tensor:
    """(N,) RMS pixel distance of each image to its nearest image of the training split."""
    x = _check_images(images).detach().double().cpu().flatten(1)
    train = load_digits("train")[0].double().flatten(1)
    return (torch.cdist(x, train).min(1).values / math.sqrt(x.shape[1])).float()


def memorisation(images: torch.Tensor) -> dict:
    """Nearest-training-image distances of ``images`` against those of the held-out test
    digits (real digits the models never saw): the medians of both, their ratio (about 1
    or above for a model that generalises, well below 1 for one that copies), and the
    fraction of samples closer to a training image than the closest 5% of held-out digits."""
    samples = nearest_train_distance(images)
    held_out = nearest_train_distance(load_digits("test")[0])
    near = torch.quantile(held_out, 0.05)
    return {
        "nn_train_distance_median": samples.median().item(),
        "nn_train_distance_median_held_out": held_out.median().item(),
        "nn_distance_ratio": (samples.median() / held_out.median()).item(),
        "fraction_closer_than_held_out_p5": (samples < near).float().mean().item(),
    }


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0,
         per_image: bool = False):
    """PSNR in dB of ``images`` against ``reference`` (same shape; [-1, 1] data, so
    ``data_range`` 2). Over the whole set by default (one MSE), or a (N,) tensor with
    ``per_image=True``. Identical inputs give ``inf``."""
    a = torch.as_tensor(images).double()
    b = torch.as_tensor(reference).double()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("empty input")
    if per_image:
        mse = (a - b).pow(2).flatten(1).mean(1)
        return (10.0 * torch.log10(data_range ** 2 / mse)).float()  # mse 0 -> inf
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)
