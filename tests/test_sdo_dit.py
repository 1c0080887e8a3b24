"""sdo.DiTConditional: a class-conditional diffusers transformer (DiT-XL/2's layout at toy width)
as an SDO model_fn: the batched CFG pair equals two plain calls, the chain is DiTPipeline's own
loop, and the shortcut gradient through a DiP-GO chain schedule equals the autograd chain."""
from __future__ import annotations

import diffusers
import pytest
import torch

from shortcut_kernels import sdo
from shortcut_kernels.dipgo import fora

from _dipgo_models import light_and_reference_grads, tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def ddim():
    return diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)


def test_pair_is_eps_of_two_plain_calls():
    dit = tiny_dit()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor(420)
    with torch.no_grad():
        eu, ec = sdo.DiTConditional(dit, [7, 1, 3], guidance=True)(x, t)
        plain = sdo.DiTConditional(dit, [7, 1, 3])(x, t)
        ref_c = dit(x, timestep=t.expand(3), class_labels=torch.tensor([7, 1, 3])).sample[:, :4]
        ref_u = dit(x, timestep=t.expand(3), class_labels=torch.full((3,), 1000)).sample[:, :4]
    assert eu.shape == (3, 4, 8, 8)
    assert rel(ec, ref_c) <= 1e-5 and rel(eu, ref_u) <= 1e-5 and rel(plain, ref_c) <= 1e-6


def test_chain_is_the_dit_pipeline_loop():
    dit = tiny_dit()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"],
                                  up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=8).eval()
    pipe = diffusers.DiTPipeline(transformer=dit, vae=vae, scheduler=ddim())
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 8]
    with torch.no_grad():
        images = pipe(labels, guidance_scale=4.0, num_inference_steps=6, output_type="pt",
                      generator=torch.Generator().manual_seed(5)).images
        x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # the pipeline's draw
        sched = ddim()
        sched.set_timesteps(6)
        fn = sdo.DiTConditional(dit, labels, guidance=True)
        x0 = sdo.shortcut_sample(fn, sched, x_T, sdo.ChainConfig(guidance=4.0))
        ours = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert rel(ours, images) <= 1e-5


def test_shortcut_gradient_through_a_fora_chain_schedule():
    dit = tiny_dit().double().requires_grad_(False)
    fn = sdo.DiTConditional(dit, [4], guidance=True)
    sched = ddim()
    sched.set_timesteps(8)
    chain = fora(dit, 8, 3)
    x_T = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    grads = light_and_reference_grads(fn, sched, x_T, 3.0, chain)
    assert rel(grads[0], grads[1]) <= 1e-6 and grads[0].norm() > 0


def test_bad_inputs_name_the_argument():
    dit = tiny_dit()
    with pytest.raises(ValueError, match="2 class labels for a batch of 3"):
        sdo.DiTConditional(dit, [1, 2])(torch.randn(3, 4, 8, 8), torch.tensor(10))
    with pytest.raises(TypeError, match="diffusers model with a config"):
        sdo.DiTConditional(torch.nn.Linear(2, 2), [1])
