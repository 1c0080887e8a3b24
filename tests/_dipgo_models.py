"""Tiny models, pipelines and sampling loops shared by the tests (DiP-GO and the SDO model wrappers)."""
from __future__ import annotations

import diffusers
import torch

from shortcut_kernels import zoo
from shortcut_kernels.models import build_model
from shortcut_kernels.models.deepcache import package_helper


def tiny_sd15_unet(seed: int = 0):
    """SD-1.5's UNet layout (4 blocks, 2 layers each, cross-attention) at toy width, from the bundled config."""
    return build_model("sd-1.5", seed=seed, overrides={
        "block_out_channels": [16, 16, 32, 32], "cross_attention_dim": 16, "norm_num_groups": 8,
        "attention_head_dim": 4, "sample_size": 16})


def tiny_dit(seed: int = 0, layers: int = 4):
    return build_model("dit-xl-2", seed=seed, overrides={
        "num_layers": layers, "num_attention_heads": 2, "attention_head_dim": 8, "sample_size": 8, "in_channels": 4,
        "out_channels": 8})


def tiny_unet2d(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4).eval()


def tiny_pixart(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
        patch_size=2, caption_channels=16, cross_attention_dim=16).eval()


def tiny_sd_pipeline(unet=None, scheduler_cls=diffusers.DDIMScheduler):
    """A StableDiffusionPipeline built from configs (random weights, no tokenizer: pass prompt_embeds)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = unet if unet is not None else tiny_sd15_unet()
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                      num_hidden_layers=1, vocab_size=100, max_position_embeddings=77)).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"],
                                  up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=8,
                                  sample_size=16).eval()
    sched = scheduler_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          **({"clip_sample": False} if "clip_sample" in scheduler_cls.__init__.__code__.co_varnames else {}),
                          **({"skip_prk_steps": True, "steps_offset": 1} if scheduler_cls is diffusers.PNDMScheduler
                             else {}))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(batch: int = 1, tokens: int = 5, dim: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, tokens, dim, generator=g)


def run_pipe(pipe, steps, seed=0, batch=1, **kw):
    pe, ne = prompt_embeds(batch)
    with torch.no_grad():
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, guidance_scale=5.0,
                    output_type="latent", generator=torch.Generator().manual_seed(seed), **kw).images


def cfg_loop(unet, scheduler, steps, cond, uncond, x, guidance=3.0):
    """A plain DDIM-style CFG loop calling ``unet(x, t, encoder_hidden_states=...)`` with a 0-d t, one batched call
    per step (as the pipelines and the DeepCache package's helper expect)."""
    scheduler.set_timesteps(steps)
    ctx = torch.cat([cond, uncond])
    with torch.no_grad():
        for t in scheduler.timesteps:
            xin = scheduler.scale_model_input(x, t)
            e = unet(torch.cat([xin, xin]), t, encoder_hidden_states=ctx).sample
            ec, eu = e.chunk(2)
            x = scheduler.step(eu + guidance * (ec - eu), t, x).prev_sample
    return x


def zoo_unet_inputs(n: int = 4, seed: int = 0):
    m = zoo.load("digits-unet").model
    lab = torch.arange(n) % 10
    with torch.no_grad():
        cond, uncond = m.condition(lab), m.condition(torch.full_like(lab, 10))
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    return m, cond, uncond, x


def deepcache_package(unet, scheduler, interval, branch):
    """The DeepCache package's helper on a bare UNet (shortcut_kernels.models.deepcache.package_helper)."""
    return package_helper(unet, scheduler, interval, branch)


def light_and_reference_grads(model_fn, scheduler, x_T, guidance, chain_schedule, seed: int = 3):
    """d(x0 . w)/dx_T of the per-sample shortcut with its chain through ``chain_schedule``, by
    the memory-light path and by the reference autograd chain (SDO tests of model wrappers)."""
    from shortcut_kernels import sdo

    w = torch.randn(x_T.shape, dtype=x_T.dtype, generator=torch.Generator().manual_seed(seed))
    grads = []
    for light in (True, False):
        x = x_T.clone().requires_grad_(True)
        config = sdo.ChainConfig(policy="per-sample", guidance=guidance, memory_light=light,
                                 chain_schedule=chain_schedule)
        x0 = sdo.shortcut_sample(model_fn, scheduler, x, config, generator=torch.Generator().manual_seed(seed))
        (x0 * w).sum().backward()
        grads.append(x.grad)
    return grads


def call_kwargs(model, seed: int, batch: int = 2) -> dict:
    """Fresh inputs of one denoiser call of a tiny UNet (text-conditioned) or DiT (class labels),
    the timestep falling with ``seed`` as in a sampler's run."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    if type(model).__name__.startswith("UNet"):
        return dict(sample=x, timestep=torch.tensor(500 - seed),
                    encoder_hidden_states=torch.randn(batch, 3, c.cross_attention_dim, generator=g))
    return dict(hidden_states=x, timestep=torch.tensor([500 - seed] * batch),
                class_labels=torch.tensor([seed % 10] * batch))


def tiny_dit_pipeline():
    """A DiTPipeline around :func:`tiny_dit` with a one-level VAE and DDIM, progress bar off."""
    vae = diffusers.AutoencoderKL(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"],
                                  up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=8,
                                  sample_size=8).eval()
    pipe = diffusers.DiTPipeline(transformer=tiny_dit(), vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
