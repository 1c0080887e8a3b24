"""DiP-GO's SuperNet: every block computes, and its output is blended with its cache.

    out_b = gated_blend(fresh_b, cache_b, gate_b)        # gate 1: compute, 0: reuse
    cache_b <- out_b                                      (the backup connection)

A transformer (residual) block gates its *update*: with input x, the blend is between its
fresh output and ``x + cached update``, and the update it passes on, ``out - x``, becomes
the cache; so gate 0 is exactly what the runtime does for a reused residual block
(``cache_residual``) and gate 1 is exactly the model.

The SuperNet is functional: ``supernet(*model_args, gates=g, caches=c)`` returns
``(output, new_caches)``; the caches of a run are explicit values, not hidden state, so a
call can be checkpointed and recomputed (exact training) or replayed on the rows of the
samples that keep it (shortcut training). ``gates`` is ``[blocks]`` or per sample
``[batch, blocks]``; ``caches=None`` is call 0 of a run (every block computes).

Mechanism: forward hooks on the blocks' modules (the SuperNet always runs every block, so
hooks that replace the outputs are all it needs); they are active only inside a
SuperNet call, so the wrapped model itself is unchanged and ``remove()`` drops them.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ..models import denoiser
from ..ops.gated_blend import gated_blend
from ..runtime.schedule import graph_of

__all__ = ["SuperNet"]


def _flatten(out) -> tuple[list[Tensor], Any]:
    """Tensors of a block output and how to rebuild it: a tensor, a tuple of tensors,
    ``(hidden, (skip, ...))`` of a UNet down block, or a diffusers ``ModelOutput``."""
    if isinstance(out, Tensor):
        return [out], "tensor"
    if hasattr(out, "to_tuple"):
        leaves, how = _flatten(out.to_tuple())
        return leaves, (type(out), list(out.keys()), how)
    if isinstance(out, tuple):
        if len(out) == 2 and isinstance(out[0], Tensor) and isinstance(out[1], tuple):
            return [out[0], *out[1]], "hidden_and_skips"
        if all(isinstance(t, Tensor) for t in out):
            return list(out), "tuple"
    raise TypeError(f"block returned a {type(out).__name__}; the SuperNet gates tensors and tuples of tensors")


def _rebuild(leaves: list[Tensor], how) -> Any:
    if how == "tensor":
        return leaves[0]
    if how == "hidden_and_skips":
        return leaves[0], tuple(leaves[1:])
    if how == "tuple":
        return tuple(leaves)
    cls, keys, inner = how
    return cls(**dict(zip(keys, _rebuild(leaves, inner))))


class _Call:
    """One SuperNet call: the gates, the incoming caches and the outgoing ones."""

    def __init__(self, gates: Tensor, caches: Sequence | None, num_blocks: int):
        self.gates = gates
        self.caches_in = caches
        self.caches_out: list[Any] = [None] * num_blocks
        self.inputs: list[Tensor | None] = [None] * num_blocks

    def gate(self, b: int) -> Tensor:
        return self.gates[..., b]  # 0-d, or [batch] for per-sample gates


class SuperNet(nn.Module):
    """A diffusion model whose prunable blocks blend fresh and cached outputs.

    Args:
        model: a diffusers denoiser (``UNet2DConditionModel``, ``DiTTransformer2DModel``, ...)
            or a zoo model (its ``.backbone`` holds the blocks); called with its own arguments.
        granularity: ``"fine"`` or ``"coarse"`` (see :func:`shortcut_kernels.models.block_graph`).
        sample_shape: latent shape for the block graph's MAC counts (default: native size).
    Attributes: ``graph`` (the :class:`~shortcut_kernels.models.BlockGraph`), ``model``.
    """

    def __init__(self, model: nn.Module, granularity: str = "fine", sample_shape=None, graph=None):
        super().__init__()
        self.model = model
        backbone = denoiser(model)
        # the graph the schedules of this model use
        self.graph = graph if graph is not None else graph_of(model, granularity, sample_shape)
        self._call: _Call | None = None
        self._hooks = []
        for b in self.graph.blocks:
            mods = [backbone.get_submodule(p) for p in b.module_paths]
            if b.residual:
                self._hooks.append(mods[0].register_forward_pre_hook(self._pre_hook(b.index), with_kwargs=True))
            self._hooks.append(mods[-1].register_forward_hook(self._hook(b.index, b.residual)))

    @property
    def num_blocks(self) -> int:
        return len(self.graph)

    def remove(self) -> None:
        """Detach the hooks: the model is exactly as before."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- hooks -----------------------------------------------------------------------
    def _pre_hook(self, b: int):
        def hook(module, args, kwargs):
            call = self._call
            if call is not None:
                call.inputs[b] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _hook(self, b: int, residual: bool):
        def hook(module, args, output):
            call = self._call
            if call is None:  # the model called outside a SuperNet call: untouched
                return None
            fresh, how = _flatten(output)
            cached = call.caches_in[b] if call.caches_in is not None else None
            if residual:
                x = call.inputs[b]
                call.inputs[b] = None
                if cached is None:
                    out = fresh
                else:  # blend with what reuse gives: the input plus the cached update
                    out = [gated_blend(f, x + c, call.gate(b)) for f, c in zip(fresh, cached)]
                call.caches_out[b] = [o - x for o in out]
            else:
                out = fresh if cached is None else [gated_blend(f, c, call.gate(b)) for f, c in zip(fresh, cached)]
                call.caches_out[b] = list(out)
            return _rebuild(list(out), how)
        return hook

    # ---- a call ----------------------------------------------------------------------
    def forward(self, *args, gates: Tensor, caches: Sequence | None = None, **kwargs):
        """One denoiser call: ``(model output, caches for the next call)``.

        ``gates``: ``[blocks]`` or ``[batch, blocks]`` keep gates (straight-through values
        from :class:`~shortcut_kernels.dipgo.Pruner`, or any floats in [0, 1]).
        ``caches``: the previous call's returned caches, or None at call 0.
        """
        n = self.num_blocks
        if gates.shape[-1] != n or gates.dim() > 2:
            raise ValueError(f"gates must be [{n}] or [batch, {n}] for this model's {n} blocks, "
                             f"got shape {tuple(gates.shape)}")
        if caches is not None and len(caches) != n:
            raise ValueError(f"caches has {len(caches)} entries, the model has {n} blocks")
        if self._call is not None:
            raise RuntimeError("SuperNet calls do not nest")
        self._call = _Call(gates, caches, n)
        try:
            out = self.model(*args, **kwargs)
            return out, self._call.caches_out
        finally:
            self._call = None

    @staticmethod
    def select(caches: Sequence, rows: Tensor) -> list:
        """The caches of the samples ``rows`` (index tensor) of a batch."""
        return [None if c is None else [t[rows] for t in c] for c in caches]
