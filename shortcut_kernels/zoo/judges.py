"""Independent judges of digit samples: models that the reward's CNN (``zoo.metrics.classifier``)
has never seen, so that a sample optimised for the reward can be checked by something it was not
optimised against (reward hacking shows as the reward's CNN accepting what the judges reject).

    svm = svm_judge()           # RBF SVM on pixels: another model family
    cnn = cnn_judge()           # a CNN of another design, trained from its own seed
    judged_fractions(images, 7, svm, cnn)
    diversity(images, 7)        # FD and spread against the real 7s
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .data import load_digits
from .metrics import digits_fd

__all__ = ["Judge", "svm_judge", "cnn_judge", "judged_fractions", "diversity"]


@dataclass
class Judge:
    """``predict(images [N,1,16,16]) -> labels (numpy)`` and its accuracy on the real test digits."""

    predict: Callable[[torch.Tensor], np.ndarray]
    test_accuracy: float


def svm_judge() -> Judge:
    """An RBF SVM on the real train digits: a different model family from the reward's CNN."""
    from sklearn.svm import SVC

    x, y = load_digits("train")
    xt, yt = load_digits("test")
    clf = SVC(C=10.0, gamma="scale").fit(x.flatten(1).numpy(), y.numpy())

    def predict(images: torch.Tensor) -> np.ndarray:
        return clf.predict(images.detach().float().cpu().flatten(1).numpy())

    return Judge(predict, float((predict(xt) == yt.numpy()).mean()))


def cnn_judge() -> Judge:
    """A small CNN of another design than the reward's (5x5 then 3x3 convolutions, GELU, average
    pooling), trained here from its own seed with +-1 px shifts. The SVM reads pixels; this one
    accepts heavier strokes that the SVM rejects, so the two disagree where it matters."""
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    gen = torch.Generator().manual_seed(123)
    with torch.random.fork_rng():
        torch.manual_seed(123)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 5, padding=2), torch.nn.GELU(), torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(60):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
            loss = torch.nn.functional.cross_entropy(net(torch.roll(x[b], (dy, dx), (2, 3))), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)

    def predict(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return net(images.detach().cpu().reshape(-1, 1, 16, 16).float()).argmax(1).numpy()

    return Judge(predict, float((predict(xt) == yt.numpy()).mean()))


def judged_fractions(images: torch.Tensor, digit: int, svm: Judge, cnn: Judge) -> dict:
    """Fraction of ``images`` each independent judge (the SVM, the CNN) assigns to ``digit``."""
    return {"judged_target_fraction": float((svm.predict(images) == digit).mean()),
            "judged_target_fraction_cnn": float((cnn.predict(images) == digit).mean())}


def _mean_pairwise(x: torch.Tensor) -> float:
    x = x.detach().double().cpu().flatten(1)
    d = torch.cdist(x, x)
    n = len(x)
    return (d.sum() / (n * (n - 1))).item() / x.shape[1] ** 0.5


def diversity(images: torch.Tensor, digit: int) -> dict:
    """How much ``images`` (meant to be ``digit``) still look like a varied set of real ``digit``s:
    the digits-FD against the real train images of that digit, and the mean pairwise RMS pixel
    distance of the samples over that of the real ones (1: as varied; a collapsed set -> 0)."""
    x, y = load_digits("train")
    real = x[y == digit]
    return {"fd_to_real_digit": digits_fd(images, reference=real),
            "spread_over_real": _mean_pairwise(images) / _mean_pairwise(real)}
