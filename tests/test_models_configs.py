"""Bundled configs, build_model (offline, random weights) and load_model (local weights)."""
import json
from importlib import resources

import diffusers
import pytest
import torch

from shortcut_kernels.models import available_models, block_graph, build_model, load_model, model_config


def test_available_models_and_bundled_files():
    assert available_models() == ["sd-1.5", "sd-2.1", "sdxl", "dit-xl-2"]
    files = sorted(p.name for p in resources.files("shortcut_kernels.models").joinpath("configs").iterdir()
                   if p.name.endswith(".json"))
    assert files == sorted(f"{n}.json" for n in available_models())  # no orphan, none missing


def test_public_config_values():
    sd15 = model_config("sd-1.5")
    assert sd15["_class_name"] == "UNet2DConditionModel"
    assert sd15["cross_attention_dim"] == 768 and sd15["block_out_channels"] == [320, 640, 1280, 1280]
    assert sd15["attention_head_dim"] == 8 and sd15["sample_size"] == 64
    sd21 = model_config("sd-2.1")
    assert sd21["cross_attention_dim"] == 1024 and sd21["attention_head_dim"] == [5, 10, 20, 20]
    assert sd21["use_linear_projection"] is True and sd21["sample_size"] == 96
    xl = model_config("sdxl")
    assert xl["block_out_channels"] == [320, 640, 1280] and xl["transformer_layers_per_block"] == [1, 2, 10]
    assert xl["addition_embed_type"] == "text_time" and xl["projection_class_embeddings_input_dim"] == 2816
    assert xl["cross_attention_dim"] == 2048
    assert xl["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    dit = model_config("dit-xl-2")
    assert (dit["num_layers"], dit["num_attention_heads"], dit["attention_head_dim"], dit["patch_size"]) == (28, 16, 72, 2)
    assert (dit["in_channels"], dit["out_channels"], dit["sample_size"]) == (4, 8, 32)
    assert dit["num_embeds_ada_norm"] == 1000 and dit["norm_type"] == "ada_norm_zero"
    # a fresh copy every time
    sd15["cross_attention_dim"] = 1
    assert model_config("sd-1.5")["cross_attention_dim"] == 768


# published parameter counts of the real checkpoints
PARAMS = {"sd-1.5": 859_520_964, "sd-2.1": 865_910_724, "sdxl": 2_567_463_684}


@pytest.mark.parametrize("name", ["sd-1.5", "sd-2.1", "sdxl"])
def test_unet_architectures_match_published_parameter_counts(name):
    m = build_model(name, device="meta")
    assert type(m) is diffusers.UNet2DConditionModel
    assert all(p.is_meta for p in m.parameters())
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name]


def test_dit_architecture_matches_published_parameter_count():
    m = build_model("dit-xl-2", device="meta")
    assert type(m) is diffusers.DiTTransformer2DModel
    # DiT-XL/2 has 675,129,632 parameters (pos_embed included); diffusers stores the
    # fixed pos_embed as a buffer and repeats the timestep/class embedder in every block
    core = sum(p.numel() for n, p in m.named_parameters()
               if not (".norm1.emb." in n and not n.startswith("transformer_blocks.0.")))
    assert core + m.pos_embed.pos_embed.numel() == 675_129_632


def test_build_model_names_and_errors():
    m = build_model("SD1.5", device="meta")  # aliases, case-insensitive
    assert m.config.cross_attention_dim == 768
    with pytest.raises(ValueError) as e:
        build_model("sd-3.5", device="meta")
    for n in available_models():
        assert n in str(e.value)
    assert "sd-3.5" in str(e.value)
    with pytest.raises(TypeError):
        build_model(None)
    with pytest.raises(ValueError, match="num_layerz"):
        build_model("dit-xl-2", device="meta", overrides={"num_layerz": 2})


def test_build_model_dtype_device_and_seed():
    m = build_model("sd-1.5", dtype=torch.float16, device="meta")
    assert {p.dtype for p in m.parameters()} == {torch.float16}
    small = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}
    a = build_model("dit-xl-2", seed=3, overrides=small)
    b = build_model("dit-xl-2", seed=3, overrides=small)
    c = build_model("dit-xl-2", seed=4, overrides=small, dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" for p in a.parameters())
    w = lambda m: m.transformer_blocks[0].attn1.to_q.weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a).to(torch.bfloat16), w(c))
    assert w(c).dtype == torch.bfloat16 and not a.training
    with torch.no_grad():
        y = a(torch.randn(1, 4, 32, 32), timestep=torch.tensor([5]), class_labels=torch.tensor([1])).sample
    assert y.shape == (1, 8, 32, 32) and torch.isfinite(y).all()


# --------------------------------------------------------------------------- load_model


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)


def test_load_model_from_model_dir(tmp_path):
    src = _tiny_unet()
    src.save_pretrained(tmp_path / "unet")
    m = load_model(tmp_path / "unet")
    assert type(m) is diffusers.UNet2DConditionModel and not m.training
    for (n, p), (_, q) in zip(src.state_dict().items(), m.state_dict().items()):
        assert torch.equal(p, q), n
    m16 = load_model(str(tmp_path / "unet"), dtype=torch.float16)
    assert m16.conv_in.weight.dtype == torch.float16
    assert block_graph(m, "fine").names == block_graph(src, "fine").names


def test_load_model_from_pipeline_dir(tmp_path):
    src = _tiny_unet()
    src.save_pretrained(tmp_path / "unet")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "unet": ["diffusers", "UNet2DConditionModel"]}))
    m = load_model(tmp_path)
    assert torch.equal(m.conv_in.weight, src.conv_in.weight)
    m2 = load_model(tmp_path, subfolder="unet")
    assert torch.equal(m2.conv_out.bias, src.conv_out.bias)


def test_load_model_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(missing)
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.safetensors"):
        load_model(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_model(bad)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKL.*not supported"):
        load_model(vae)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps(dict(_tiny_unet().config)))
    with pytest.raises(ValueError, match="noweights"):
        load_model(noweights)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="unet/ or transformer/"):
        load_model(pipe)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_model(pipe, subfolder="text_encoder")
