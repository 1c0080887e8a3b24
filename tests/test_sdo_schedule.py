"""shortcut_sample(ChainConfig(chain_schedule=...)): the no-grad chain through a DiP-GO schedule; the kept
call runs the full model; the gradient paths agree; mismatched schedules are refused."""
from __future__ import annotations

import pytest
import torch

from shortcut_kernels import dipgo, sdo, zoo
from shortcut_kernels.samplers import linear_steps
from shortcut_kernels.zoo.rewards import digits_reward

CALLS = 5


@pytest.fixture(scope="module")
def unet64():
    model, cfg = zoo.load("digits-unet", dtype=torch.float64)
    sched = zoo.make_scheduler(cfg)
    sched.set_timesteps(CALLS)
    return model, sched


def manual_chain(model, sched, x_T, computed):
    """Whole-call reuse by hand: calls in ``computed`` run the model, the others reuse the last
    computed output (what a skip_steps schedule does to a UNet)."""
    steps = linear_steps(sched)
    x = x_T * sched.init_noise_sigma
    lab = torch.full((x.shape[0],), zoo.NULL_LABEL)
    out = None
    with torch.no_grad():
        for st in steps:
            if st.index in computed:
                out = model(st.input_scale * x, sched.timesteps[st.index], lab)
            x = st.a * x + st.b * out
    return x


def test_kept_call_runs_full_model_and_gradients_agree(unet64):
    model, sched = unet64
    schedule = dipgo.skip_steps(model, CALLS, compute=[0])
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    x_T = zoo.initial_noise(2, seed=1).double()
    x0 = sdo.shortcut_sample(fn, sched, x_T, sdo.ChainConfig(policy="fixed:2", chain_schedule=schedule))
    torch.testing.assert_close(x0, manual_chain(model, sched, x_T, {0, 2}), rtol=1e-10, atol=1e-10)
    # without the schedule the chain differs: the schedule did skip calls
    plain = sdo.shortcut_sample(fn, sched, x_T, "fixed:2")
    assert (plain - x0).abs().max() > 1e-3
    grads = {}
    for light in (True, False):
        x = x_T.clone().requires_grad_()
        config = sdo.ChainConfig(policy="fixed:2", chain_schedule=schedule, memory_light=light)
        out = sdo.shortcut_sample(fn, sched, x, config)
        digits_reward(4, zoo.load("digits-classifier", dtype=torch.float64).model)(out).sum().backward()
        grads[light] = x.grad
    assert ((grads[True] - grads[False]).norm() / grads[False].norm()).item() <= 1e-5
    # the model is left as it was: the schedule was removed after the chain
    torch.testing.assert_close(sdo.shortcut_sample(fn, sched, x_T, "fixed:2"), plain, rtol=0, atol=0)


def test_chain_schedule_bad_inputs(unet64):
    model, sched = unet64
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    x_T = zoo.initial_noise(2, seed=1).double()
    with pytest.raises(ValueError, match="denoiser calls"):
        config = sdo.ChainConfig(chain_schedule=dipgo.skip_steps(model, CALLS + 2, compute=[0]))
        sdo.shortcut_sample(fn, sched, x_T, config)
    dit, _ = zoo.load("digits-dit")
    with pytest.raises(ValueError, match="built for"):
        sdo.shortcut_sample(fn, sched, x_T, sdo.ChainConfig(chain_schedule=dipgo.full(dit, CALLS)))
    with pytest.raises(ValueError, match="one-call"):
        sdo.shortcut_sample(fn, sched, x_T, sdo.ChainConfig(policy="full", chain_schedule=dipgo.full(model, CALLS)))
    with pytest.raises(TypeError, match="Schedule"):
        sdo.shortcut_sample(fn, sched, x_T, sdo.ChainConfig(chain_schedule="deepcache"))
