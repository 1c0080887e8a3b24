"""samplers.linear_steps against the schedulers' own step(), and zoo.sample through guided_step."""
from __future__ import annotations

import pytest
import torch

import diffusers
from shortcut_kernels import samplers
from shortcut_kernels.samplers import linear_steps, step_coefficients

BASE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": False}

# (class, config overrides, prediction types)
CASES = [
    ("DDIMScheduler", {}, ("epsilon", "v_prediction", "sample")),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": False}, ("epsilon",)),
    ("DDPMScheduler", {}, ("epsilon", "v_prediction", "sample")),
    ("DDPMScheduler", {"variance_type": "fixed_large", "timestep_spacing": "leading"}, ("epsilon",)),
    ("EulerDiscreteScheduler", {}, ("epsilon", "v_prediction")),
    ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "use_karras_sigmas": True}, ("epsilon",)),
    ("DPMSolverMultistepScheduler", {"solver_order": 2}, ("epsilon", "v_prediction", "sample")),
    ("DPMSolverMultistepScheduler", {"solver_order": 2, "solver_type": "heun", "timestep_spacing": "leading",
                                     "lower_order_final": False, "final_sigmas_type": "sigma_min"}, ("epsilon",)),
    ("DPMSolverMultistepScheduler", {"solver_order": 1}, ("epsilon", "v_prediction")),
    ("PNDMScheduler", {"skip_prk_steps": True}, ("epsilon", "v_prediction")),
    ("PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "leading", "steps_offset": 1}, ("epsilon",)),
    ("FlowMatchEulerDiscreteScheduler", {}, ("flow",)),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, ("flow",)),
]
PARAMS = [(cls, over, pred) for cls, over, preds in CASES for pred in preds]


def make(cls: str, overrides: dict, prediction: str, steps: int):
    if cls == "FlowMatchEulerDiscreteScheduler":
        s = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **overrides)
    else:
        cfg = dict(BASE, prediction_type=prediction, **overrides)
        if cls == "PNDMScheduler":
            cfg.pop("clip_sample")
        s = getattr(diffusers, cls).from_config(cfg)
    s.set_timesteps(steps)
    return s


def linear_chain(steps, x0, outputs, noises, states=None):
    """Apply the linear forms: returns the samples x_0..x_N (after ``states``, if given)."""
    xs = list(states) if states is not None else [x0]
    for st in steps:
        nxt = sum(c * xs[j] for j, c in st.x.items()) + sum(c * outputs[j] for j, c in st.out.items())
        if st.noise:
            nxt = nxt + st.noise * noises[st.index]
        xs.append(nxt)
    return xs


@pytest.mark.parametrize("cls,overrides,prediction", PARAMS,
                         ids=[f"{c}-{p}-{i}" for i, (c, _, p) in enumerate(PARAMS)])
@pytest.mark.parametrize("num_steps", [7, 20])
def test_linear_steps_match_scheduler_step(cls, overrides, prediction, num_steps):
    sched = make(cls, overrides, prediction, num_steps)
    steps = linear_steps(sched)
    n = len(sched.timesteps)
    assert len(steps) == n and [st.index for st in steps] == list(range(n))
    x = torch.randn(3, 2, 4, 4) * samplers.initial_scale(sched)
    outputs = [torch.randn(3, 2, 4, 4) for _ in range(n)]
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator().manual_seed(seed)
    # the noise DDPM's step() draws from the same generator, one draw per call with t > 0
    ref_gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn(3, 2, 4, 4, generator=ref_gen) if st.noise else None for st in steps]
    ref_states = [x]  # the scheduler's own samples; each call's form is checked on them
    for i, t in enumerate(sched.timesteps):
        ref = ref_states[-1]
        # flow matching has no scale_model_input: the model sees the sample itself
        xin = sched.scale_model_input(ref, t) if hasattr(sched, "scale_model_input") else ref
        torch.testing.assert_close(xin, steps[i].input_scale * ref, rtol=1e-5, atol=1e-6)
        kwargs = {"generator": gen} if cls == "DDPMScheduler" else {}
        ref_states.append(sched.step(outputs[i], t, ref, **kwargs).prev_sample)
        ours = linear_chain([steps[i]], None, outputs, noises, states=ref_states[:-1])[-1]
        # step() rounds to fp32 inside; at sigma ~ 2e4 (cosine schedule, linspace) its update
        # cancels x ~ 2e4 down to ~1, so its error scales with the input's size too
        tol = 3e-5 * (ref_states[-1].abs().max().item() + 1.0) + 1e-6 * ref.abs().max().item()
        torch.testing.assert_close(ours, ref_states[-1], rtol=0, atol=tol, msg=f"call {i}")
    # and the whole chain run on its own agrees
    chain = linear_chain(steps, x, outputs, noises)
    torch.testing.assert_close(chain[-1], ref_states[-1], rtol=0,
                               atol=1e-4 * (1 + ref_states[-1].abs().max().item()) + 1e-6 * x.abs().max().item())
    assert (steps[-1].timestep == sched.timesteps[-1].item())


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_noise_coefficient(eta):
    sched = make("DDIMScheduler", {}, "epsilon", 10)
    steps = linear_steps(sched, eta=eta)
    x = torch.randn(2, 1, 4, 4)
    outputs = [torch.randn_like(x) for _ in steps]
    noises = [torch.randn_like(x) for _ in steps]
    ours = linear_chain(steps, x, outputs, noises)
    ref = x
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(outputs[i], t, ref, eta=eta, variance_noise=noises[i]).prev_sample
    torch.testing.assert_close(ours[-1], ref, rtol=1e-5, atol=1e-5)
    assert all(st.noise > 0 for st in steps[:-1])


def test_one_step_and_multistep_forms():
    ddim = make("DDIMScheduler", {}, "epsilon", 10)
    a, b = step_coefficients(ddim, 3)
    st = linear_steps(ddim)[3]
    assert (a, b) == (st.a, st.b) and st.one_step
    dpm = make("DPMSolverMultistepScheduler", {"solver_order": 2}, "epsilon", 10)
    steps = linear_steps(dpm)
    assert steps[0].one_step and not steps[1].one_step
    assert set(steps[4].x) == {3, 4} and set(steps[4].out) == {3, 4}
    with pytest.raises(ValueError, match="earlier calls"):
        step_coefficients(dpm, 4)
    plms = make("PNDMScheduler", {"skip_prk_steps": True}, "epsilon", 10)
    steps = linear_steps(plms)
    assert len(steps) == 11
    # the second call restarts from the first call's sample; the fifth uses four outputs
    assert set(steps[1].x) == {0, 1} and steps[1].x[1] == 0.0
    assert len(steps[5].out) == 4


def test_errors():
    s = diffusers.DDIMScheduler.from_config(BASE)
    with pytest.raises(ValueError, match="set_timesteps"):
        linear_steps(s)
    clip = diffusers.DDIMScheduler.from_config(dict(BASE, clip_sample=True))
    clip.set_timesteps(5)
    with pytest.raises(samplers.UnsupportedScheduler, match="clip_sample"):
        linear_steps(clip)
    lms = diffusers.LMSDiscreteScheduler.from_config(BASE)
    lms.set_timesteps(5)
    with pytest.raises(samplers.UnsupportedScheduler, match="LMSDiscreteScheduler"):
        linear_steps(lms)
    assert not samplers.is_supported(lms) and not samplers.is_supported(clip)
    sde = diffusers.DPMSolverMultistepScheduler.from_config(dict(BASE, algorithm_type="sde-dpmsolver++"))
    sde.set_timesteps(5)
    with pytest.raises(samplers.UnsupportedScheduler, match="algorithm_type"):
        linear_steps(sde)
    ddpm = make("DDPMScheduler", {}, "epsilon", 5)
    with pytest.raises(ValueError, match="eta"):
        linear_steps(ddpm, eta=0.5)
    ddim = make("DDIMScheduler", {}, "epsilon", 5)
    with pytest.raises(IndexError):
        step_coefficients(ddim, 5)


# ---------------------------------------------------------------- zoo.sample through guided_step

def _sample_with_step(model, sched, labels, steps, guidance, seed):
    """zoo.sample as it was before guided_step: the scheduler's own step() on the CFG eps."""
    from shortcut_kernels.zoo import NULL_LABEL, initial_noise

    gen = torch.Generator().manual_seed(seed)
    lb = torch.as_tensor(labels)
    x = initial_noise(len(lb), generator=gen)
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma
    kwargs = {"generator": gen} if "generator" in __import__("inspect").signature(sched.step).parameters else {}
    with torch.no_grad():
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            ec, eu = model(torch.cat([xin, xin]), t, torch.cat([lb, torch.full_like(lb, NULL_LABEL)])).chunk(2)
            x = sched.step(eu + guidance * (ec - eu), t, x, **kwargs).prev_sample
    return x


@pytest.fixture(scope="module")
def unet():
    from shortcut_kernels import zoo

    return zoo.load("digits-unet")


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                 "DPMSolverMultistepScheduler", "PNDMScheduler", "EulerAncestralDiscreteScheduler"])
def test_zoo_sample_same_images_as_scheduler_step(cls, unet):
    from shortcut_kernels import zoo

    model, cfg = unet
    labels = [0, 3, 7, 10]
    ours = zoo.sample(model, zoo.make_scheduler(cfg, cls), labels, steps=6, guidance=3.0, seed=11,
                      progress=False, clamp=False)
    ref = _sample_with_step(model, zoo.make_scheduler(cfg, cls), labels, 6, 3.0, 11)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4 * (1 + ref.abs().max().item()))


def test_guided_step_loop_compiles_once():
    """50 DDIM calls with (a, b, w) as 0-d tensors that change every call: one dynamo frame."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from shortcut_kernels import guided_step

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def update(x, eu, ec, a, b, w):
        return guided_step(x, eu, ec, a, b, w)

    sched = make("DDIMScheduler", {}, "epsilon", 50)
    steps = linear_steps(sched)
    x = torch.randn(2, 1, 8, 8)
    eu, ec = torch.randn_like(x), torch.randn_like(x)
    ref = x
    for i, st in enumerate(steps):
        w = 3.0 - 0.02 * i  # a guidance schedule: w changes too
        x = update(x, eu, ec, torch.tensor(st.a), torch.tensor(st.b), torch.tensor(w))
        ref = st.a * ref + st.b * (eu + w * (ec - eu))
    assert counter.frame_count == 1
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)
