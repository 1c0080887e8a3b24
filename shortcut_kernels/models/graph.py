"""Block graphs: the prunable blocks of a denoiser, their MACs and their data flow.

A :class:`BlockGraph` lists the prunable blocks of a model in execution order. Each
:class:`Block` knows the blocks whose output it reads (``producers``) and the blocks that
read its output (``consumers``); :data:`EXTERNAL` (-1) stands for the non-prunable parts
of the model (``conv_in``/patch embedding and time embedding on the producer side,
``conv_out``/final norm and projection on the consumer side).

Reuse semantics (DiP-GO's "backup connection"): a *reused* block does not compute; its
output at this step is the output it last computed. Two flavours:

* ``residual=False`` (UNet resnets, attentions, samplers, and whole UNet blocks): the
  cached output replaces the block's output, so a reused block reads nothing.
* ``residual=True`` (transformer blocks of DiT / PixArt / SD3): the cached *residual
  update* is added to the block's current input (``cache_residual``), so a reused
  block still reads its input and passes it on.

The cascade rule of DiP-GO follows: a block none of whose consumers needs its output is
reused too. A consumer needs its producer's output when it computes, or when it is a
reused residual block whose own output is needed. For UNets this is exactly "a block
whose every consumer is reused is reused too"; for transformer chains nothing cascades
(every reused residual block still forwards its input).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch

from . import deepcache

EXTERNAL = -1
"""Index used in ``producers``/``consumers`` for the non-prunable stem/head of the model."""

GRANULARITIES = ("coarse", "fine")


@dataclass(frozen=True)
class Block:
    """One prunable block.

    Attributes:
        index: position in :attr:`BlockGraph.blocks` (execution order).
        name: unique name; the module path for single-module blocks
            (``"down_blocks.0.attentions.1"``), ``"transformer_blocks[0:4]"`` for groups.
        module_paths: paths (``model.get_submodule``) of the module(s) the block runs.
        macs: multiply-accumulates of one call of the block at the graph's input shape.
        consumers: indices of the blocks that read this block's output
            (:data:`EXTERNAL` = the model's non-prunable head).
        producers: indices of the blocks whose outputs this block reads
            (:data:`EXTERNAL` = the model's non-prunable stem).
        residual: reuse keeps the input and adds a cached residual (see module doc).
        kind: ``"resnet"``, ``"attention"``, ``"downsampler"``, ``"upsampler"``,
            ``"down_block"``, ``"mid_block"``, ``"up_block"``, ``"transformer"``,
            ``"transformer_group"``.
        stage: ``"down"``, ``"mid"``, ``"up"`` (UNets) or ``"chain"`` (transformers).
        deepcache: for fine UNet blocks, DeepCache's ``(stage, block_i, layer_i)``
            coordinate of the module (see :mod:`shortcut_kernels.models.deepcache`);
            ``None`` elsewhere.
        reads: parallel to ``producers``: for each producer, the indices of the
            producer's outputs (positions in its ``output_shapes``) this block reads.
            Coarse ``down_blocks.i`` output ``(hidden, (skip, ...))``, flattened as
            ``[hidden, skip_0, skip_1, ...]``: the next down block and the mid block read
            output 0, an up block reads the skips it consumes (1 + their position).
            Every other block has one output, read as 0.
        skip: fine UNet blocks: the index of the skip connection this module appends
            (down path; skip 0 is ``conv_in``'s output) or consumes (up resnets);
            ``None`` elsewhere.
        output_structure: how the block's module returns its output(s): ``"tensor"``,
            ``"tuple"`` (a tuple of tensors, e.g. ``(hidden,)`` of an attention called
            with ``return_dict=False``) or ``"hidden_and_skips"`` (``(hidden, (skip,
            ...))`` of a UNet down block).
        output_shapes: the shapes of the flattened outputs at the graph's input shape
            (``()`` when the graph was built without a forward pass).
    """

    index: int
    name: str
    module_paths: tuple[str, ...]
    macs: int
    consumers: tuple[int, ...]
    producers: tuple[int, ...]
    residual: bool = False
    kind: str = ""
    stage: str = ""
    deepcache: tuple[str, int, int] | None = None
    reads: tuple[tuple[int, ...], ...] = ()
    skip: int | None = None
    output_structure: str = "tensor"
    output_shapes: tuple[tuple[int, ...], ...] = ()

    def output_numel(self) -> int:
        """Elements of the block's output(s) at the graph's input shape (its cache size).

        The outputs of a ``hidden_and_skips`` block share storage (the hidden state is
        the last skip), so only distinct tensors count: the skips."""
        shapes = self.output_shapes[1:] if self.output_structure == "hidden_and_skips" else self.output_shapes
        n = 0
        for s in shapes:
            k = 1
            for d in s:
                k *= int(d)
            n += k
        return n

    @property
    def module_path(self) -> str:
        """The module path of a single-module block; ValueError for a group."""
        if len(self.module_paths) != 1:
            raise ValueError(
                f"block {self.name!r} spans {len(self.module_paths)} modules "
                f"({', '.join(self.module_paths)}); use module_paths / get_modules()"
            )
        return self.module_paths[0]


@dataclass(frozen=True)
class BlockGraph:
    """Ordered prunable blocks of one model at one input shape, with their topology.

    ``total_macs`` is the MAC count of one whole model call (blocks plus the
    non-prunable rest, ``overhead_macs``), in the same convention as the blocks' MACs
    (see :func:`shortcut_kernels.models.macs.module_macs`).
    """

    model_class: str
    granularity: str
    blocks: tuple[Block, ...]
    total_macs: int
    input_shapes: dict = field(default_factory=dict)
    count_attention: bool = False

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, key: int | str) -> Block:
        return self.blocks[self.index(key)]

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def block_macs(self) -> list[int]:
        return [b.macs for b in self.blocks]

    @property
    def overhead_macs(self) -> int:
        """MACs of the non-prunable parts (stem, embeddings, head)."""
        return self.total_macs - sum(b.macs for b in self.blocks)

    def index(self, key: int | str) -> int:
        if isinstance(key, bool):
            raise TypeError("block key must be an int index or a block name, not bool")
        if isinstance(key, int):
            if not -len(self.blocks) <= key < len(self.blocks):
                raise IndexError(f"block index {key} out of range for {len(self.blocks)} blocks")
            return key % len(self.blocks)
        if isinstance(key, str):
            for b in self.blocks:
                if b.name == key:
                    return b.index
            raise KeyError(f"no block named {key!r}; blocks are: {', '.join(self.names)}")
        raise TypeError(f"block key must be an int index or a block name, got {type(key).__name__}")

    # ------------------------------------------------------------------ cascade
    def cascade(self, keep):
        """Effective keep mask after DiP-GO's cascade rule.

        ``keep``: a sequence of bools (one per block) or a tensor ``[..., N]``;
        ``True``/1 = compute, ``False``/0 = reuse. Returns the same kind: a list of bools,
        a bool tensor for bool/integer tensors, and for floating tensors (gate values in
        [0, 1], e.g. straight-through hard gates) a floating tensor computed with
        products, ``need_b = 1 - prod_c (1 - u_c)``, ``eff_b = keep_b * need_b``, that is
        exact on 0/1 values and differentiable with respect to ``keep``.
        """
        n = len(self.blocks)
        if isinstance(keep, torch.Tensor):
            if keep.shape[-1:] != (n,):
                raise ValueError(f"keep mask must have {n} entries in its last dim, got shape {tuple(keep.shape)}")
            soft = keep.is_floating_point()
            k = keep if soft else keep.to(torch.bool)
            cols = [None] * n
            live = [None] * n
            for b in reversed(self.blocks):
                if EXTERNAL in b.consumers:
                    need = torch.ones_like(k[..., 0])
                elif soft:
                    miss = torch.ones_like(k[..., 0])
                    for c in b.consumers:  # u_c: c reads b (computes, or passes b on as a residual)
                        miss = miss * (1 - (live[c] if self.blocks[c].residual else cols[c]))
                    need = 1 - miss
                else:
                    need = torch.zeros_like(k[..., 0])
                    for c in b.consumers:
                        need = need | (live[c] if self.blocks[c].residual else cols[c])
                live[b.index] = need
                cols[b.index] = k[..., b.index] * need if soft else k[..., b.index] & need
            return torch.stack(cols, dim=-1)
        keep = [bool(x) for x in keep]
        if len(keep) != n:
            raise ValueError(f"keep mask must have {n} entries (one per block), got {len(keep)}")
        eff = [False] * n
        live = [False] * n
        for b in reversed(self.blocks):
            need = False
            for c in b.consumers:
                if c == EXTERNAL or eff[c] or (self.blocks[c].residual and live[c]):
                    need = True
                    break
            live[b.index] = need
            eff[b.index] = keep[b.index] and need
        return eff

    def live(self, keep) -> list[bool]:
        """Per block: is its output (fresh or cached) read by anything in this call?

        ``keep`` is a keep mask (list of bools, cascade applied or not). A block that is
        not kept but live is *read from its cache*; one that is neither is *dead*: no
        kept block needs it, so it costs nothing at all."""
        keep = [bool(x) for x in keep]
        if len(keep) != len(self.blocks):
            raise ValueError(f"keep mask must have {len(self.blocks)} entries (one per block), got {len(keep)}")
        eff = self.cascade(keep)
        live = [False] * len(self.blocks)
        for b in reversed(self.blocks):
            live[b.index] = any(c == EXTERNAL or eff[c] or (self.blocks[c].residual and live[c]) for c in b.consumers)
        return live

    def _reused_mask(self, reused: Iterable[int | str]) -> list[bool]:
        keep = [True] * len(self.blocks)
        for r in reused:
            keep[self.index(r)] = False
        return keep

    def cascade_set(self, reused: Iterable[int | str] | int | str) -> list[int]:
        """Indices of every block that ends up reused when ``reused`` are (sorted)."""
        if isinstance(reused, (int, str)):
            reused = [reused]
        eff = self.cascade(self._reused_mask(reused))
        return [i for i, k in enumerate(eff) if not k]

    def macs_kept(self, keep) -> int:
        """MACs of one call with the keep mask ``keep`` (after cascade), overhead included."""
        eff = self.cascade(list(keep) if not isinstance(keep, torch.Tensor) else keep.tolist())
        return self.overhead_macs + sum(b.macs for b, k in zip(self.blocks, eff) if k)

    def macs_saved(self, reused: Iterable[int | str] | int | str) -> int:
        """MACs saved by reusing the blocks ``reused`` (indices or names), cascade included."""
        return sum(self.blocks[i].macs for i in self.cascade_set(reused))

    @property
    def cascaded_macs(self) -> list[int]:
        """Per block: MACs saved if that block alone is reused (its cascade included)."""
        return [self.macs_saved([i]) for i in range(len(self.blocks))]

    @property
    def flops_share(self) -> list[float]:
        """Per block: cascaded MACs as a share of the whole call (``total_macs``).

        This is DiP-GO's FLOPs weight of a block's keep gate in the sparsity loss.
        """
        tot = float(self.total_macs) or 1.0
        return [m / tot for m in self.cascaded_macs]

    # ------------------------------------------------------------------ DeepCache
    def deepcache_keep(self, cache_branch_id: int | None = None, *, cache_layer_id: int | None = None,
                       cache_block_id: int | None = None) -> list[bool]:
        """Keep mask of a DeepCache *retrieval* step (cache-refresh steps keep everything).

        See :func:`shortcut_kernels.models.deepcache.deepcache_keep` for the numbering.
        """
        return deepcache.deepcache_keep(self, cache_branch_id, cache_layer_id=cache_layer_id, cache_block_id=cache_block_id)

    def skip_keep(self, skip: int) -> list[bool]:
        """Keep mask of a DeepCache retrieval step keeping skips ``0..skip`` fresh
        (:func:`shortcut_kernels.models.deepcache.skip_keep`)."""
        return deepcache.skip_keep(self, skip)

    # ------------------------------------------------------------------ export
    @classmethod
    def from_dict(cls, d: dict) -> "BlockGraph":
        """Inverse of :meth:`to_dict` (e.g. the graph stored in a schedule file)."""
        blocks = []
        for i, bd in enumerate(d["blocks"]):
            blocks.append(Block(
                index=int(bd.get("index", i)), name=bd["name"], module_paths=tuple(bd["module_paths"]),
                macs=int(bd["macs"]), consumers=tuple(int(x) for x in bd["consumers"]),
                producers=tuple(int(x) for x in bd["producers"]), residual=bool(bd.get("residual", False)),
                kind=bd.get("kind", ""), stage=bd.get("stage", ""),
                deepcache=tuple(bd["deepcache"]) if bd.get("deepcache") is not None else None,
                reads=tuple(tuple(int(y) for y in r) for r in bd.get("reads", ())),
                skip=bd.get("skip"), output_structure=bd.get("output_structure", "tensor"),
                output_shapes=tuple(tuple(int(y) for y in s) for s in bd.get("output_shapes", ()))))
        shapes = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get("input_shapes", {}).items()}
        return cls(model_class=d["model_class"], granularity=d["granularity"], blocks=tuple(blocks),
                   total_macs=int(d["total_macs"]), input_shapes=shapes,
                   count_attention=bool(d.get("count_attention", False)))

    def to_dict(self) -> dict:
        d = {
            "model_class": self.model_class,
            "granularity": self.granularity,
            "total_macs": self.total_macs,
            "overhead_macs": self.overhead_macs,
            "count_attention": self.count_attention,
            "input_shapes": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in self.input_shapes.items()},
            "blocks": [],
        }
        for b in self.blocks:
            bd = asdict(b)
            bd["module_paths"] = list(b.module_paths)
            bd["consumers"] = list(b.consumers)
            bd["producers"] = list(b.producers)
            bd["deepcache"] = list(b.deepcache) if b.deepcache is not None else None
            bd["reads"] = [list(r) for r in b.reads]
            bd["output_shapes"] = [list(x) for x in b.output_shapes]
            d["blocks"].append(bd)
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def summary(self) -> str:
        """A human-readable table: block, MACs, share, cascaded MACs, consumers."""
        tot = self.total_macs or 1
        casc = self.cascaded_macs
        width = max([len(b.name) for b in self.blocks] + [5])
        lines = [
            f"{self.model_class} ({self.granularity}), input {self.input_shapes}: "
            f"{self.total_macs / 1e9:.2f} GMACs per call, {len(self.blocks)} blocks, "
            f"overhead {self.overhead_macs / 1e9:.3f} G",
            f"{'#':>3} {'block':<{width}} {'GMACs':>9} {'share':>7} {'cascaded':>9}  consumers",
        ]
        for b, c in zip(self.blocks, casc):
            cons = ",".join("out" if x == EXTERNAL else str(x) for x in b.consumers)
            lines.append(f"{b.index:>3} {b.name:<{width}} {b.macs / 1e9:>9.3f} {100 * b.macs / tot:>6.2f}% "
                         f"{c / 1e9:>9.3f}  {cons}")
        return "\n".join(lines)


def _group(fine: Sequence[dict], groups: Sequence[tuple[str, tuple[str, ...], list[int], str, str]]):
    """Merge fine block specs into coarse ones.

    ``groups``: (name, module_paths, member indices, kind, stage) per coarse block, in
    execution order. Returns coarse specs with producers/consumers between groups.
    """
    owner = {}
    for g, (_, _, members, _, _) in enumerate(groups):
        for m in members:
            owner[m] = g
    # flat outputs of a group: [main output (its last member)] + the skips its members append
    # (down blocks return (hidden, (skip, ...)))
    skip_pos = {}
    for g, (_, _, members, kind, _) in enumerate(groups):
        if kind == "down_block":
            for k, m in enumerate(x for x in members if fine[x].get("skip") is not None):
                skip_pos[m] = 1 + k
    out = []
    for g, (name, paths, members, kind, stage) in enumerate(groups):
        prods, cons = [], []
        reads: dict[int, set] = {}
        for m in members:
            for p, role in zip(fine[m]["producers"], fine[m].get("roles", ["hidden"] * len(fine[m]["producers"]))):
                q = EXTERNAL if p == EXTERNAL else owner[p]
                if q != g and q not in prods:
                    prods.append(q)
                if q != g:
                    reads.setdefault(q, set()).add(skip_pos.get(p, 0) if role == "skip" and q != EXTERNAL else 0)
            for c in fine[m]["consumers"]:
                q = EXTERNAL if c == EXTERNAL else owner[c]
                if q != g and q not in cons:
                    cons.append(q)
        prods.sort()
        cons.sort(key=lambda q: (q == EXTERNAL, q))
        out.append(dict(name=name, module_paths=tuple(paths), producers=prods, consumers=cons,
                        residual=all(fine[m]["residual"] for m in members), kind=kind, stage=stage,
                        deepcache=None, skip=None, reads=[sorted(reads[q]) for q in prods]))
    return out


def _fill_consumers(specs: list[dict], final: int) -> None:
    """Derive consumers from producers; ``final`` (the last producer of the output) feeds EXTERNAL."""
    for s in specs:
        s["consumers"] = []
    for i, s in enumerate(specs):
        for p in s["producers"]:
            if p != EXTERNAL and i not in specs[p]["consumers"]:
                specs[p]["consumers"].append(i)
    if final != EXTERNAL:
        specs[final]["consumers"].append(EXTERNAL)
