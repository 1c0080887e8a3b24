"""The digits data set: scikit-learn's 1,797 real handwritten digits (shipped with
scikit-learn, no download), upsampled from 8x8 to 16x16 (bilinear) and scaled to [-1, 1],
with a fixed stratified 80/20 train/test split (1,437 / 360 images)."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.2

__all__ = ["load_digits", "augment", "IMAGE_SIZE", "NUM_CLASSES"]


@functools.lru_cache(maxsize=None)
def _load_all() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load
    from sklearn.model_selection import train_test_split

    d = _sk_load()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=TEST_FRACTION, stratify=d.target, random_state=SPLIT_SEED)
    return x, y, np.sort(tr), np.sort(te)


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` for ``split`` in {"train", "test", "all"}.

    images: float32 (N, 1, 16, 16) in [-1, 1]; labels: int64 (N,) in 0..9. The split is
    fixed (stratified, seed 0), so every call returns the same tensors (fresh copies).
    """
    x, y, tr, te = _load_all()
    if split == "train":
        idx = tr
    elif split == "test":
        idx = te
    elif split == "all":
        idx = np.arange(len(y))
    else:
        raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'all'")
    idx_t = torch.from_numpy(idx)
    return x[idx_t].clone(), y[idx_t].clone()


def augment(x: torch.Tensor, generator: torch.Generator | None = None, max_shift: int = 2) -> torch.Tensor:
    """Random integer shifts of up to ``max_shift`` pixels in each direction (background
    -1 fills the border), one shift per image."""
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    s = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    H, W = x.shape[-2:]
    for i in range(n):
        dy, dx = int(s[i, 0]), int(s[i, 1])
        out[i] = pad[i, :, dy:dy + H, dx:dx + W]
    return out
