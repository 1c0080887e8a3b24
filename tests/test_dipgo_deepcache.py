"""deepcache(N, b) against the DeepCache package (DeepCacheSDHelper) on the same UNet, noise and scheduler.

The package works with diffusers 0.42.1 through a small shim (see _dipgo_models.deepcache_package): it only needs
``pipe.unet``/``pipe.scheduler`` and a positional 0-d timestep, and leaves instance ``forward`` attributes behind.
"""
import diffusers
import pytest
import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo import accelerate, deepcache

from _dipgo_models import cfg_loop, deepcache_package, run_pipe, tiny_sd15_unet, tiny_sd_pipeline, zoo_unet_inputs

CALLS = 10
GRID = [(n, b) for n in (2, 3, 5) for b in (0, 1, 2, 5)]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def zoo_setup():
    return zoo_unet_inputs(n=3)


@pytest.mark.parametrize("interval,branch", GRID)
def test_zoo_unet_matches_package(zoo_setup, interval, branch, one_thread):
    m, cond, uncond, x = zoo_setup
    sched = diffusers.DDIMScheduler.from_config(zoo.info("digits-unet")["scheduler_config"])
    undo = deepcache_package(m.unet, sched, interval, branch)
    try:
        ref = cfg_loop(m.unet, sched, CALLS, cond, uncond, x)
    finally:
        undo()
    with accelerate(m.unet, deepcache(m.unet, CALLS, interval, branch), scheduler=sched):
        ours = cfg_loop(m.unet, sched, CALLS, cond, uncond, x)
    full = cfg_loop(m.unet, sched, CALLS, cond, uncond, x)
    assert rel(ours, ref) <= 1e-6
    assert rel(full, ref) > 1e-4  # the schedule did reuse something


@pytest.fixture(scope="module")
def sd_unet():
    return tiny_sd15_unet()


@pytest.mark.parametrize("interval,branch", GRID)
def test_sd15_class_unet_matches_package(sd_unet, interval, branch, fresh_seed, one_thread):
    g = torch.Generator().manual_seed(fresh_seed)
    cond, uncond = torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    x = torch.randn(2, 4, 16, 16, generator=g)
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    undo = deepcache_package(sd_unet, sched, interval, branch)
    try:
        ref = cfg_loop(sd_unet, sched, CALLS, cond, uncond, x, guidance=7.5)
    finally:
        undo()
    s = deepcache(sd_unet, CALLS, interval, branch)
    with accelerate(sd_unet, s, scheduler=sched):
        ours = cfg_loop(sd_unet, sched, CALLS, cond, uncond, x, guidance=7.5)
    assert rel(ours, ref) <= 1e-6
    assert s.macs_kept < 1


@pytest.mark.parametrize("interval,branch", [(2, 0), (3, 1), (5, 2), (3, 5)])
def test_stable_diffusion_pipeline_matches_package(interval, branch, one_thread):
    pipe = tiny_sd_pipeline()
    undo = deepcache_package(pipe.unet, pipe.scheduler, interval, branch)
    try:
        ref = run_pipe(pipe, CALLS)
    finally:
        undo()
    with accelerate(pipe, deepcache(pipe, CALLS, interval, branch)):
        ours = run_pipe(pipe, CALLS)
    assert rel(ours, ref) <= 1e-6
    full = run_pipe(pipe, CALLS)
    assert rel(full, ref) > 1e-5


def test_skip_index_numbering_equals_package_branch_on_sd_layout(sd_unet):
    """With 3 layers per down block, package branch k is skip index k."""
    for k in range(12):
        assert torch.equal(deepcache(sd_unet, 6, 3, k).keep, deepcache(sd_unet, 6, 3, skip=k).keep)
