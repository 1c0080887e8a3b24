"""MAC accounting with ``torch.utils.flop_counter`` on the meta device.

Counting never computes: the model's architecture is rebuilt from its config on the
``meta`` device and called once with meta inputs under ``FlopCounterMode``; the counter
applies its shape formulas and attributes the FLOPs to modules. MACs = FLOPs / 2.
Results are cached per (model class, config, input shapes).

Convention. Published MAC counts of diffusion models (SD-1.5: 338.8 G per UNet call at
512x512; DeepCache's and DiP-GO's per-block tables) count the *parametric* layers only
(convolutions and linear layers, the thop convention). ``count_attention=False`` (the
default) follows it: a module's MACs are the MACs of the ``nn.Conv*``/``nn.Linear``
layers it contains. ``count_attention=True`` also counts the activation-by-activation
matmuls of attention (``q @ k^T`` and ``attn @ v``, i.e. everything FlopCounterMode
sees); for SD-1.5 at 512x512 that adds 63.0 G.
"""
from __future__ import annotations

import copy
import json
import threading
from typing import Any, Mapping

import torch
from torch import nn

_PARAM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)

_CACHE: dict[tuple, "ModuleMacs"] = {}
_LOCK = threading.Lock()

DEFAULT_TEXT_TOKENS = {
    "UNet2DConditionModel": 77,
    "PixArtTransformer2DModel": 120,
    "SD3Transformer2DModel": 333,  # 77 CLIP + 256 T5 tokens
}


class ModuleMacs:
    """FLOP counts of one model call, per module path (``""`` = the whole model)."""

    def __init__(self, all_flops: dict[str, int], param_flops: dict[str, int], input_shapes: dict,
                 outputs: dict[str, tuple[str, tuple]] | None = None):
        self._all = all_flops  # module path -> FLOPs of everything run inside it
        self._param = param_flops  # parametric leaf path -> its FLOPs
        self.input_shapes = input_shapes
        self.outputs = outputs or {}  # module path -> (structure, flat output shapes) of its (last) call

    def output(self, path: str) -> tuple[str, tuple]:
        """``(structure, shapes)`` of module ``path``'s output (see ``Block.output_structure``)."""
        return self.outputs.get(path, ("tensor", ()))

    def macs(self, path: str = "", count_attention: bool = False) -> int:
        """MACs of module ``path`` (``""``: the whole call)."""
        if count_attention:
            return self._all.get(path, 0) // 2
        if path == "":
            return sum(self._param.values()) // 2
        pre = path + "."
        return sum(v for k, v in self._param.items() if k == path or k.startswith(pre)) // 2

    def total(self, count_attention: bool = False) -> int:
        return self.macs("", count_attention)


def _config_key(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return f"id:{id(model)}"
    return json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")}, sort_keys=True, default=str)


def _meta_copy(model: nn.Module) -> nn.Module:
    """The same architecture on the meta device, without copying any weights."""
    params = list(model.parameters()) + list(model.buffers())
    if params and all(t.is_meta for t in params):
        return model  # already shape-only; a no-grad call does not change it
    cls = type(model)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cls, "from_config"):
        try:
            with torch.device("meta"):
                m = cls.from_config(dict(cfg))
            return m.to("meta").eval()
        except Exception:  # pragma: no cover - exotic subclasses: fall back to a copy
            pass
    return copy.deepcopy(model).to("meta").eval()


def _cfg(model, key, default=None):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return default
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def default_sample_shape(model: nn.Module, batch_size: int = 1) -> tuple[int, ...]:
    """``(B, C, H, W)`` at the model's native size (``config.sample_size``)."""
    c = _cfg(model, "in_channels")
    s = _cfg(model, "sample_size")
    if c is None or s is None:
        raise ValueError(f"{type(model).__name__}: cannot infer a sample shape; pass sample_shape=(B, C, H, W)")
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return (batch_size, c, h, w)


def example_input_shapes(model: nn.Module, sample_shape=None, text_tokens: int | None = None) -> dict[str, Any]:
    """Keyword arguments (as shapes, or ``("long", shape)`` for integer tensors) of one call.

    Supported: ``UNet2DConditionModel`` (incl. SDXL ``text_time`` conditioning, class
    labels, LCM ``timestep_cond``), ``UNet2DModel``, ``DiTTransformer2DModel``,
    ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``.
    """
    cls = type(model).__name__
    shape = tuple(int(x) for x in (sample_shape if sample_shape is not None else default_sample_shape(model)))
    if len(shape) != 4:
        raise ValueError(f"sample_shape must be (B, C, H, W), got {shape}")
    b = shape[0]
    if text_tokens is None:
        text_tokens = DEFAULT_TEXT_TOKENS.get(cls, 77)
    g = lambda k, d=None: _cfg(model, k, d)  # noqa: E731
    if cls == "UNet2DConditionModel":
        cad = g("cross_attention_dim")
        if isinstance(cad, (list, tuple)):
            if len(set(cad)) != 1:
                raise NotImplementedError(f"{cls} with per-block cross_attention_dim {cad}: pass inputs=")
            cad = cad[0]
        if g("encoder_hid_dim") is not None and g("encoder_hid_dim_type") in ("text_proj", "text_image_proj"):
            cad = g("encoder_hid_dim")
        kw: dict[str, Any] = {"sample": shape, "timestep": (b,), "encoder_hidden_states": (b, text_tokens, cad)}
        aet = g("addition_embed_type")
        if aet == "text_time":
            dim = g("projection_class_embeddings_input_dim") - 6 * g("addition_time_embed_dim")
            kw["added_cond_kwargs"] = {"text_embeds": (b, dim), "time_ids": (b, 6)}
        elif aet not in (None, "text"):
            raise NotImplementedError(f"{cls} with addition_embed_type={aet!r}: pass inputs= explicitly")
        cet, nce = g("class_embed_type"), g("num_class_embeds")
        if cet is None and nce is not None:
            kw["class_labels"] = ("long", (b,))
        elif cet == "timestep":
            kw["class_labels"] = (b,)
        elif cet in ("projection", "simple_projection"):
            kw["class_labels"] = (b, g("projection_class_embeddings_input_dim"))
        elif cet == "identity":
            kw["class_labels"] = (b, g("time_embedding_dim") or 4 * g("block_out_channels")[0])
        if g("time_cond_proj_dim") is not None:
            kw["timestep_cond"] = (b, g("time_cond_proj_dim"))
        return kw
    if cls == "UNet2DModel":
        kw = {"sample": shape, "timestep": (b,)}
        cet, nce = g("class_embed_type"), g("num_class_embeds")
        if cet is None and nce is not None:
            kw["class_labels"] = ("long", (b,))
        elif cet == "timestep":
            kw["class_labels"] = (b,)
        elif cet == "identity":
            kw["class_labels"] = (b, 4 * g("block_out_channels")[0])
        return kw
    if cls == "DiTTransformer2DModel":
        return {"hidden_states": shape, "timestep": ("long", (b,)), "class_labels": ("long", (b,))}
    if cls == "PixArtTransformer2DModel":
        return {"hidden_states": shape, "timestep": ("long", (b,)),
                "encoder_hidden_states": (b, text_tokens, g("caption_channels")),
                "added_cond_kwargs": {"resolution": (b, 2), "aspect_ratio": (b, 1)}}
    if cls == "SD3Transformer2DModel":
        return {"hidden_states": shape, "timestep": (b,),
                "encoder_hidden_states": (b, text_tokens, g("joint_attention_dim")),
                "pooled_projections": (b, g("pooled_projection_dim"))}
    raise NotImplementedError(f"no example inputs for {cls}; pass inputs= (a dict of tensors or shapes)")


def _materialise(spec):
    """Shapes -> meta tensors (recursively through dicts)."""
    if isinstance(spec, Mapping):
        return {k: _materialise(v) for k, v in spec.items()}
    if isinstance(spec, torch.Tensor):
        return torch.empty(spec.shape, dtype=spec.dtype, device="meta")
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "long":
        return torch.zeros(spec[1], dtype=torch.long, device="meta")
    if isinstance(spec, (tuple, list)) and all(isinstance(x, int) for x in spec):
        return torch.zeros(tuple(spec), device="meta")
    return spec


def _shape_key(spec):
    if isinstance(spec, Mapping):
        return tuple(sorted((k, _shape_key(v)) for k, v in spec.items()))
    if isinstance(spec, torch.Tensor):
        return ("tensor", tuple(spec.shape), str(spec.dtype))
    if isinstance(spec, list):
        return tuple(_shape_key(x) for x in spec)
    return spec


def _plain_shapes(spec):
    if isinstance(spec, Mapping):
        return {k: _plain_shapes(v) for k, v in spec.items()}
    if isinstance(spec, torch.Tensor):
        return tuple(spec.shape)
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "long":
        return tuple(spec[1])
    return spec


def describe_output(out) -> tuple[str, tuple]:
    """``(structure, flat shapes)`` of a module output: a tensor, a tuple of tensors, a
    UNet down block's ``(hidden, (skip, ...))`` or a ``BaseOutput`` (its tensors in order)."""
    if isinstance(out, torch.Tensor):
        return "tensor", (tuple(out.shape),)
    if isinstance(out, (tuple, list)):
        if len(out) == 2 and isinstance(out[0], torch.Tensor) and isinstance(out[1], (tuple, list)) \
                and all(isinstance(t, torch.Tensor) for t in out[1]):
            return "hidden_and_skips", (tuple(out[0].shape),) + tuple(tuple(t.shape) for t in out[1])
        return "tuple", tuple(tuple(t.shape) for t in out if isinstance(t, torch.Tensor))
    if hasattr(out, "to_tuple"):
        return "tuple", tuple(tuple(t.shape) for t in out.to_tuple() if isinstance(t, torch.Tensor))
    return "other", ()


def module_macs(model: nn.Module, sample_shape=None, *, text_tokens: int | None = None,
                inputs: Mapping[str, Any] | None = None) -> ModuleMacs:
    """Count one call of ``model`` (cached). ``inputs`` overrides the example inputs:
    a dict of keyword arguments given as tensors (only their shape/dtype is used) or
    shapes."""
    spec = dict(inputs) if inputs is not None else example_input_shapes(model, sample_shape, text_tokens)
    key = (type(model).__qualname__, _config_key(model), _shape_key(spec))
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    from torch.utils.flop_counter import FlopCounterMode

    meta = _meta_copy(model)
    kwargs = _materialise(spec)
    outputs: dict[str, tuple[str, tuple]] = {}
    hooks = []
    for name, mod in meta.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, name=name: outputs.__setitem__(name, describe_output(o))))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            meta(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    counts = fc.get_flop_counts()
    all_flops: dict[str, int] = {"": sum(counts.get("Global", {}).values())}
    for k, ops in counts.items():
        # keys are "<RootClass>.<module path>"; the root itself and "Global" carry the total
        _, _, rest = k.partition(".")
        if k != "Global" and rest:
            all_flops[rest] = sum(ops.values())
    param_flops = {}
    for name, mod in meta.named_modules():
        if name and isinstance(mod, _PARAM_LAYERS):
            f = all_flops.get(name, 0)
            if f:
                param_flops[name] = f
    res = ModuleMacs(all_flops, param_flops, _plain_shapes(spec), outputs)
    with _LOCK:
        _CACHE[key] = res
    return res


def count_macs(model: nn.Module, sample_shape=None, *, count_attention: bool = False, text_tokens: int | None = None,
               inputs: Mapping[str, Any] | None = None) -> int:
    """MACs of one whole call of ``model`` at ``sample_shape`` (default: native size, batch 1)."""
    return module_macs(model, sample_shape, text_tokens=text_tokens, inputs=inputs).total(count_attention)


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()

