"""Model adapters: block graphs of diffusers denoisers, MAC accounting, bundled configs.

>>> from shortcut_kernels.models import build_model, block_graph
>>> unet = build_model("sd-1.5", device="meta")          # architecture only, no memory
>>> g = block_graph(unet, "fine", sample_shape=(1, 4, 64, 64))
>>> g.total_macs / 1e9                                  # ~338.6 GMACs per call
>>> g.cascade(keep); g.macs_saved({"mid_block.resnets.0"}); g.flops_share
>>> g.deepcache_keep(cache_branch_id=0)                 # a DeepCache retrieval step

Supported classes: ``UNet2DConditionModel`` (SD-1.5/2.1/SDXL), ``UNet2DModel``,
``DiTTransformer2DModel``, ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``.
See :mod:`.graph` (reuse semantics and the cascade rule), :mod:`.adapters` (which blocks),
:mod:`.macs` (the MAC convention), :mod:`.deepcache` (DeepCache numbering),
:mod:`.registry` (bundled configs, loading weights).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from .adapters import SUPPORTED_CLASSES, block_specs, model_kind
from .deepcache import (branch_from_layer_block, deepcache_keep, deepcache_table, num_branches, num_skips,
                        skip_keep, skip_of_branch)
from .graph import EXTERNAL, GRANULARITIES, Block, BlockGraph
from .macs import (_config_key, _shape_key, clear_cache as _clear_mac_cache, count_macs, default_sample_shape,
                   example_input_shapes, module_macs)
from .registry import available_models, build_model, config_path, load_model, model_config

_GRAPHS: dict[tuple, BlockGraph] = {}


def denoiser(model_or_pipe: Any) -> nn.Module:
    """The denoiser of a pipeline (``.unet`` or ``.transformer``), of a wrapper with a
    ``.backbone`` (the zoo models), or the model itself."""
    if isinstance(model_or_pipe, nn.Module):
        backbone = getattr(model_or_pipe, "backbone", None)
        if isinstance(backbone, nn.Module) and backbone is not model_or_pipe:
            try:
                model_kind(model_or_pipe)
            except TypeError:
                return backbone
        return model_or_pipe
    for attr in ("unet", "transformer"):
        m = getattr(model_or_pipe, attr, None)
        if isinstance(m, nn.Module):
            return m
    raise TypeError(f"expected a diffusers model or a pipeline with .unet/.transformer, "
                    f"got {type(model_or_pipe).__name__}")


def block_graph(model: Any, granularity: str = "coarse", sample_shape=None, *, text_tokens: int | None = None,
                inputs: Mapping[str, Any] | None = None, count_attention: bool = False,
                group_size: int = 4) -> BlockGraph:
    """The block graph of ``model`` (a diffusers model or a pipeline) at an input shape.

    Args:
        granularity: ``"coarse"`` (UNet: ``down_blocks.*``, ``mid_block``,
            ``up_blocks.*``; transformers: groups of ``group_size`` blocks) or ``"fine"``
            (UNet: resnets/attentions/samplers, DeepCache-numbered; transformers: each
            block).
        sample_shape: ``(B, C, H, W)`` of the latent; default: the native size, batch 1.
        text_tokens: length of the text conditioning (default 77 for UNets).
        inputs: explicit keyword arguments of one call (tensors or shapes), overriding
            the defaults (e.g. for unusual conditioning).
        count_attention: also count attention's activation matmuls (see :mod:`.macs`).
    Graphs are cached per (class, config, granularity, inputs); MACs are counted on the
    meta device and cached too.
    """
    model = denoiser(model)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    model_kind(model)  # TypeError for unsupported classes, before any counting
    mm = module_macs(model, sample_shape, text_tokens=text_tokens, inputs=inputs)
    key = (type(model).__qualname__, _config_key(model), granularity, _shape_key(mm.input_shapes), count_attention,
           group_size if model_kind(model) == "chain" else None)
    g = _GRAPHS.get(key)
    if g is not None:
        return g
    specs = block_specs(model, granularity, group_size)
    blocks = []
    for i, s in enumerate(specs):
        macs = sum(mm.macs(p, count_attention) for p in s["module_paths"])
        structure, shapes = mm.output(s["module_paths"][-1])  # a group outputs what its last member does
        reads = s.get("reads") or [[0] for _ in s["producers"]]
        blocks.append(Block(index=i, name=s["name"], module_paths=tuple(s["module_paths"]), macs=macs,
                            consumers=tuple(s["consumers"]), producers=tuple(s["producers"]),
                            residual=s["residual"], kind=s["kind"], stage=s["stage"], deepcache=s["deepcache"],
                            reads=tuple(tuple(r) for r in reads), skip=s.get("skip"),
                            output_structure=structure, output_shapes=tuple(shapes)))
    g = BlockGraph(model_class=type(model).__name__, granularity=granularity, blocks=tuple(blocks),
                   total_macs=mm.total(count_attention), input_shapes=mm.input_shapes,
                   count_attention=count_attention)
    _GRAPHS[key] = g
    return g


def clear_cache() -> None:
    """Forget the cached MAC counts and block graphs."""
    _clear_mac_cache()
    _GRAPHS.clear()


def get_modules(model: Any, block: Block | str | int, graph: BlockGraph | None = None) -> list[nn.Module]:
    """The module(s) a block runs (one for single-module blocks, several for groups)."""
    model = denoiser(model)
    if not isinstance(block, Block):
        if graph is None:
            raise ValueError("pass graph= to look a block up by name or index")
        block = graph[block]
    return [model.get_submodule(p) for p in block.module_paths]


def get_module(model: Any, block: Block | str | int, graph: BlockGraph | None = None) -> nn.Module:
    """The module of a single-module block (ValueError for a group: use get_modules)."""
    if isinstance(block, Block):
        block.module_path  # raises for groups
    mods = get_modules(model, block, graph)
    if len(mods) != 1:
        raise ValueError(f"block spans {len(mods)} modules; use get_modules()")
    return mods[0]


__all__ = [
    "EXTERNAL", "GRANULARITIES", "SUPPORTED_CLASSES", "Block", "BlockGraph", "block_graph", "denoiser",
    "get_module", "get_modules", "count_macs", "module_macs", "default_sample_shape", "example_input_shapes",
    "clear_cache", "available_models", "build_model", "load_model", "model_config", "config_path",
    "deepcache_keep", "deepcache_table", "num_branches", "num_skips", "skip_keep", "skip_of_branch",
    "branch_from_layer_block",
]
