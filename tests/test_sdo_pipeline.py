"""SDO against a diffusers pipeline: the chain of ``shortcut_sample`` is the pipeline's own
sampling loop, so a latent optimised by ``optimize_latents`` gives the same image through
``pipe(latents=...)`` (a StableDiffusionPipeline built from configs, random weights)."""
from __future__ import annotations

import diffusers
import pytest
import torch

from shortcut_kernels import sdo

from _dipgo_models import prompt_embeds, tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

GUIDANCE = 5.0
STEPS = 6
SCHEDULERS = [diffusers.DDIMScheduler, diffusers.EulerDiscreteScheduler, diffusers.DPMSolverMultistepScheduler,
              diffusers.PNDMScheduler]


def pipe_latents(pipe, latents, pe, ne):
    with torch.no_grad():
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=latents, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, output_type="latent").images


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS, ids=lambda c: c.__name__)
def test_shortcut_sample_is_the_pipeline_loop(scheduler_cls):
    pipe = tiny_sd_pipeline(scheduler_cls=scheduler_cls)
    pe, ne = prompt_embeds(2)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe_latents(pipe, x_T, pe, ne)
    pipe.scheduler.set_timesteps(STEPS)
    fn = sdo.TextConditional(pipe.unet, pe, ne)
    with torch.no_grad():
        ours = sdo.shortcut_sample(fn, pipe.scheduler, x_T, sdo.ChainConfig(guidance=GUIDANCE))
    assert rel(ours, ref) <= 1e-5


def test_optimised_latents_give_the_same_image_through_the_pipeline():
    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)
    pe, ne = prompt_embeds(1)
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    reward = lambda x0: -((x0 - target) ** 2).flatten(1).mean(1)  # noqa: E731
    pipe.scheduler.set_timesteps(STEPS)
    fn = sdo.TextConditional(pipe.unet, pe, ne)
    config = sdo.OptimizeConfig(iters=4, chain=sdo.ChainConfig(guidance=GUIDANCE))
    res = sdo.optimize_latents(fn, pipe.scheduler, reward, x_T, config, progress=False)
    assert not torch.equal(res.latents, x_T)
    assert res.history[-1]["reward_mean"] > res.history[0]["reward_mean"]
    image = pipe_latents(pipe, res.latents, pe.expand(3, -1, -1), ne.expand(3, -1, -1))
    assert rel(image, res.x0) <= 1e-5
    assert rel(pipe_latents(pipe, x_T, pe.expand(3, -1, -1), ne.expand(3, -1, -1)), res.x0) > 1e-2


def test_lora_finetuned_on_the_unet_loads_into_the_pipeline(tmp_path):
    """finetune(pipe.unet, model_fn=TextConditional(...)) then save_lora: a fresh pipeline's
    load_lora_weights(dir) samples what the fine-tuned UNet samples."""
    pipe = tiny_sd_pipeline()
    pe, ne = prompt_embeds(1)
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    reward = lambda x0: -((x0 - target) ** 2).flatten(1).mean(1)  # noqa: E731
    pipe.scheduler.set_timesteps(STEPS)
    fn = sdo.TextConditional(pipe.unet, pe, ne)
    config = sdo.FinetuneConfig(lora=2, iters=3, batch_size=2, seed=0,
                                chain=sdo.ChainConfig(policy="per-sample:importance", guidance=GUIDANCE))
    res = sdo.finetune(pipe.unet, pipe.scheduler, reward, config, model_fn=fn,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2, weight_decay=0.0), sample_shape=(4, 8, 8),
                       progress=False)
    assert res.iterations == 3
    path = sdo.save_lora(pipe.unet, tmp_path / "lora")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    tuned = pipe_latents(pipe, x_T, pe.expand(2, -1, -1), ne.expand(2, -1, -1))
    fresh = tiny_sd_pipeline()  # the same random base weights (seeded), no adapter
    base = pipe_latents(fresh, x_T, pe.expand(2, -1, -1), ne.expand(2, -1, -1))
    fresh.load_lora_weights(str(path.parent))
    loaded = pipe_latents(fresh, x_T, pe.expand(2, -1, -1), ne.expand(2, -1, -1))
    assert rel(loaded, tuned) <= 1e-5
    assert rel(base, tuned) > 1e-3  # the adapter changed the samples


# ---- rewards for latent text-to-image models: CLIP through the VAE decoder -----------------

def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=100,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=32,
                  patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()


IDS = torch.tensor([[0, 5, 17, 2], [0, 9, 2, 2]])


def test_clip_reward_is_clips_own_similarity():
    """The reward is CLIP's image-text cosine as its own forward computes it (logits / scale),
    per sample with one prompt each, and differentiable in the image."""
    clip = tiny_clip()
    reward = sdo.ClipReward(clip, IDS)
    x0 = (torch.rand(2, 3, 20, 20) * 2 - 1).requires_grad_(True)
    r = reward(x0)
    assert r.shape == (2,)
    with torch.no_grad():
        out = clip(input_ids=IDS, pixel_values=reward.pixel_values(x0))
    torch.testing.assert_close(r.detach(), out.logits_per_image.diagonal() / clip.logit_scale.exp(),
                               rtol=1e-5, atol=1e-6)
    r.sum().backward()
    assert x0.grad is not None and bool(torch.isfinite(x0.grad).all()) and x0.grad.abs().sum() > 0
    one = sdo.ClipReward(clip, IDS[:1])(x0.detach())  # one prompt for the batch
    torch.testing.assert_close(one[0], r[0].detach(), rtol=1e-5, atol=1e-6)
    embeds = sdo.ClipReward(clip, reward.text * 3.0)(x0.detach())  # precomputed embeddings, any scale
    torch.testing.assert_close(embeds, r.detach(), rtol=1e-5, atol=1e-6)


def test_clip_reward_bad_inputs():
    clip = tiny_clip()
    with pytest.raises(ValueError, match="x0 must be RGB images"):
        sdo.ClipReward(clip, IDS[:1])(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="2 prompts for a batch of 3"):
        sdo.ClipReward(clip, IDS)(torch.zeros(3, 3, 16, 16))
    with pytest.raises(ValueError, match="text must be"):
        sdo.ClipReward(clip, IDS[0])
    with pytest.raises(TypeError, match="CLIPModel"):
        sdo.ClipReward(torch.nn.Linear(2, 2), IDS)


def test_decoded_clip_reward_drives_latent_optimisation_through_a_pipeline():
    """optimize_latents with CLIP on the VAE's decoded image: Decoded equals decoding by hand,
    the reward rises, and the pipeline given the optimised latents decodes the same image."""
    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)
    clip = tiny_clip()
    reward = sdo.Decoded(pipe.vae, sdo.ClipReward(clip, IDS[:1]))
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        by_hand = sdo.ClipReward(clip, IDS[:1])(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample)
        torch.testing.assert_close(reward(z), by_hand)
    pe, ne = prompt_embeds(1)
    pipe.scheduler.set_timesteps(STEPS)
    fn = sdo.TextConditional(pipe.unet, pe, ne)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    config = sdo.OptimizeConfig(iters=5, chain=sdo.ChainConfig(guidance=GUIDANCE))
    res = sdo.optimize_latents(fn, pipe.scheduler, reward, x_T, config, progress=False)
    first = torch.tensor(res.history[0]["reward"])
    with torch.no_grad():
        best = reward(res.x0)
    assert bool((best >= first - 1e-6).all()) and float(best.mean()) > float(first.mean())
    with torch.no_grad():
        image = pipe(prompt_embeds=pe.expand(2, -1, -1), negative_prompt_embeds=ne.expand(2, -1, -1),
                     latents=res.latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt").images
        decoded = pipe.vae.decode(res.x0 / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(image, (decoded / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-5)


def test_finetune_given_the_pipeline_names_its_denoiser():
    """A pipeline is not the model to fine-tune: the error says to pass ``pipe.unet`` (it used to
    ask for ``sample_shape``), and the pipeline is left as it was."""
    pipe = tiny_sd_pipeline()
    pipe.scheduler.set_timesteps(STEPS)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(TypeError, match=r"pipe\.unet"):
        sdo.finetune(pipe, pipe.scheduler, lambda x0: x0.flatten(1).mean(1), sdo.FinetuneConfig(iters=1),
                     progress=False)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
