"""DiP-GO's two losses: consistency with the full model, and sparsity of the kept MACs.

* :func:`consistency_loss` compares the pruned sample with the full model's sample from
  the same noise: ``mse``, ``l1``, ``ssim`` (``1 - SSIM``, the paper's choice on decoded
  images) or ``ssim+l1``.
* :func:`sparsity_loss` is the kept-MAC share of the *cascaded* gates, ``mean_t sum_b
  eff(t, b) * m(b) / M`` with ``eff = cascade(keep)`` (``eff_b = keep_b * need_b``). The
  paper puts ``sum_b keep(t, b) * r(b)`` on the raw gates, with ``r(b)`` the MAC share
  including the blocks that die with ``b``: there a gate whose block is dead (all its
  consumers reuse) still feels the sparsity pull but, through the cascade, no consistency
  pull, so it drifts toward "reuse" and the post-processing later reads that drift. On the
  cascaded gates a dead gate gets no gradient from either term, and an outer gate still
  carries its inner blocks' MACs (through ``need``). With a ``target`` the term is
  two-sided: it pushes the gates down while the hard gates keep more MACs than the target
  and back up while they keep fewer, so training holds the budget the schedule is then
  selected at (the paper switches it off below the target; with SGD the gates then
  overshoot, trained at ~20% of the MACs for a 40% target).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["consistency_loss", "sparsity_loss", "kept_macs_fraction", "CONSISTENCY_KINDS"]

CONSISTENCY_KINDS = ("mse", "l1", "ssim", "ssim+l1")


def _ssim(x: Tensor, y: Tensor, value_range: tuple[float, float]) -> Tensor:
    from pytorch_msssim import ssim

    lo, hi = value_range
    # pytorch_msssim needs spatial sides >= the window: small images use a smaller one.
    win = min(11, *x.shape[2:])
    win -= 1 - win % 2  # odd
    x, y = ((t.float() - lo) / (hi - lo) for t in (x, y))  # SSIM's constants assume [0, 1]
    return ssim(x, y, data_range=1.0, win_size=win, size_average=False)


def consistency_loss(pruned: Tensor, full: Tensor, kind: str = "mse",
                     value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Per-sample loss ``[B]`` between the pruned and the full sample (``full`` is a target:
    no gradient flows into it). ``value_range``: the range of the data, for SSIM
    (images in [-1, 1] by default)."""
    if kind not in CONSISTENCY_KINDS:
        raise ValueError(f"kind must be one of {CONSISTENCY_KINDS}, got {kind!r}")
    if pruned.shape != full.shape:
        raise ValueError(f"pruned {tuple(pruned.shape)} and full {tuple(full.shape)} samples differ in shape")
    full = full.detach()
    diff = (pruned - full).flatten(1)
    if kind == "mse":
        return diff.square().mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    if pruned.dim() != 4:
        raise ValueError(f"SSIM needs images [B, C, H, W], got shape {tuple(pruned.shape)}")
    loss = 1 - _ssim(pruned, full, value_range)
    if kind == "ssim+l1":
        loss = loss + diff.abs().mean(1)
    return loss


def kept_macs_fraction(keep: Tensor, graph) -> Tensor:
    """Share of the full model's MACs that a keep mask ``[..., calls, blocks]`` computes,
    after the cascade, averaged over calls. Exact on 0/1 gates, differentiable on floats."""
    eff = graph.cascade(keep.float() if not keep.is_floating_point() else keep)
    macs = torch.tensor(graph.block_macs, dtype=eff.dtype, device=eff.device)
    per_call = (graph.overhead_macs + eff @ macs) / float(graph.total_macs)
    return per_call.mean(-1)


def sparsity_loss(keep: Tensor, graph, target: float | None = None) -> Tensor:
    """The kept-MAC share of the cascaded gates ``keep`` ``[calls, blocks]`` (or with a
    leading batch dim, averaged over it), overhead included; differentiable. With
    ``target``: ``share - target`` while the hard gates' cascaded share is above it,
    ``target - share`` while below, 0 on it (the sign a Lagrange multiplier of the budget
    would take; the value is the distance to the budget)."""
    if keep.shape[-1] != len(graph):
        raise ValueError(f"keep gates have {keep.shape[-1]} blocks, the graph has {len(graph)}")
    share = kept_macs_fraction(keep, graph).mean()
    if target is None:
        return share
    with torch.no_grad():
        kept = float(kept_macs_fraction(keep.detach() > 0.5, graph).mean())
    if kept > target:
        return share - target
    if kept < target:
        return target - share
    return share * 0
