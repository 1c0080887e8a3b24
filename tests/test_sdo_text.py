"""sdo.TextConditional: a diffusers text UNet (SD-1.5, SDXL layouts at toy width) as an SDO
model_fn: the batched CFG pair equals two plain calls, the shortcut gradient through it (with a
DiP-GO chain schedule) equals the reference autograd chain, and bad conditioning raises."""
from __future__ import annotations

import diffusers
import pytest
import torch

from shortcut_kernels import sdo
from shortcut_kernels.dipgo import deepcache
from shortcut_kernels.models import build_model

from _dipgo_models import light_and_reference_grads, tiny_sd15_unet

TINY_SDXL = {"block_out_channels": [16, 16, 32], "cross_attention_dim": 16, "norm_num_groups": 8,
             "attention_head_dim": [2, 2, 4], "transformer_layers_per_block": [1, 1, 1], "sample_size": 8,
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 16 + 6 * 8}

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_pair_equals_two_plain_calls():
    unet = tiny_sd15_unet()
    cond, uncond = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor(421)
    with torch.no_grad():
        eu, ec = sdo.TextConditional(unet, cond, uncond)(x, t)
        single = sdo.TextConditional(unet, cond.expand(3, -1, -1))(x, torch.tensor([421, 421, 421]))
        ref_u = unet(x, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
        ref_c = unet(x, t, encoder_hidden_states=cond.expand(3, -1, -1)).sample
    assert rel(eu, ref_u) <= 1e-5 and rel(ec, ref_c) <= 1e-5
    assert isinstance(single, torch.Tensor) and rel(single, ref_c) <= 1e-5


def test_sdxl_added_conditioning_reaches_each_half():
    unet = build_model("sdxl", overrides=TINY_SDXL)
    cond, uncond = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    added = {"text_embeds": torch.randn(2, 16), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    negative = {"text_embeds": torch.zeros(1, 16), "time_ids": added["time_ids"]}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(300)
    with torch.no_grad():
        eu, ec = sdo.TextConditional(unet, cond, uncond, added, negative)(x, t)
        ref_c = unet(x, t, encoder_hidden_states=cond, added_cond_kwargs={
            "text_embeds": added["text_embeds"], "time_ids": added["time_ids"].expand(2, -1)}).sample
        ref_u = unet(x, t, encoder_hidden_states=uncond, added_cond_kwargs={
            "text_embeds": torch.zeros(2, 16), "time_ids": added["time_ids"].expand(2, -1)}).sample
    assert rel(ec, ref_c) <= 1e-5 and rel(eu, ref_u) <= 1e-5


def test_shortcut_gradient_through_a_text_unet_and_a_chain_schedule():
    unet = tiny_sd15_unet().double().requires_grad_(False)
    embeds = torch.randn(2, 5, 16, dtype=torch.float64)
    fn = sdo.TextConditional(unet, embeds[:1], embeds[1:])
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False)
    sched.set_timesteps(8)
    chain = deepcache(unet, 8, 3, 0)
    x_T = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    grads = light_and_reference_grads(fn, sched, x_T, 4.0, chain)
    assert rel(grads[0], grads[1]) <= 1e-6 and grads[0].norm() > 0


def test_bad_conditioning_names_the_argument():
    unet = tiny_sd15_unet()
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        sdo.TextConditional(unet, torch.randn(5, 16))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        sdo.TextConditional(unet, torch.randn(1, 5, 16), torch.randn(1, 6, 16))
    fn = sdo.TextConditional(unet, torch.randn(2, 5, 16), torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match="prompt_embeds has 2 rows for a batch of 3"):
        fn(torch.randn(3, 4, 8, 8), torch.tensor(10))
