"""Schedules through img2img, inpainting, ControlNet and LoRA (peft) pipelines built from configs."""
import diffusers
import pytest
import torch

from shortcut_kernels.dipgo import accelerate, deepcache, full

from _dipgo_models import deepcache_package, prompt_embeds, tiny_sd_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)


def _image(seed=3):
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _call(pipe, steps=10, **kw):
    pe, ne = prompt_embeds(1)
    with torch.no_grad():
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, guidance_scale=5.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check(pipe, calls, **kw):
    """full() is bit-identical; deepcache() equals the DeepCache package through the same pipeline."""
    ref = _call(pipe, **kw)
    with accelerate(pipe, full(pipe, calls)):
        assert torch.equal(_call(pipe, **kw), ref)
    undo = deepcache_package(pipe.unet, pipe.scheduler, 3, 1)
    try:
        pkg = _call(pipe, **kw)
    finally:
        undo()
    with accelerate(pipe, deepcache(pipe, calls, 3, 1)):
        ours = _call(pipe, **kw)
    assert rel(ours, pkg) <= 1e-6 and rel(ours, ref) > 1e-5


def test_img2img_counts_the_calls_strength_leaves():
    base = tiny_sd_pipeline()
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    # strength 0.6 of 10 steps: the loop makes 6 calls (DDIM has no begin_index: found from the first timestep)
    _check(pipe, 6, image=_image(), strength=0.6)
    with accelerate(pipe, deepcache(pipe, 10, 3, 0)):
        with pytest.raises(ValueError, match="schedule has 10 denoiser calls but this run makes 6"):
            _call(pipe, image=_image(), strength=0.6)
    with accelerate(pipe, deepcache(pipe, 10, 3, 0), auto_resize=True):
        assert torch.isfinite(_call(pipe, image=_image(), strength=0.6)).all()


def test_inpainting():
    base = tiny_sd_pipeline()
    pipe = diffusers.StableDiffusionInpaintPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    _check(pipe, 10, image=_image(), mask_image=mask, strength=1.0)


def test_controlnet():
    base = tiny_sd_pipeline()
    torch.manual_seed(0)
    cn = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8,)).eval()
    for p in cn.parameters():  # from_unet zero-initialises the residual convs: make them matter
        p.data.normal_(0, 0.05) if p.ndim > 1 and p.abs().sum() == 0 else None
    pipe = diffusers.StableDiffusionControlNetPipeline(**base.components, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    _check(pipe, 10, image=_image())


def test_lora_adapter_added_before_or_after_accelerate():
    from peft import LoraConfig

    pipe = tiny_sd_pipeline()
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    s = deepcache(pipe, 10, 3, 2)
    with accelerate(pipe, s):
        pipe.unet.add_adapter(cfg, adapter_name="style")  # module paths are unchanged under accelerate
        ours_after = _call(pipe)
    undo = deepcache_package(pipe.unet, pipe.scheduler, 3, 2)
    try:
        pkg = _call(pipe)
    finally:
        undo()
    assert rel(ours_after, pkg) <= 1e-6
    pipe.unet.disable_adapters()
    no_lora = _call(pipe)
    pipe.unet.enable_adapters()
    with accelerate(pipe, s):
        ours_before = _call(pipe)
    assert torch.equal(ours_before, ours_after) and rel(ours_before, no_lora) > 1e-4


def test_dit_pipeline():
    from shortcut_kernels.dipgo import fora

    from _dipgo_models import tiny_dit_pipeline

    pipe = tiny_dit_pipeline()

    def run():
        with torch.no_grad():
            return pipe(class_labels=[1, 2], num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                        output_type="np").images

    ref = run()
    with accelerate(pipe, full(pipe, 6)):
        assert (run() == ref).all()
    with accelerate(pipe, fora(pipe, 6, 3)) as h:
        a, b = run(), run()
        assert h.runs_started == 2 and (a == b).all() and not (a == ref).all()
