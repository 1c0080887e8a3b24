"""DeepCache settings as keep masks over a ``fine`` UNet block graph.

Every function here takes that graph (a :class:`~shortcut_kernels.models.BlockGraph`) as
``graph`` and reads only its blocks and its cascade, so this module imports nothing from
:mod:`.graph`; ``BlockGraph.deepcache_keep`` and ``BlockGraph.skip_keep`` call it.

DeepCache (Ma et al., CVPR 2024; github.com/horseee/DeepCache) caches the features of a
UNet at a *skip branch*: on retrieval steps only the shallow path runs (``conv_in``, the
down modules above the branch, the up modules that consume the fresh skips, ``conv_out``);
everything deeper, the mid block included, is reused from the last full step.

Skips are numbered in the order the down path produces them: skip 0 is the ``conv_in``
output, then one skip per down layer (resnet, + attention when the block has one) and
one per downsampler. For SD-1.5/2.1 (``layers_per_block=2``, 4 blocks) there are 12
skips (0..11); for SDXL (3 blocks) 9 (0..8).

Every fine block carries DeepCache's coordinate of its module, ``Block.deepcache =
(stage, block_i, layer_i)``, exactly as DeepCache's ``DeepCacheSDHelper`` wraps them:

* down path: ``("down", i, l)`` for ``down_blocks.i.resnets.l`` and
  ``down_blocks.i.attentions.l``; ``("down", i, len(resnets))`` for the downsampler.
* mid block: ``("mid", 0, 0)`` for all of its modules (always reused on retrieval).
* up path, counted from the output side: ``("up", n_up - 1 - i, len(resnets) - 1 - j)``
  for ``up_blocks.i.resnets.j`` / ``attentions.j``, ``("up", n_up - 1 - i, 0)`` for
  ``up_blocks.i.upsamplers.0``.

Three numberings of "where the cache sits", all supported here:

1. ``DeepCacheSDHelper.set_params(cache_branch_id=k)`` (the ``DeepCache`` package):
   ``cache_block_id = k // 3``, ``cache_layer_id = k % 3`` *whatever the UNet's layers
   per block*. A down module ``(i, l)`` runs iff ``i < cache_block_id`` or (``i ==
   cache_block_id`` and ``l < cache_layer_id``); an up module ``(i, l)`` runs iff ``i <
   cache_block_id`` or (``i == cache_block_id`` and ``l <= cache_layer_id``). Valid ``k``:
   ``0 .. 3 * len(down_blocks) - 1`` (:func:`num_branches`).
2. The *skip index* ``s`` (:func:`skip_keep`): skips ``0..s`` stay fresh - the down
   modules producing skips ``1..s`` run, and so do the up resnets consuming skips
   ``0..s`` (with their attentions, and the upsampler right after a block's last such
   resnet). Valid ``s``: ``0 .. num_skips - 1`` (:func:`num_skips`).
3. The paper's pipelines (``pipe(..., cache_layer_id=L, cache_block_id=B)``, L = down
   block, B = layer inside it): the down path runs through layer ``(L, B)`` inclusive
   (``B == len(resnets)``: through the downsampler), and the up path consumes the
   skips it produced: skip index ``s = offset(L) + B + 1`` (:func:`branch_from_layer_block`;
   ``offset(L)`` = number of skips produced by down blocks ``< L``).

With three DeepCache layers per down block (``layers_per_block=2`` + a downsampler:
SD-1.5/2.1, SDXL) package branch ``k`` *is* skip index ``k``. With other layouts they
differ: the zoo UNet (``layers_per_block=1``, 2 layers per down block) has 9 package
branches but 6 skips; package branches 1 and 2 both keep skips 0..1 fresh (branch 2 also
runs down_blocks.0's downsampler, whose output no running module reads: the package
computes it, the cascade-normalised mask here does not). :func:`skip_of_branch` maps a
package branch to its skip index.

SD-1.5 fine graph (44 blocks), index -> coordinate, and the smallest branch k at which
the block runs on retrieval steps (the mid block never does)::

     0 down_blocks.0.resnets.0      (down,0,0) k>=1   22 up_blocks.0.resnets.2        (up,3,0) k>=9
     1 down_blocks.0.attentions.0   (down,0,0) k>=1   23 up_blocks.0.upsamplers.0     (up,3,0) k>=9
     2 down_blocks.0.resnets.1      (down,0,1) k>=2   24 up_blocks.1.resnets.0        (up,2,2) k>=8
     3 down_blocks.0.attentions.1   (down,0,1) k>=2   25 up_blocks.1.attentions.0     (up,2,2) k>=8
     4 down_blocks.0.downsamplers.0 (down,0,2) k>=3   26 up_blocks.1.resnets.1        (up,2,1) k>=7
     5 down_blocks.1.resnets.0      (down,1,0) k>=4   27 up_blocks.1.attentions.1     (up,2,1) k>=7
     6 down_blocks.1.attentions.0   (down,1,0) k>=4   28 up_blocks.1.resnets.2        (up,2,0) k>=6
     7 down_blocks.1.resnets.1      (down,1,1) k>=5   29 up_blocks.1.attentions.2     (up,2,0) k>=6
     8 down_blocks.1.attentions.1   (down,1,1) k>=5   30 up_blocks.1.upsamplers.0     (up,2,0) k>=6
     9 down_blocks.1.downsamplers.0 (down,1,2) k>=6   31 up_blocks.2.resnets.0        (up,1,2) k>=5
    10 down_blocks.2.resnets.0      (down,2,0) k>=7   32 up_blocks.2.attentions.0     (up,1,2) k>=5
    11 down_blocks.2.attentions.0   (down,2,0) k>=7   33 up_blocks.2.resnets.1        (up,1,1) k>=4
    12 down_blocks.2.resnets.1      (down,2,1) k>=8   34 up_blocks.2.attentions.1     (up,1,1) k>=4
    13 down_blocks.2.attentions.1   (down,2,1) k>=8   35 up_blocks.2.resnets.2        (up,1,0) k>=3
    14 down_blocks.2.downsamplers.0 (down,2,2) k>=9   36 up_blocks.2.attentions.2     (up,1,0) k>=3
    15 down_blocks.3.resnets.0      (down,3,0) k>=10  37 up_blocks.2.upsamplers.0     (up,1,0) k>=3
    16 down_blocks.3.resnets.1      (down,3,1) k>=11  38 up_blocks.3.resnets.0        (up,0,2) k>=2
    17 mid_block.resnets.0          (mid,0,0) never  39 up_blocks.3.attentions.0     (up,0,2) k>=2
    18 mid_block.attentions.0       (mid,0,0) never  40 up_blocks.3.resnets.1        (up,0,1) k>=1
    19 mid_block.resnets.1          (mid,0,0) never  41 up_blocks.3.attentions.1     (up,0,1) k>=1
    20 up_blocks.0.resnets.0        (up,3,2) k>=11  42 up_blocks.3.resnets.2        (up,0,0) k>=0
    21 up_blocks.0.resnets.1        (up,3,1) k>=10  43 up_blocks.3.attentions.2     (up,0,0) k>=0

(:func:`deepcache_table` prints the full table for any UNet.) Each mask is a fixed point
of the cascade rule, and it is the cascade of "reuse the mid block and every up module
deeper than the branch".
"""
from __future__ import annotations

import types


def _require_fine_unet(graph) -> None:
    if graph.granularity != "fine" or not graph.blocks or graph.blocks[0].deepcache is None:
        raise ValueError("DeepCache settings map onto the 'fine' block graph of a UNet "
                         f"(got {graph.model_class}, granularity {graph.granularity!r})")


def _down_layers(graph) -> dict[int, int]:
    """Number of DeepCache layers (resnet layers + downsampler) per down block."""
    out: dict[int, int] = {}
    for b in graph.blocks:
        if b.deepcache and b.deepcache[0] == "down":
            _, i, l = b.deepcache
            out[i] = max(out.get(i, 0), l + 1)
    return out


def num_branches(graph) -> int:
    """Number of the ``DeepCache`` package's ``cache_branch_id`` values (3 per down block)."""
    _require_fine_unet(graph)
    return 3 * len(_down_layers(graph))


def num_skips(graph) -> int:
    """Number of skip connections (``conv_in``'s included): valid skip indices."""
    _require_fine_unet(graph)
    return 1 + sum(_down_layers(graph).values())


def skip_keep(graph, skip: int) -> list[bool]:
    """Keep mask of a retrieval step that keeps skips ``0..skip`` fresh (cascade-normalised)."""
    _require_fine_unet(graph)
    if isinstance(skip, bool) or not isinstance(skip, int):
        raise TypeError(f"skip must be an int, got {skip!r}")
    ns = num_skips(graph)
    if not 0 <= skip < ns:
        raise ValueError(f"skip={skip} out of range 0..{ns - 1}")
    keep = []
    running = False  # does the up resnet in front (same block) run?
    for b in graph.blocks:
        if b.stage == "down":
            keep.append(True)  # the cascade drops the modules whose skips nobody reads
        elif b.stage == "mid":
            keep.append(False)
        elif b.kind == "resnet":
            running = b.skip is not None and b.skip <= skip
            keep.append(running)
        else:  # attention after its resnet, upsampler after the block's last resnet
            keep.append(running)
    return graph.cascade(keep)


def skip_of_branch(graph, cache_branch_id: int) -> int:
    """The skip index whose mask equals the package's branch ``cache_branch_id`` (after the cascade)."""
    keep = deepcache_keep(graph, cache_branch_id)
    for s in range(num_skips(graph)):
        if skip_keep(graph, s) == keep:
            return s
    raise AssertionError(f"package branch {cache_branch_id} matches no skip index")  # pragma: no cover


def branch_from_layer_block(graph, cache_layer_id: int, cache_block_id: int) -> int:
    """The pipelines' ``(cache_layer_id, cache_block_id)`` as a skip index."""
    _require_fine_unet(graph)
    layers = _down_layers(graph)
    if cache_layer_id not in layers:
        raise ValueError(f"cache_layer_id={cache_layer_id} out of range: the UNet has {len(layers)} down blocks")
    if not 0 <= cache_block_id < layers[cache_layer_id]:
        raise ValueError(f"cache_block_id={cache_block_id} out of range for down block {cache_layer_id} "
                         f"(0..{layers[cache_layer_id] - 1})")
    return sum(layers[i] for i in range(cache_layer_id)) + cache_block_id + 1


def deepcache_keep(graph, cache_branch_id: int | None = None, *, cache_layer_id: int | None = None,
                   cache_block_id: int | None = None) -> list[bool]:
    """Keep mask of a DeepCache retrieval step (see the module docstring for the numbering).

    Give either ``cache_branch_id`` (the ``DeepCache`` package's ``set_params``) or both
    ``cache_layer_id`` and ``cache_block_id`` (the paper's pipelines). The mask is
    cascade-normalised: modules whose output nothing running reads are reused.
    """
    _require_fine_unet(graph)
    if cache_branch_id is not None:
        if cache_layer_id is not None or cache_block_id is not None:
            raise ValueError("give cache_branch_id or (cache_layer_id, cache_block_id), not both")
        if isinstance(cache_branch_id, bool) or not isinstance(cache_branch_id, int):
            raise TypeError(f"cache_branch_id must be an int, got {cache_branch_id!r}")
        nb = num_branches(graph)
        if not 0 <= cache_branch_id < nb:
            raise ValueError(f"cache_branch_id={cache_branch_id} out of range 0..{nb - 1}")
        cb, cl = cache_branch_id // 3, cache_branch_id % 3  # DeepCacheSDHelper's decoding
        keep = []
        for b in graph.blocks:
            stage, i, l = b.deepcache
            if stage == "mid":
                keep.append(False)
            elif stage == "down":
                keep.append(i < cb or (i == cb and l < cl))
            else:
                keep.append(i < cb or (i == cb and l <= cl))
        return graph.cascade(keep)
    if cache_layer_id is None or cache_block_id is None:
        raise ValueError("give cache_branch_id, or both cache_layer_id and cache_block_id")
    return skip_keep(graph, branch_from_layer_block(graph, cache_layer_id, cache_block_id))


def min_skip(graph) -> list[int | None]:
    """Per block: the smallest skip index at which it runs on retrieval steps."""
    ns = num_skips(graph)
    masks = [skip_keep(graph, s) for s in range(ns)]
    return [min((s for s in range(ns) if masks[s][j]), default=None) for j in range(len(graph.blocks))]


def min_branch(graph) -> list[int | None]:
    """Per block: the smallest ``cache_branch_id`` at which it runs on retrieval steps."""
    nb = num_branches(graph)
    masks = [deepcache_keep(graph, k) for k in range(nb)]
    out = []
    for j in range(len(graph.blocks)):
        ks = [k for k in range(nb) if masks[k][j]]
        out.append(min(ks) if ks else None)
    return out


def deepcache_table(graph) -> str:
    """Index, name, DeepCache coordinate, smallest package branch and smallest skip index
    of every fine UNet block."""
    mb, ms = min_branch(graph), min_skip(graph)
    w = max(len(b.name) for b in graph.blocks)
    rows = []
    for b, k, s in zip(graph.blocks, mb, ms):
        st, i, l = b.deepcache
        rows.append(f"{b.index:>3} {b.name:<{w}} ({st},{i},{l}) {'never' if k is None else f'k>={k}':<7} "
                    f"{'never' if s is None else f's>={s}'}")
    return "\n".join(rows)


def package_helper(unet, scheduler, interval: int, branch: int):
    """The ``DeepCache`` package's own helper (``DeepCacheSDHelper``) enabled on a bare UNet, for
    parity tests and side-by-side benchmarks; returns the function that removes it. Needs the
    package (not a dependency). The helper only reads ``pipe.unet`` and ``pipe.scheduler`` and
    finds the step from ``scheduler.timesteps.index(args[1])``: call the UNet with the timestep
    positionally (a 0-d tensor). Its ``disable()`` leaves instance-level ``forward`` attributes
    on every module it patched, which the returned function removes too."""
    from DeepCache import DeepCacheSDHelper  # optional: the parity tests' package

    helper = DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=unet, scheduler=scheduler))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()

    def remove():
        helper.disable()
        for mod in unet.modules():
            mod.__dict__.pop("forward", None)

    return remove
