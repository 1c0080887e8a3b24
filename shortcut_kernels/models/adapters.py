"""Per-class adapters: which blocks of a diffusers model are prunable, and how they connect.

UNets (``UNet2DConditionModel``, ``UNet2DModel``)
    The data flow is read off the module structure, mirroring the models' forward:
    ``conv_in`` output is skip 0; every down layer (resnet, then its attention if any)
    and every downsampler appends one skip; up blocks pop ``len(resnets)`` skips from
    the end, resnet ``j`` taking the most recent one.

    * ``fine``: every ``resnets.i``, ``attentions.i``, ``downsamplers.i``,
      ``upsamplers.i`` of the down blocks, the mid block and the up blocks, in execution
      order. Block coordinates follow DeepCache (see :mod:`.deepcache`).
    * ``coarse``: ``down_blocks.i``, ``mid_block``, ``up_blocks.i``.

    Skips are numbered in production order (0 = ``conv_in``); a fine down module that
    appends a skip and an up resnet that consumes one carry its index in ``Block.skip``.

Transformer chains (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
``SD3Transformer2DModel``)
    * ``fine``: every ``transformer_blocks.i``.
    * ``coarse``: runs of ``group_size`` consecutive transformer blocks (default 4:
      DiT-XL/2's 28 blocks -> 7 groups).
    Transformer blocks are residual (reuse = add the cached residual to the current
    input), so nothing cascades along the chain.
"""
from __future__ import annotations

from torch import nn

from .graph import EXTERNAL, _fill_consumers, _group

UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")
CHAIN_CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel")
SUPPORTED_CLASSES = UNET_CLASSES + CHAIN_CLASSES

# Block classes whose forward is: for each layer resnet -> (attention); then samplers.
_DOWN_TYPES = {"DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D",
               "SimpleCrossAttnDownBlock2D"}
_UP_TYPES = {"UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D",
             "SimpleCrossAttnUpBlock2D"}
_MID_TYPES = {"UNetMidBlock2D", "UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn"}


def model_kind(model: nn.Module) -> str:
    """``"unet"`` or ``"chain"``; TypeError for unsupported classes."""
    name = type(model).__name__
    mro = [c.__name__ for c in type(model).__mro__]
    for n in mro:
        if n in UNET_CLASSES:
            return "unet"
        if n in CHAIN_CLASSES:
            return "chain"
    raise TypeError(f"unsupported model class {name}; supported: {', '.join(SUPPORTED_CLASSES)} "
                    "(or a pipeline with .unet / .transformer)")


def _check(block: nn.Module, allowed: set, where: str) -> None:
    n = type(block).__name__
    if n not in allowed:
        raise NotImplementedError(f"{where} is a {n}; block graphs support {', '.join(sorted(allowed))}")


def _seq(block: nn.Module, attr: str) -> list:
    m = getattr(block, attr, None)
    return list(m) if m is not None else []


def unet_fine_specs(model: nn.Module) -> tuple[list[dict], list[tuple]]:
    """Fine block specs of a UNet, plus the coarse grouping of them."""
    specs: list[dict] = []
    groups: list[tuple] = []

    def add(path, kind, stage, coord, producers, roles=None):
        specs.append(dict(name=path, module_paths=(path,), kind=kind, stage=stage, deepcache=coord,
                          producers=list(producers), residual=False, skip=None,
                          roles=list(roles or ["hidden"] * len(producers))))
        return len(specs) - 1

    def push_skip(i):
        skips.append(i)
        if i != EXTERNAL:
            specs[i]["skip"] = len(skips) - 1

    cur = EXTERNAL  # producer of the hidden stream (conv_in)
    skips = [EXTERNAL]  # skip 0 = conv_in output
    for i, blk in enumerate(model.down_blocks):
        _check(blk, _DOWN_TYPES, f"down_blocks.{i}")
        first = len(specs)
        resnets, attns = _seq(blk, "resnets"), _seq(blk, "attentions")
        for l in range(len(resnets)):
            cur = add(f"down_blocks.{i}.resnets.{l}", "resnet", "down", ("down", i, l), [cur])
            if l < len(attns) and attns[l] is not None:
                cur = add(f"down_blocks.{i}.attentions.{l}", "attention", "down", ("down", i, l), [cur])
            push_skip(cur)
        samplers = _seq(blk, "downsamplers")
        for k in range(len(samplers)):
            cur = add(f"down_blocks.{i}.downsamplers.{k}", "downsampler", "down", ("down", i, len(resnets)), [cur])
        if samplers:
            push_skip(cur)
        groups.append((f"down_blocks.{i}", (f"down_blocks.{i}",), list(range(first, len(specs))), "down_block",
                       "down"))
    mid = getattr(model, "mid_block", None)
    if mid is not None:
        _check(mid, _MID_TYPES, "mid_block")
        first = len(specs)
        resnets, attns = _seq(mid, "resnets"), _seq(mid, "attentions")
        cur = add("mid_block.resnets.0", "resnet", "mid", ("mid", 0, 0), [cur])
        for j in range(1, len(resnets)):
            if j - 1 < len(attns) and attns[j - 1] is not None:
                cur = add(f"mid_block.attentions.{j - 1}", "attention", "mid", ("mid", 0, 0), [cur])
            cur = add(f"mid_block.resnets.{j}", "resnet", "mid", ("mid", 0, 0), [cur])
        groups.append(("mid_block", ("mid_block",), list(range(first, len(specs))), "mid_block", "mid"))
    n_up = len(model.up_blocks)
    for i, blk in enumerate(model.up_blocks):
        _check(blk, _UP_TYPES, f"up_blocks.{i}")
        first = len(specs)
        rb = n_up - 1 - i  # DeepCache numbers up blocks from the output side
        resnets, attns = _seq(blk, "resnets"), _seq(blk, "attentions")
        for j in range(len(resnets)):
            if not skips:
                raise ValueError(f"up_blocks.{i}.resnets.{j} has no skip connection left to consume")
            skip_index = len(skips) - 1
            skip = skips.pop()
            rl = len(resnets) - 1 - j
            cur = add(f"up_blocks.{i}.resnets.{j}", "resnet", "up", ("up", rb, rl), [cur, skip], ["hidden", "skip"])
            specs[cur]["skip"] = skip_index
            if j < len(attns) and attns[j] is not None:
                cur = add(f"up_blocks.{i}.attentions.{j}", "attention", "up", ("up", rb, rl), [cur])
        for k in range(len(_seq(blk, "upsamplers"))):
            cur = add(f"up_blocks.{i}.upsamplers.{k}", "upsampler", "up", ("up", rb, 0), [cur])
        groups.append((f"up_blocks.{i}", (f"up_blocks.{i}",), list(range(first, len(specs))), "up_block", "up"))
    if skips:
        raise ValueError(f"{len(skips)} skip connection(s) are never consumed; unsupported UNet layout")
    _fill_consumers(specs, cur)
    return specs, groups


def chain_fine_specs(model: nn.Module, group_size: int = 4) -> tuple[list[dict], list[tuple]]:
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no transformer_blocks")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n = len(blocks)
    specs = [dict(name=f"transformer_blocks.{i}", module_paths=(f"transformer_blocks.{i}",), kind="transformer",
                  stage="chain", deepcache=None, producers=[i - 1 if i else EXTERNAL], residual=True, skip=None,
                  roles=["hidden"])
             for i in range(n)]
    _fill_consumers(specs, n - 1)
    groups = []
    for s in range(0, n, group_size):
        e = min(n, s + group_size)
        groups.append((f"transformer_blocks[{s}:{e}]", tuple(f"transformer_blocks.{i}" for i in range(s, e)),
                       list(range(s, e)), "transformer_group", "chain"))
    return specs, groups


def block_specs(model: nn.Module, granularity: str, group_size: int = 4) -> list[dict]:
    """Block specs (no MACs yet) of ``model`` at ``granularity``."""
    kind = model_kind(model)
    if kind == "unet":
        fine, groups = unet_fine_specs(model)
    else:
        fine, groups = chain_fine_specs(model, group_size)
    if granularity == "fine":
        return fine
    if granularity == "coarse":
        return _group(fine, groups)
    raise ValueError(f"granularity must be 'coarse' or 'fine', got {granularity!r}")
