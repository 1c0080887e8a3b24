"""shortcut_sample: the memory-light gradient equals the reference autograd chain (fp64), the
reference equals autograd through the schedulers' own step(), and bad inputs raise."""
from __future__ import annotations

import math

import pytest
import torch

import diffusers
from shortcut_kernels import sdo
from shortcut_kernels.samplers import Plan

BASE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": False}
STEPS = 6


class Tiny(torch.nn.Module):
    """A small deterministic denoiser, fp64: conv -> (+ time embedding) -> tanh -> conv. With
    ``pair`` it returns (uncond, cond) outputs from two heads (classifier-free guidance)."""

    def __init__(self, pair: bool = False):
        super().__init__()
        self.pair = pair
        self.inp = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.time = torch.nn.Linear(2, 6)
        self.out = torch.nn.Conv2d(6, 2 if pair else 1, 3, padding=1)
        self.double()

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1) / 1000.0
        emb = self.time(torch.stack([torch.sin(3 * t), torch.cos(5 * t)], -1))
        h = torch.tanh(self.inp(x) + emb[:, :, None, None])
        y = self.out(h)
        return tuple(y.split(1, dim=1)) if self.pair else y


SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, 0.0),
    "ddim-eta": ("DDIMScheduler", {}, 0.6),
    "ddim-v": ("DDIMScheduler", {"prediction_type": "v_prediction"}, 0.0),
    "ddim-sample": ("DDIMScheduler", {"prediction_type": "sample"}, 0.0),
    "ddpm": ("DDPMScheduler", {}, 0.0),
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}, 0.0),
    "euler-v": ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "prediction_type": "v_prediction"}, 0.0),
    "dpm2m": ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading"}, 0.0),
    "dpm2m-v": ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading", "prediction_type": "v_prediction"},
                0.0),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}, 0.0),
    "flow": ("FlowMatchEulerDiscreteScheduler", {}, 0.0),
}


def scheduler(name: str, steps: int = STEPS):
    cls, over, eta = SCHEDULERS[name]
    if cls == "FlowMatchEulerDiscreteScheduler":
        s = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    else:
        cfg = dict(BASE, **over)
        if cls == "PNDMScheduler":
            cfg.pop("clip_sample")
        s = getattr(diffusers, cls).from_config(cfg)
    s.set_timesteps(steps)
    return s, eta


def grads(model, sched, x_T, policy, guidance, eta, memory_light, seed, warm=None):
    x = x_T.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    config = sdo.ChainConfig(policy=policy, guidance=guidance, eta=eta, memory_light=memory_light)
    out, kept = sdo.shortcut_sample(model, sched, x, config, generator=gen, warm_start=warm, return_kept=True)
    grads.kept = kept
    target = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    loss = ((out - target) ** 2 * torch.arange(1, out.shape[0] + 1, dtype=out.dtype).view(-1, 1, 1, 1)).sum()
    loss.backward()
    return out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def params_rel_err(grads_a, params):
    """Relative error of all weight gradients taken as one vector. Against diffusers' step(),
    whose coefficients are fp32, a per-tensor bound fails by chance: one tensor's gradient can
    nearly cancel (a bias, say), and the fp32 rounding of the whole chain then dominates it."""
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])
    return rel_err(flat(grads_a), flat([p.grad for p in params]))


POLICIES = ["first", "fixed:2", "fixed:-1", "random", "per-sample", "random:importance", "per-sample:importance"]


@pytest.mark.parametrize("guidance", [None, 2.5])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_memory_light_equals_autograd_chain(name, policy, guidance):
    sched, eta = scheduler(name)
    model = Tiny(pair=guidance is not None)
    x_T = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    seed = int(torch.randint(0, 2**31, ()))
    plan = Plan(sched, eta)
    if name == "plms" and policy == "fixed:-1":
        # PLMS's last call (t=0, alpha_prev = alpha_0) has a zero coefficient: keeping it by name
        # would give an exactly zero weight gradient, so it is refused
        for light in (False, True):
            with pytest.raises(ValueError, match="keep another call"):
                grads(model, sched, x_T, policy, guidance, eta, light, seed)
        return
    out_a, gx_a, gp_a = grads(model, sched, x_T, policy, guidance, eta, False, seed)
    out_b, gx_b, gp_b = grads(model, sched, x_T, policy, guidance, eta, True, seed)
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-10)
    assert gx_a.abs().sum() > 0
    assert rel_err(gx_b, gx_a) <= 1e-5
    # a random draw may still land on PLMS's last call: no weight gradient
    dead = all(plan.output_sensitivity(k, 0) == 0 for k in grads.kept.tolist())
    for pb, pa in zip(gp_b, gp_a):
        assert (pa.abs().sum() == 0) if dead else (pa.abs().sum() > 0)
        assert rel_err(pb, pa) <= 1e-5


@pytest.mark.parametrize("name", ["ddim", "dpm2m", "plms"])
def test_warm_start_equals_autograd_chain(name):
    sched, eta = scheduler(name, 8)
    model = Tiny()
    x_T = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    warm = sdo.warmup(model, sched, x_T, calls=3)
    assert warm.index == 3 and (warm.xs or warm.outs or name == "ddim")
    for policy in ["first", "fixed:5", "per-sample"]:
        seed = int(torch.randint(0, 2**31, ()))
        _, gx_a, gp_a = grads(model, sched, warm.x, policy, None, eta, False, seed, warm)
        _, gx_b, gp_b = grads(model, sched, warm.x, policy, None, eta, True, seed, warm)
        assert rel_err(gx_b, gx_a) <= 1e-5
        assert all(rel_err(b, a) <= 1e-5 for a, b in zip(gp_a, gp_b))
    # the warm-started chain continues the same run
    full = sdo.shortcut_sample(model, sched, x_T, "first")
    cont = sdo.shortcut_sample(model, sched, warm.x, "first", warm_start=warm)
    torch.testing.assert_close(cont, full, rtol=1e-12, atol=1e-12)


def _step_kwargs(sched, gen):
    return {"generator": gen} if isinstance(sched, diffusers.DDPMScheduler) else {}


def _eps_held(sched, out, y, t):
    """A call's output with its noise prediction eps held constant (``y = a*x0 + s*eps``): the
    output still depends on ``y`` through the parametrisation."""
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return out.detach()
    ab = float(sched.alphas_cumprod[int(t)])
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    if kind == "v_prediction":  # eps = s*y + a*v
        return ((s * y + a * out).detach() - s * y) / a
    assert kind == "sample"  # eps = (y - a*x0) / s
    return (y - s * ((y - a * out) / s).detach()) / a


@pytest.mark.parametrize("name", ["ddim", "ddim-v", "ddim-sample", "plms", "ddpm"])
def test_reference_equals_autograd_through_scheduler_step(name):
    """(a) is the autograd chain through diffusers' own step(), the kept call's output live and
    the others' eps held (schedulers whose step() keeps fp64)."""
    sched, _ = scheduler(name)
    model = Tiny()
    x_T = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    for k in [0, 3]:
        seed = int(torch.randint(0, 2**31, ()))
        _, gx, gp = grads(model, sched, x_T, f"fixed:{k}", None, 0.0, False, seed)
        x = x_T.detach().clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        sched.set_timesteps(STEPS)
        gen = torch.Generator().manual_seed(seed)
        y = x * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            out = model(sched.scale_model_input(y, t), t)
            y = sched.step(out if i == k else _eps_held(sched, out, y, t), t, y, **_step_kwargs(sched, gen)).prev_sample
        target = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        ((y - target) ** 2 * torch.arange(1, 3, dtype=y.dtype).view(-1, 1, 1, 1)).sum().backward()
        # step() computes its coefficients in fp32 (alphas_cumprod is fp32); ours in fp64
        assert rel_err(gx, x.grad) <= 1e-6
        assert params_rel_err(gp, model.parameters()) <= 1e-6


@pytest.mark.parametrize("name", ["ddim", "dpm2m", "euler"])
def test_full_equals_plain_autograd(name):
    """The ``full`` baseline (every call kept, checkpointed) is the exact gradient; for
    schedulers whose step() rounds to fp32 the plain chain runs in fp32."""
    sched, _ = scheduler(name)
    dtype = torch.float64 if name == "ddim" else torch.float32
    model = Tiny().to(dtype)
    x_T = torch.randn(2, 1, 5, 5, dtype=dtype)
    _, gx, gp = grads(model, sched, x_T, "full", None, 0.0, None, 0)
    x = x_T.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    sched.set_timesteps(STEPS)
    y = x * sched.init_noise_sigma
    for t in sched.timesteps:
        y = sched.step(model(sched.scale_model_input(y, t), t), t, y).prev_sample
    target = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    ((y - target) ** 2 * torch.arange(1, 3, dtype=y.dtype).view(-1, 1, 1, 1)).sum().backward()
    tol = 1e-6 if dtype == torch.float64 else 1e-4  # step()'s coefficients are fp32
    assert rel_err(gx, x.grad) <= tol
    assert params_rel_err(gp, model.parameters()) <= tol


def test_baselines_keep_their_calls():
    sched, _ = scheduler("ddim")
    model = Tiny()
    x_T = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    _, kept = sdo.shortcut_sample(model, sched, x_T.requires_grad_(), "draft:2", return_kept=True)
    assert kept.tolist() == [STEPS - 2, STEPS - 1]
    _, kept = sdo.shortcut_sample(model, sched, x_T, "alignprop", return_kept=True,
                                  generator=torch.Generator().manual_seed(1))
    assert kept.max().item() == STEPS - 1 and 1 <= kept.numel() <= STEPS
    calls.clear()
    sdo.shortcut_sample(model, sched, x_T, sdo.ChainConfig(policy="fixed:1", memory_light=False))
    assert calls == [i == 1 for i in range(STEPS)]  # exactly one call builds a graph


def test_memory_light_stores_one_latent():
    """The memory-light forward keeps no graph: only the kept input is saved."""
    sched, _ = scheduler("ddim", 10)
    model = Tiny()
    x_T = torch.randn(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    out = sdo.shortcut_sample(model, sched, x_T, "fixed:4")
    assert type(out.grad_fn).__name__ == "_ShortcutBackward"
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == x_T.shape


def test_explicit_kept_calls_equal_fixed():
    sched, _ = scheduler("dpm2m")
    model = Tiny()
    x_T = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    _, gx_fixed, _ = grads(model, sched, x_T, "fixed:3", None, 0.0, True, 0)
    _, gx_list, _ = grads(model, sched, x_T, [3, 3], None, 0.0, True, 0)
    torch.testing.assert_close(gx_list, gx_fixed, rtol=0, atol=0)
    _, gx_mixed, _ = grads(model, sched, x_T, torch.tensor([3, 1]), None, 0.0, True, 0)
    _, gx_ref, _ = grads(model, sched, x_T, torch.tensor([3, 1]), None, 0.0, False, 0)
    assert rel_err(gx_mixed, gx_ref) <= 1e-5


@pytest.mark.parametrize("name", ["ddim", "dpm2m", "flow"])
def test_importance_draws_average_to_the_uniform_gradient(name):
    """The importance policies draw call k with p_k proportional to |dx_0/d out_k| and weigh its
    gradient by 1/(n p_k): over the draw, exactly the uniform policies' expected gradient."""
    sched, eta = scheduler(name, 5)
    model = Tiny()
    x_T = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    plan = Plan(sched, eta)
    probs = plan.importance(0)
    sens = torch.tensor([abs(plan.output_sensitivity(k, 0)) for k in range(plan.n)], dtype=torch.float64)
    torch.testing.assert_close(probs, sens / sens.sum(), rtol=1e-12, atol=0)
    flat = lambda gp: torch.cat([g.flatten() for g in gp])
    uniform_x, uniform_p, weighted_x, weighted_p = 0, 0, 0, 0
    for k in range(plan.n):
        _, gx, gp = grads(model, sched, x_T, f"fixed:{k}", None, eta, True, 0)
        uniform_x, uniform_p = uniform_x + gx / plan.n, uniform_p + flat(gp) / plan.n
        kept = torch.tensor([k, k])
        c = sdo.parse_policy("random:importance").grad_weights(kept, 0, probs)
        _, gx, gp = grads(model, sched, x_T, sdo.Policy.given(kept, c), None, eta, True, 0)
        weighted_x, weighted_p = weighted_x + probs[k] * gx, weighted_p + probs[k] * flat(gp)
    assert uniform_p.abs().sum() > 0 and uniform_x.abs().sum() > 0
    assert rel_err(weighted_p, uniform_p) <= 1e-10
    # the latent's gradient: the chain's own linear path (unweighted, probabilities sum to 1)
    # plus the kept call's reweighted part: the same expectation again
    assert rel_err(weighted_x, uniform_x) <= 1e-10


def test_importance_policies_draw_by_the_plan():
    sched, _ = scheduler("ddim", 8)
    plan = Plan(sched)
    probs = plan.importance(0)
    gen = torch.Generator().manual_seed(0)
    batch = sdo.parse_policy("random:importance")
    runs = torch.stack([batch.kept_calls(0, plan.n, 4, gen, probs) for _ in range(3000)])
    assert bool((runs == runs[:, :1]).all())  # one call for the whole batch
    freq = torch.bincount(runs[:, 0], minlength=plan.n).double() / runs.shape[0]
    assert (freq - probs).abs().max() < 0.03
    per_sample = sdo.parse_policy("per-sample:importance")
    ks = per_sample.kept_calls(0, plan.n, 3000, gen, probs)
    assert (torch.bincount(ks, minlength=plan.n).double() / 3000 - probs).abs().max() < 0.03
    assert str(batch) == "random:importance" and str(per_sample) == "per-sample:importance"
    # a warm start's chain draws only from the calls it runs
    assert bool((plan.importance(3)[:3] == 0).all()) and math.isclose(plan.importance(3).sum().item(), 1.0)
    # PLMS's last call does not reach x_0: never drawn
    plms = Plan(scheduler("plms", 6)[0])
    assert plms.importance(0)[-1].item() == 0.0


def test_importance_policy_bad_inputs():
    with pytest.raises(ValueError, match="importance"):
        sdo.parse_policy("random:uniform")
    with pytest.raises(ValueError, match="takes no argument"):
        sdo.parse_policy("first:importance")
    with pytest.raises(ValueError, match="Plan.importance"):
        sdo.parse_policy("per-sample:importance").kept_calls(0, 5, 2, None)
    with pytest.raises(ValueError, match="finite"):
        sdo.Policy("explicit", calls=(1, 2), weights=(1.0, float("nan")))
    sched, _ = scheduler("ddim")
    with pytest.raises(ValueError, match="gradient weights"):
        sdo.shortcut_sample(Tiny(), sched, torch.randn(2, 1, 5, 5, dtype=torch.float64),
                            sdo.Policy("explicit", calls=(1, 2), weights=(1.0,)))


def test_per_sample_keeps_different_calls():
    sched, _ = scheduler("ddim", 20)
    model = Tiny()
    x_T = torch.randn(8, 1, 5, 5, dtype=torch.float64)
    _, kept = sdo.shortcut_sample(model, sched, x_T, "per-sample", return_kept=True,
                                  generator=torch.Generator().manual_seed(0))
    assert kept.shape == (8,) and len(set(kept.tolist())) > 1


def test_plan_product_of_coefficients_for_ddim():
    """One-step samplers: dx_0/dx_k is the product of the later calls' a."""
    sched, _ = scheduler("ddim", 10)
    plan = Plan(sched)
    p = plan.chain_sensitivity(0)
    for k in range(10):
        assert math.isclose(p[k], math.prod(st.a for st in plan.steps[k:]), rel_tol=1e-12)
        assert math.isclose(plan.output_sensitivity(k, 0), plan.steps[k].b * p[k + 1], rel_tol=1e-12)


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs():
    sched, _ = scheduler("ddim")
    model = Tiny()
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(ValueError, match="out of range"):
        sdo.shortcut_sample(model, sched, x, f"fixed:{STEPS}")
    with pytest.raises(ValueError, match="out of range"):
        sdo.shortcut_sample(model, sched, x, f"fixed:-{STEPS + 1}")
    with pytest.raises(ValueError, match="unknown policy"):
        sdo.shortcut_sample(model, sched, x, "last")
    with pytest.raises(ValueError, match="draft"):
        sdo.shortcut_sample(model, sched, x, f"draft:{STEPS + 1}")
    unset = diffusers.DDIMScheduler.from_config(BASE)
    with pytest.raises(ValueError, match="set_timesteps"):
        sdo.shortcut_sample(model, unset, x, "first")
    with pytest.raises(TypeError, match="guidance"):
        sdo.shortcut_sample(model, sched, x, sdo.ChainConfig(guidance=3.0))
    with pytest.raises(TypeError, match="guidance"):
        sdo.shortcut_sample(Tiny(pair=True), sched, x, "first")
    with pytest.raises(ValueError, match="memory_light"):
        sdo.shortcut_sample(model, sched, x, sdo.ChainConfig(policy="full", memory_light=True))
    with pytest.raises(TypeError, match="x_T"):
        sdo.shortcut_sample(model, sched, x.detach().numpy(), "first")
    with pytest.raises(ValueError, match="calls"):
        sdo.warmup(model, sched, x, calls=STEPS)
    with pytest.raises(ValueError, match="out of range"):
        sdo.shortcut_sample(model, sched, x, sdo.ChainConfig(policy=[0, STEPS]))
    with pytest.raises(ValueError, match="batch"):
        sdo.shortcut_sample(model, sched, x, sdo.ChainConfig(policy=[0, 1, 2]))
    assert torch.equal(x.detach(), before) and x.grad is None
