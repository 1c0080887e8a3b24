"""Block graphs: block lists, topology (skip connections), cascade rule, MACs, DeepCache mapping."""
import random

import diffusers
import pytest
import torch

from shortcut_kernels.models import (
    EXTERNAL,
    Block,
    BlockGraph,
    block_graph,
    branch_from_layer_block,
    build_model,
    count_macs,
    get_module,
    get_modules,
    num_branches,
)
from shortcut_kernels.models.deepcache import min_branch

# --------------------------------------------------------------------------- tiny models


def tiny_sd_unet():
    """SD-1.5's layout (cross-attn down x2 + plain down; plain up + cross-attn up x2) at toy width."""
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()


def tiny_unet2d():
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4).eval()


def tiny_dit(num_layers=5):
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd-1.5", device="meta")


@pytest.fixture(scope="module")
def sd15_fine(sd15):
    return block_graph(sd15, "fine", sample_shape=(1, 4, 64, 64))


@pytest.fixture(scope="module")
def sd15_coarse(sd15):
    return block_graph(sd15, "coarse", sample_shape=(1, 4, 64, 64))


# --------------------------------------------------------------------------- block lists

TINY_SD_FINE = [
    "down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.1", "down_blocks.0.attentions.1",
    "down_blocks.0.downsamplers.0",
    "down_blocks.1.resnets.0", "down_blocks.1.attentions.0", "down_blocks.1.resnets.1", "down_blocks.1.attentions.1",
    "down_blocks.1.downsamplers.0",
    "down_blocks.2.resnets.0", "down_blocks.2.resnets.1",
    "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
    "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.resnets.2", "up_blocks.0.upsamplers.0",
    "up_blocks.1.resnets.0", "up_blocks.1.attentions.0", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1",
    "up_blocks.1.resnets.2", "up_blocks.1.attentions.2", "up_blocks.1.upsamplers.0",
    "up_blocks.2.resnets.0", "up_blocks.2.attentions.0", "up_blocks.2.resnets.1", "up_blocks.2.attentions.1",
    "up_blocks.2.resnets.2", "up_blocks.2.attentions.2",
]


def test_unet_condition_fine_block_list_and_paths():
    m = tiny_sd_unet()
    g = block_graph(m, "fine")
    assert g.names == TINY_SD_FINE
    assert [b.index for b in g] == list(range(len(TINY_SD_FINE)))
    for b in g:
        assert b.module_paths == (b.name,)
        mod = get_module(m, b)
        assert mod is m.get_submodule(b.name)
    kinds = {b.name: b.kind for b in g}
    assert kinds["down_blocks.0.attentions.1"] == "attention"
    assert kinds["down_blocks.1.downsamplers.0"] == "downsampler"
    assert kinds["up_blocks.1.upsamplers.0"] == "upsampler"
    assert kinds["mid_block.resnets.1"] == "resnet"
    assert not any(b.residual for b in g)


def test_unet_coarse_block_list_and_groups():
    m = tiny_sd_unet()
    g = block_graph(m, "coarse")
    assert g.names == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1",
                       "up_blocks.2"]
    assert [b.kind for b in g] == ["down_block"] * 3 + ["mid_block"] + ["up_block"] * 3
    assert isinstance(get_module(m, g["mid_block"]), diffusers.models.unets.unet_2d_blocks.UNetMidBlock2DCrossAttn)


def test_unet_skip_connections_fine():
    """Producers/consumers follow the forward: LIFO skips, conv_in feeding the last up resnet."""
    g = block_graph(tiny_sd_unet(), "fine")
    idx = {n: i for i, n in enumerate(g.names)}
    c = lambda n: {g.names[i] if i != EXTERNAL else "out" for i in g[n].consumers}  # noqa: E731
    p = lambda n: [g.names[i] if i != EXTERNAL else "in" for i in g[n].producers]  # noqa: E731
    # down path: a layer's output feeds the next module and one up resnet (skip)
    assert c("down_blocks.0.resnets.0") == {"down_blocks.0.attentions.0"}  # not a skip: the attention is
    assert c("down_blocks.0.attentions.0") == {"down_blocks.0.resnets.1", "up_blocks.2.resnets.1"}
    assert c("down_blocks.0.attentions.1") == {"down_blocks.0.downsamplers.0", "up_blocks.2.resnets.0"}
    assert c("down_blocks.0.downsamplers.0") == {"down_blocks.1.resnets.0", "up_blocks.1.resnets.2"}
    assert c("down_blocks.2.resnets.1") == {"mid_block.resnets.0", "up_blocks.0.resnets.0"}
    assert c("up_blocks.2.attentions.2") == {"out"}
    # up resnets read [hidden, skip]; the last one reads conv_in's output
    assert p("up_blocks.0.resnets.0") == ["mid_block.resnets.1", "down_blocks.2.resnets.1"]
    assert p("up_blocks.0.resnets.2") == ["up_blocks.0.resnets.1", "down_blocks.1.downsamplers.0"]
    assert p("up_blocks.1.resnets.0") == ["up_blocks.0.upsamplers.0", "down_blocks.1.attentions.1"]
    assert p("up_blocks.2.resnets.2") == ["up_blocks.2.attentions.1", "in"]
    assert p("down_blocks.0.resnets.0") == ["in"]
    # consumers and producers are the same relation
    for b in g:
        for q in b.consumers:
            if q != EXTERNAL:
                assert b.index in g.blocks[q].producers
                assert q > b.index  # execution order
        for q in b.producers:
            if q != EXTERNAL:
                assert b.index in g.blocks[q].consumers
    # every up resnet consumes exactly one skip; skips are consumed in reverse production order
    up_skips = [g[n].producers[1] for n in g.names if n.startswith("up_blocks") and ".resnets." in n]
    produced = [EXTERNAL] + [idx[n] for n in (
        "down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.0.downsamplers.0",
        "down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.1.downsamplers.0",
        "down_blocks.2.resnets.0", "down_blocks.2.resnets.1")]
    assert up_skips == produced[::-1]

def test_unet_skip_connections_coarse():
    g = block_graph(tiny_sd_unet(), "coarse")
    cons = {b.name: sorted(g.names[i] if i != EXTERNAL else "out" for i in b.consumers) for b in g}
    assert cons == {
        "down_blocks.0": ["down_blocks.1", "up_blocks.1", "up_blocks.2"],  # skips 1,2 -> up2; downsampler -> up1
        "down_blocks.1": ["down_blocks.2", "up_blocks.0", "up_blocks.1"],
        "down_blocks.2": ["mid_block", "up_blocks.0"],
        "mid_block": ["up_blocks.0"],
        "up_blocks.0": ["up_blocks.1"],
        "up_blocks.1": ["up_blocks.2"],
        "up_blocks.2": ["out"],
    }


def test_unet2dmodel_blocks_and_topology():
    m = tiny_unet2d()
    g = block_graph(m, "fine")
    assert g.model_class == "UNet2DModel"
    assert g.names == [
        "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0", "down_blocks.1.resnets.0",
        "down_blocks.1.attentions.0", "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
        "up_blocks.0.resnets.0", "up_blocks.0.attentions.0", "up_blocks.0.resnets.1", "up_blocks.0.attentions.1",
        "up_blocks.0.upsamplers.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]
    assert [g.names[i] for i in g["down_blocks.0.resnets.0"].consumers] == [
        "down_blocks.0.downsamplers.0", "up_blocks.1.resnets.0"]
    assert g["up_blocks.1.resnets.1"].producers == (g.index("up_blocks.1.resnets.0"), EXTERNAL)
    gc = block_graph(m, "coarse")
    assert [sorted(gc.names[i] for i in gc["down_blocks.0"].consumers)] == [
        ["down_blocks.1", "up_blocks.0", "up_blocks.1"]]


def test_dit_blocks_chain_and_groups():
    m = tiny_dit(5)
    g = block_graph(m, "fine")
    assert g.names == [f"transformer_blocks.{i}" for i in range(5)]
    assert all(b.residual for b in g)
    assert [b.consumers for b in g] == [(1,), (2,), (3,), (4,), (EXTERNAL,)]
    gc = block_graph(m, "coarse", group_size=2)
    assert gc.names == ["transformer_blocks[0:2]", "transformer_blocks[2:4]", "transformer_blocks[4:5]"]
    assert gc.blocks[0].module_paths == ("transformer_blocks.0", "transformer_blocks.1")
    assert [b.consumers for b in gc] == [(1,), (2,), (EXTERNAL,)]
    assert sum(b.macs for b in gc) == sum(b.macs for b in g)
    mods = get_modules(m, gc.blocks[1])
    assert mods == [m.transformer_blocks[2], m.transformer_blocks[3]]
    with pytest.raises(ValueError, match="get_modules"):
        get_module(m, gc.blocks[1])
    # reusing a residual transformer block never cascades
    assert g.cascade([True, False, False, False, True]) == [True, False, False, False, True]
    assert g.macs_saved({"transformer_blocks.3"}) == g["transformer_blocks.3"].macs


def test_pixart_and_sd3_chains():
    p = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=3, sample_size=8, patch_size=2, caption_channels=16,
                                           cross_attention_dim=16)
    s = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    for m in (p, s):
        g = block_graph(m, "fine")
        assert g.names == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
        assert all(b.macs > 0 for b in g) and g.overhead_macs > 0
        assert g.total_macs == sum(b.macs for b in g) + g.overhead_macs


# --------------------------------------------------------------------------- topology vs. real data flow


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _replace(out, new):
    if isinstance(out, torch.Tensor):
        return new
    return (new,) + tuple(out[1:])


def _run(model, graph, kwargs, keep=None, cache=None, record=None, perturb=None):
    """One call; reused blocks return their cached output (residual blocks: input + cached delta)."""
    handles = []
    for b in graph.blocks:
        mod = get_module(model, b)

        def hook(mod, args, kw, out, b=b):
            x = args[0] if args else next(iter(kw.values()))
            if record is not None:
                record[b.index] = (_first(out) - x) if b.residual else _first(out)
            if keep is not None and not keep[b.index]:
                new = x + cache[b.index] if b.residual else cache[b.index]
                return _replace(out, new)
            if perturb is not None and perturb == b.index:
                g = torch.Generator().manual_seed(b.index)
                return _replace(out, _first(out) + torch.randn(_first(out).shape, generator=g))
            return out

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(**kwargs, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    return out


def _inputs(model, seed):
    g = torch.Generator().manual_seed(seed)
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        return dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10 + seed]),
                    encoder_hidden_states=torch.randn(1, 3, 8, generator=g))
    if name == "UNet2DModel":
        return dict(sample=torch.randn(1, 3, 8, 8, generator=g), timestep=torch.tensor([10 + seed]))
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10 + seed]),
                class_labels=torch.tensor([seed % 10]))


@pytest.mark.parametrize("make", [tiny_sd_unet, tiny_unet2d, tiny_dit], ids=["unet_cond", "unet2d", "dit"])
def test_cascade_matches_real_dataflow(make, fresh_seed, one_thread):
    """Reusing what the cascade adds changes nothing; every block the cascade keeps matters."""
    torch.manual_seed(0)
    model = make()
    g = block_graph(model, "fine")
    cache = {}
    _run(model, g, _inputs(model, 1), record=cache)  # "previous step" fills the cache
    kw = _inputs(model, 2)
    rng = random.Random(fresh_seed)
    masks = [[b.stage != "mid" for b in g.blocks]]  # reuse the mid block only
    masks += [[rng.random() < 0.6 for _ in g.blocks] for _ in range(3)]
    for keep in masks:
        eff = g.cascade(keep)
        assert all(k or not e for k, e in zip(keep, eff))  # cascade only removes
        y_keep = _run(model, g, kw, keep=keep, cache=cache)
        y_eff = _run(model, g, kw, keep=eff, cache=cache)
        assert torch.equal(y_keep, y_eff)
        for i in (i for i, e in enumerate(eff) if e):
            y_pert = _run(model, g, kw, keep=eff, cache=cache, perturb=i)
            assert not torch.allclose(y_pert, y_eff), f"kept block {g.names[i]} has no effect on the output"


def test_cascade_rule_on_hand_built_graph():
    # 0 -> 1, 0 -> 2 (skip), 1 -> 2, 2 -> out ; 3 residual reading 2? keep it simple: chain 2 -> 3(res) -> out
    blocks = (
        Block(0, "a", ("a",), 10, (1, 2), (EXTERNAL,)),
        Block(1, "b", ("b",), 20, (2,), (0,)),
        Block(2, "c", ("c",), 30, (3,), (0, 1)),
        Block(3, "d", ("d",), 40, (EXTERNAL,), (2,), residual=True),
    )
    g = BlockGraph("Toy", "fine", blocks, total_macs=105)
    assert g.overhead_macs == 5
    assert g.cascade([True] * 4) == [True] * 4
    assert g.cascade([True, False, True, True]) == [True, False, True, True]  # a still feeds c
    assert g.cascade([True, True, False, True]) == [False, False, False, True]  # c reused: a, b dead
    assert g.cascade([True, True, True, False]) == [True, True, True, False]  # d residual: still reads c
    assert g.cascade_set("c") == [0, 1, 2]
    assert g.macs_saved({"c"}) == 60 and g.macs_saved(["d"]) == 40
    assert g.cascaded_macs == [10, 20, 60, 40]
    assert g.flops_share == pytest.approx([10 / 105, 20 / 105, 60 / 105, 40 / 105])
    assert g.macs_kept([True, True, False, True]) == 5 + 40
    # batched tensor masks [T, N] give the same answer row by row
    rows = [[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]]
    out = g.cascade(torch.tensor(rows))
    assert out.dtype == torch.bool and out.shape == (4, 4)
    assert out.tolist() == [g.cascade(r) for r in rows]
    with pytest.raises(ValueError, match="4 entries"):
        g.cascade([True, True])
    with pytest.raises(KeyError, match="no block named"):
        g.macs_saved({"zzz"})


# --------------------------------------------------------------------------- MACs


# DiP-GO's published per-block MACs of SD-1.5 (512x512, batch 1; conv + linear layers), in G
DIPGO_SD15 = {"down_blocks.0": 32.9392, "down_blocks.1": 31.3169, "down_blocks.2": 31.4594, "down_blocks.3": 3.7791,
              "mid_block": 6.0285, "up_blocks.0": 12.9049, "up_blocks.1": 75.1374, "up_blocks.2": 79.1231,
              "up_blocks.3": 66.0427}


def test_sd15_total_macs_match_published(sd15_coarse, sd15_fine):
    assert sd15_coarse.total_macs == pytest.approx(338.8e9, rel=0.01)
    assert sd15_fine.total_macs == sd15_coarse.total_macs
    for name, ref in DIPGO_SD15.items():
        assert sd15_coarse[name].macs == pytest.approx(ref * 1e9, rel=0.01), name
    # the non-prunable rest (conv_in, conv_out, time embedding) is small but accounted
    assert 0 < sd15_coarse.overhead_macs < 0.001 * sd15_coarse.total_macs
    assert sd15_coarse.total_macs == sum(b.macs for b in sd15_coarse) + sd15_coarse.overhead_macs


def test_sd15_fine_blocks_partition_coarse(sd15_fine, sd15_coarse):
    assert len(sd15_fine) == 44
    for cb in sd15_coarse:
        members = [b for b in sd15_fine if b.name.startswith(cb.name + ".")]
        assert members and sum(b.macs for b in members) == cb.macs, cb.name


def test_attention_matmuls_counted_on_request(sd15):
    full = count_macs(sd15, (1, 4, 64, 64), count_attention=True)
    base = count_macs(sd15, (1, 4, 64, 64))
    # q@k^T and attn@v of 16 transformer blocks: 2*N*N*C (self) + 2*N*77*C (cross)
    expected = sum(n * (2 * (hw * hw) * c + 2 * hw * 77 * c) for n, hw, c in
                   [(5, 4096, 320), (5, 1024, 640), (5, 256, 1280), (1, 64, 1280)])
    assert full - base == expected


def test_macs_scale_with_batch_and_are_cached(sd15):
    g1 = block_graph(sd15, "coarse", sample_shape=(1, 4, 32, 32))
    g2 = block_graph(sd15, "coarse", sample_shape=(2, 4, 32, 32))
    assert g2.total_macs == 2 * g1.total_macs
    assert [b.macs for b in g2] == [2 * b.macs for b in g1]
    assert block_graph(sd15, "coarse", sample_shape=(1, 4, 32, 32)) is g1


def test_cascade_on_sd15_coarse(sd15_coarse):
    g = sd15_coarse
    reused = {g.names[i] for i in g.cascade_set("up_blocks.1")}
    # up_blocks.1 reads up_blocks.0 (hence mid, down_blocks.3) and the skips of down_blocks.2
    assert reused == {"up_blocks.1", "up_blocks.0", "mid_block", "down_blocks.3", "down_blocks.2"}
    assert g.macs_saved({"up_blocks.1"}) == sum(g[n].macs for n in reused)
    assert g.cascade_set("down_blocks.0") == [0]  # its consumers still compute
    assert g.cascade_set("up_blocks.3") == list(range(9))  # reusing the last block reuses the whole call
    assert g.flops_share[g.index("mid_block")] == pytest.approx(g["mid_block"].macs / g.total_macs)


def test_dit_xl2_macs_match_published():
    m = build_model("dit-xl-2", device="meta")
    g = block_graph(m, "fine", count_attention=True)
    assert len(g) == 28
    # DiT paper: 118.6 Gflops (fvcore: multiply-adds of all matmuls) at 256x256
    assert g.total_macs == pytest.approx(118.6e9, rel=0.01)
    assert len({b.macs for b in g}) == 1  # identical blocks


def test_sdxl_topology():
    m = build_model("sdxl", device="meta")
    g = block_graph(m, "coarse")
    assert g.names == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1",
                       "up_blocks.2"]
    cons = {b.name: sorted(g.names[i] for i in b.consumers if i != EXTERNAL) for b in g}
    assert cons["down_blocks.2"] == ["mid_block", "up_blocks.0"]  # no downsampler in the last down block
    assert cons["down_blocks.1"] == ["down_blocks.2", "up_blocks.0", "up_blocks.1"]
    assert cons["down_blocks.0"] == ["down_blocks.1", "up_blocks.1", "up_blocks.2"]
    gf = block_graph(m, "fine")
    assert len(gf) == 32 and num_branches(gf) == 9
    assert "down_blocks.0.attentions.0" not in gf.names and "down_blocks.1.attentions.1" in gf.names
    assert g.input_shapes["added_cond_kwargs"] == {"text_embeds": (1, 1280), "time_ids": (1, 6)}


# --------------------------------------------------------------------------- DeepCache


def test_deepcache_coordinates_follow_deepcache_numbering(sd15_fine):
    g = sd15_fine
    coord = {b.name: b.deepcache for b in g}
    assert coord["down_blocks.0.resnets.0"] == ("down", 0, 0)
    assert coord["down_blocks.0.attentions.1"] == ("down", 0, 1)
    assert coord["down_blocks.2.downsamplers.0"] == ("down", 2, 2)  # layer = len(resnets)
    assert coord["mid_block.attentions.0"] == ("mid", 0, 0)
    assert coord["up_blocks.0.resnets.0"] == ("up", 3, 2)  # up blocks counted from the output side
    assert coord["up_blocks.3.attentions.2"] == ("up", 0, 0)
    assert coord["up_blocks.1.upsamplers.0"] == ("up", 2, 0)
    assert num_branches(g) == 12


def test_deepcache_branch_masks(sd15_fine):
    g = sd15_fine
    kept = lambda m: {g.names[i] for i, k in enumerate(m) if k}  # noqa: E731
    assert kept(g.deepcache_keep(0)) == {"up_blocks.3.resnets.2", "up_blocks.3.attentions.2"}
    assert kept(g.deepcache_keep(11)) == {b.name for b in g if b.stage != "mid"}
    assert kept(g.deepcache_keep(3)) == {
        "down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.1",
        "down_blocks.0.attentions.1", "down_blocks.0.downsamplers.0",
        "up_blocks.2.resnets.2", "up_blocks.2.attentions.2", "up_blocks.2.upsamplers.0",
        "up_blocks.3.resnets.0", "up_blocks.3.attentions.0", "up_blocks.3.resnets.1", "up_blocks.3.attentions.1",
        "up_blocks.3.resnets.2", "up_blocks.3.attentions.2"}
    prev = set()
    for k in range(num_branches(g)):
        keep = g.deepcache_keep(k)
        assert set(kept(keep)) > prev  # deeper branch: strictly more computation
        prev = set(kept(keep))
        # a DeepCache step is closed under the cascade rule ...
        assert g.cascade(keep) == keep
        # ... and is exactly the cascade of "reuse the mid block and the up path below branch k"
        mb = min_branch(g)
        up_only = [not (b.stage == "mid" or (b.stage == "up" and mb[b.index] > k)) for b in g]
        assert g.cascade(up_only) == keep
        # kept up layers read fresh skips only
        for b in g:
            if keep[b.index] and b.stage == "up" and b.kind == "resnet":
                skip = b.producers[1]
                assert skip == EXTERNAL or keep[skip], (k, b.name)


def test_deepcache_pipeline_numbering_is_branch_plus_one(sd15_fine):
    g = sd15_fine
    layers = {0: 3, 1: 3, 2: 3, 3: 2}  # resnet layers (+ downsampler) per down block
    for L, n in layers.items():
        for B in range(n):
            k = branch_from_layer_block(g, L, B)
            assert k == 3 * L + B + 1
            assert g.deepcache_keep(cache_layer_id=L, cache_block_id=B) == g.deepcache_keep(k)
    # the DeepCache pipelines' default (0, 0): conv_in + first down layer, last two up layers
    kept = {g.names[i] for i, k in enumerate(g.deepcache_keep(cache_layer_id=0, cache_block_id=0)) if k}
    assert kept == {"down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "up_blocks.3.resnets.1",
                    "up_blocks.3.attentions.1", "up_blocks.3.resnets.2", "up_blocks.3.attentions.2"}


def test_deepcache_bad_arguments(sd15_fine, sd15_coarse):
    with pytest.raises(ValueError, match="fine"):
        sd15_coarse.deepcache_keep(0)
    with pytest.raises(ValueError, match="out of range"):
        sd15_fine.deepcache_keep(12)
    with pytest.raises(ValueError, match="not both"):
        sd15_fine.deepcache_keep(1, cache_layer_id=0, cache_block_id=0)
    with pytest.raises(ValueError, match="cache_block_id"):
        sd15_fine.deepcache_keep(cache_layer_id=3, cache_block_id=2)
    with pytest.raises(ValueError, match="fine"):
        block_graph(tiny_dit(2), "fine").deepcache_keep(0)


# --------------------------------------------------------------------------- errors / misc


def test_bad_model_and_granularity():
    with pytest.raises(TypeError, match="unsupported model class Linear"):
        block_graph(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="granularity"):
        block_graph(tiny_dit(2), "medium")
    with pytest.raises(ValueError, match="group_size"):
        block_graph(tiny_dit(2), "coarse", group_size=0)
    with pytest.raises(TypeError, match="pipeline"):
        block_graph(object())


def test_pipeline_like_object_and_graph_export():
    m = tiny_dit(3)

    class Pipe:
        transformer = m

    g = block_graph(Pipe(), "fine")
    assert g.model_class == "DiTTransformer2DModel"
    d = g.to_dict()
    assert [b["name"] for b in d["blocks"]] == g.names
    assert d["total_macs"] == g.total_macs and d["blocks"][2]["consumers"] == [EXTERNAL]
    assert "transformer_blocks.2" in g.summary()
    assert g.index("transformer_blocks.1") == 1 and g[-1].name == "transformer_blocks.2"


def test_meta_count_equals_count_on_real_tensors(one_thread):
    """Counting on the meta device gives what FlopCounterMode measures on a real CPU call.

    (On CPU tensors SDPA runs a fused kernel FlopCounterMode has no formula for, so only
    the conv/linear part is comparable; the attention matmuls are checked analytically.)
    """
    from torch.utils.flop_counter import FlopCounterMode

    # (number of attention layers, tokens, channels), text tokens
    attn = {tiny_sd_unet: ([(5, 64, 8), (5, 16, 16), (1, 4, 16)], 3), tiny_dit: ([(5, 16, 16)], 0)}
    for make, (layers, text) in attn.items():
        m = make()
        kw = _inputs(m, 0)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(**kw)
        convlin = sum(v for k, v in fc.get_flop_counts()["Global"].items()
                      if str(k) in ("aten.convolution", "aten.addmm", "aten.mm"))
        assert convlin > 0 and count_macs(m, inputs=kw) == convlin // 2
        expected = sum(n * (2 * t * t * c + 2 * t * text * c) for n, t, c in layers)
        assert count_macs(m, inputs=kw, count_attention=True) - count_macs(m, inputs=kw) == expected


def test_soft_cascade_is_exact_on_hard_gates_and_differentiable(sd15_fine, fresh_seed):
    g = sd15_fine
    gen = torch.Generator().manual_seed(fresh_seed)
    hard = (torch.rand(6, len(g), generator=gen) < 0.7).float().requires_grad_(True)
    soft = g.cascade(hard)
    assert soft.dtype == torch.float32
    assert torch.equal(soft.bool(), g.cascade(hard.detach().bool()))
    assert soft.detach().tolist() == [[float(x) for x in g.cascade(r.bool().tolist())] for r in hard.detach()]
    # reusing the last block's consumer (the output) is impossible: d eff/d keep of a live block is 1
    soft[:, -1].sum().backward()
    assert torch.equal(hard.grad[:, -1], torch.ones(6))
    # gradients reach producers through the cascade: the mid block's keep gate matters via its consumer
    probs = torch.full((len(g),), 0.5, requires_grad=True)
    g.cascade(probs)[g.index("mid_block.resnets.0")].backward()
    assert probs.grad[g.index("up_blocks.0.resnets.0")] > 0


# --------------------------------------------------------------------------- outputs, reads, skips (runtime needs)


def _record_outputs(model, paths, kwargs):
    got, hooks = {}, []
    for p in paths:
        hooks.append(model.get_submodule(p).register_forward_hook(
            lambda m, a, o, p=p: got.__setitem__(p, o)))
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.mark.parametrize("gran", ["fine", "coarse"])
def test_output_shapes_and_reads_match_a_real_call(gran, one_thread):
    """Block.output_shapes/structure are what the modules return; `reads` names the tensor each consumer gets."""
    from shortcut_kernels.models.macs import describe_output

    m = tiny_sd_unet()
    kw = _inputs(m, 3)
    g = block_graph(m, gran, inputs=kw)
    got = _record_outputs(m, [b.module_paths[-1] for b in g], kw)
    for b in g:
        structure, shapes = describe_output(got[b.module_paths[-1]])
        assert (b.output_structure, b.output_shapes) == (structure, shapes), b.name
        assert len(b.reads) == len(b.producers)
        for p, r in zip(b.producers, b.reads):
            assert all(0 <= i < (len(g[p].output_shapes) if p != EXTERNAL else 1) for i in r)
    if gran == "coarse":
        # up_blocks.0 reads the two last skips of down_blocks.2 and nothing else of it
        up0, d2 = g["up_blocks.0"], g.index("down_blocks.2")
        assert up0.reads[up0.producers.index(d2)] == (1, 2)
        assert g["mid_block"].reads == ((0,),)
        # every skip of every down block is read by exactly one up block
        for d in (b for b in g if b.kind == "down_block"):
            readers = [i for c in d.consumers if c != EXTERNAL and g[c].kind == "up_block"
                       for i in g[c].reads[g[c].producers.index(d.index)]]
            assert sorted(readers) == list(range(1, len(d.output_shapes)))
    else:
        assert g["down_blocks.0.attentions.0"].output_structure == "tuple"
        assert [b.skip for b in g if b.stage == "down" and b.skip is not None] == list(range(1, 9))
        assert [b.skip for b in g if b.stage == "up" and b.kind == "resnet"] == list(range(8, -1, -1))


def test_graph_dict_roundtrip():
    g = block_graph(tiny_sd_unet(), "coarse")
    assert BlockGraph.from_dict(g.to_dict()) == g
    g = block_graph(tiny_dit(3), "fine")
    assert BlockGraph.from_dict(g.to_dict()) == g


def test_live_separates_reads_from_dead_blocks():
    g = block_graph(tiny_sd_unet(), "coarse")
    keep = g.cascade([True, True, True, False, False, True, True])  # reuse mid + up_blocks.0
    live = g.live(keep)
    # up_blocks.0 is read from its cache by up_blocks.1; mid and down_blocks.2 feed nothing that runs
    assert live[g.index("up_blocks.0")] and not live[g.index("mid_block")]
    assert not live[g.index("down_blocks.2")] and not keep[g.index("down_blocks.2")]


def test_deepcache_numberings_on_one_layer_per_block_unet():
    """The zoo layout (layers_per_block=1): package branch k (block k//3, layer k%3) and skip indices differ."""
    from shortcut_kernels.models import num_skips, skip_keep, skip_of_branch
    from shortcut_kernels.zoo.models import UNET_CONFIG

    m = diffusers.UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": [8, 16, 16], "cross_attention_dim": 8,
                                          "attention_head_dim": 4, "norm_num_groups": 4})
    g = block_graph(m, "fine", sample_shape=(1, 1, 16, 16), text_tokens=1)
    assert num_branches(g) == 9 and num_skips(g) == 6
    assert [skip_of_branch(g, k) for k in range(9)] == [0, 1, 1, 2, 3, 3, 4, 5, 5]
    for s in range(6):
        keep = skip_keep(g, s)
        assert g.cascade(keep) == keep
        fresh = {b.skip for b in g if b.stage == "up" and b.kind == "resnet" and keep[b.index]}
        assert fresh == set(range(s + 1))  # skips 0..s consumed fresh, nothing deeper
        for b in g:  # a kept up resnet reads a fresh skip
            if keep[b.index] and b.kind == "resnet" and b.stage == "up" and b.producers[1] != EXTERNAL:
                assert keep[b.producers[1]]
    # the pipelines' (layer, block) numbering is the skip index
    assert branch_from_layer_block(g, 0, 0) == 1 and branch_from_layer_block(g, 1, 1) == 4
    assert g.deepcache_keep(cache_layer_id=1, cache_block_id=0) == skip_keep(g, 3)
    # package branch 2 keeps what branch 1 keeps: the downsampler it also runs is dead
    assert g.deepcache_keep(2) == g.deepcache_keep(1) == skip_keep(g, 1)
    with pytest.raises(ValueError, match="out of range"):
        skip_keep(g, 6)
    with pytest.raises(ValueError, match="out of range"):
        g.deepcache_keep(9)
