"""LoRA adapters folded into their base weights for the calls that keep no graph.

An unmerged peft adapter costs two extra small matmuls (and their launches) per adapted layer
and call (docs/sdo.md measures what merging saves). Only the kept call needs the
adapters apart, for the gradient to reach them; the chain can run merged. The base weights are
copied before and copied back after, so many merge cycles leave them bit-exact (peft's own
unmerge subtracts the delta again and drifts by an ulp per cycle). The copies cost the adapted
layers' weights in memory while the chain runs; ``merge_adapters=False`` avoids them.
"""
from __future__ import annotations

import contextlib

import torch


def _unmerged_lora_layers(module: torch.nn.Module) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters
        return []
    return [m for m in module.modules()
            if isinstance(m, BaseTunerLayer) and not m.merged and not m.disable_adapters and m.active_adapters]


@contextlib.contextmanager
def merged_adapters(module: torch.nn.Module | None):
    """Merge ``module``'s active, unmerged peft adapters into their base layers for the block,
    then restore the base weights exactly. A module without adapters (or None) is left alone.
    Only for calls that keep no graph: inside, the adapters' parameters are not used."""
    layers = [] if module is None else _unmerged_lora_layers(module)
    if not layers:
        yield
        return
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                tensors = [t for t in (getattr(base, "weight", None), getattr(base, "bias", None)) if t is not None]
                saved.append((layer, [(t, t.detach().clone()) for t in tensors]))
                layer.merge()
        yield
    finally:
        with torch.no_grad():
            for layer, tensors in saved:
                if layer.merged:
                    layer.unmerge()  # peft's flags
                for t, original in tensors:
                    t.data.copy_(original)  # bit-exact base weights, as peft's merge writes them: via .data
