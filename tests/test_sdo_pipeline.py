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
        ours = sdo.shortcut_sample(fn, pipe.scheduler, x_T, "first", guidance=GUIDANCE)
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
    res = sdo.optimize_latents(fn, pipe.scheduler, reward, x_T, iters=4, guidance=GUIDANCE, progress=False)
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
    res = sdo.finetune(pipe.unet, pipe.scheduler, reward, model_fn=fn, guidance=GUIDANCE, lora=2, iters=3,
                       batch_size=2, lr=3e-2, sample_shape=(4, 8, 8), seed=0, progress=False)
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
