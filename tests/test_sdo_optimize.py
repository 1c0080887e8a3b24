"""Rewards and optimize_latents: the digits reward, the optimisation loop, early stop, bad rewards."""
from __future__ import annotations

import math

import pytest
import torch

from shortcut_kernels import sdo, zoo
from shortcut_kernels.sdo.optimize import clip_per_sample_, gaussian_prior, gaussian_shell
from shortcut_kernels.sdo.rewards import RewardError, check_reward
from shortcut_kernels.zoo.rewards import digits_reward


def normalized(lr):
    """NormalizedAscent at ``lr`` and the default momentum."""
    return lambda params: sdo.NormalizedAscent(params, lr=lr, momentum=0.5)


@pytest.fixture(scope="module")
def unet():
    model, cfg = zoo.load("digits-unet")
    sched = zoo.make_scheduler(cfg)
    sched.set_timesteps(4)
    return model, sched


def test_digits_reward_is_classifier_log_prob():
    clf = zoo.metrics.classifier()
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    r = digits_reward(3)(x)
    assert r.shape == (5,)
    torch.testing.assert_close(r, torch.log_softmax(clf(x), -1)[:, 3])
    per = digits_reward([0, 1, 2, 3, 4])(x)
    torch.testing.assert_close(per, torch.log_softmax(clf(x), -1)[torch.arange(5), torch.arange(5)])
    xg = x.clone().requires_grad_()
    digits_reward(3)(xg).sum().backward()
    assert xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="target"):
        digits_reward(10)


def test_shift_averaged_reward_is_the_mean_over_shifted_views():
    weight = torch.randn(1, 13, 11)  # a reward that depends on where the pixels are

    def base(x):
        return (x * weight).flatten(1).sum(1) + x.flatten(1).pow(2).mean(1)

    x = torch.rand(4, 1, 13, 11) * 2 - 1  # odd, non-square
    torch.testing.assert_close(sdo.ShiftAveraged(base, 0)(x), base(x))
    # reference: each shifted view built by rolling a padded copy, for a constant fill and the edge
    for fill in (-1.0, None):
        padded = (torch.nn.functional.pad(x, (2, 2, 2, 2), value=fill) if fill is not None
                  else torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate"))
        offsets = (-2, -1, 0, 1, 2)
        views = [padded[..., 2 + dy:2 + dy + 13, 2 + dx:2 + dx + 11] for dy in offsets for dx in offsets]
        want = torch.stack([base(v) for v in views]).mean(0)
        torch.testing.assert_close(sdo.ShiftAveraged(base, 2, fill=fill)(x), want)
    assert not torch.allclose(sdo.ShiftAveraged(base, 1)(x), base(x))
    xg = (torch.rand(4, 1, 16, 16) * 2 - 1).requires_grad_()
    sdo.ShiftAveraged(digits_reward(3), 1, fill=-1.0)(xg).sum().backward()
    assert xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shift"):
        sdo.ShiftAveraged(base, -1)
    with pytest.raises(ValueError, match="shift"):
        sdo.ShiftAveraged(base, 1.5)
    with pytest.raises(TypeError, match="reward"):
        sdo.ShiftAveraged(None)
    with pytest.raises(ValueError, match="x0"):
        sdo.ShiftAveraged(base, 1)(torch.zeros(4, 11))


def test_check_reward():
    assert check_reward(torch.zeros(3), 3).shape == (3,)
    with pytest.raises(RewardError, match="shape"):
        check_reward(torch.zeros(3, 1), 3)
    with pytest.raises(RewardError, match="non-finite"):
        check_reward(torch.tensor([0.0, float("nan"), 1.0]), 3)
    with pytest.raises(RewardError, match="tensor"):
        check_reward([0.0, 1.0], 2)


def test_shell_and_clip():
    x = torch.randn(4, 1, 16, 16)
    r = gaussian_shell(x)
    torch.testing.assert_close(r, (x.flatten(1).norm(dim=1) - 16.0) ** 2)
    g = torch.randn(4, 3, 5) * torch.tensor([0.1, 1, 10, 100]).view(4, 1, 1)
    before = g.clone()
    clip_per_sample_(g, 1.0)
    norms = g.flatten(1).norm(dim=1)
    assert (norms <= 1.0 + 1e-6).all()
    torch.testing.assert_close(g[0], before[0])  # under the limit: untouched


def test_gaussian_prior_is_quiet_on_noise_and_penalises_structure():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(400, 1, 16, 16, generator=g)
    quiet = gaussian_prior(noise, generator=g)
    assert quiet.shape == (400,) and (quiet == 0).float().mean() > 0.8 and quiet.mean() < 0.1

    def on_shell(x):
        return x / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * 16.0

    # the same norm, with structure no Gaussian draw has: smooth patches, an offset
    smooth = on_shell(torch.nn.functional.avg_pool2d(noise[:50], 3, 1, padding=1, count_include_pad=False))
    offset = on_shell(noise[:50] + 0.8)
    assert (gaussian_prior(smooth, generator=g) > 1.0).all()
    assert (gaussian_prior(offset, generator=g) > 1.0).all()
    # its gradient leads back towards typical noise
    x = smooth.clone().requires_grad_(True)
    before = gaussian_prior(x, shuffles=0).sum()
    before.backward()
    with torch.no_grad():
        after = gaussian_prior(x - 0.01 * x.grad, shuffles=0).sum()
    assert after < before
    with pytest.raises(ValueError, match="block"):
        gaussian_prior(noise[:2], block=200)


def test_optimize_latents_raises_reward(unet):
    model, sched = unet
    fn = sdo.ClassConditional(model, [10])
    x_T = zoo.initial_noise(4, seed=3)
    keep = x_T.clone()
    reward = digits_reward(int(torch.randint(0, 10, ())))
    res = sdo.optimize_latents(fn, sched, reward, x_T, sdo.OptimizeConfig(iters=6), optimizer=normalized(0.1),
                               progress=False)
    assert torch.equal(x_T, keep)  # never modified in place
    assert len(res.history) == 6 and not res.stopped_early
    assert not torch.equal(res.latents, x_T)
    # project=True: each latent keeps its starting norm (stays on the Gaussian shell)
    torch.testing.assert_close(res.latents.flatten(1).norm(dim=1), x_T.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    with torch.no_grad():
        final = reward(sdo.shortcut_sample(fn, sched, res.latents, "first")).mean().item()
    assert final > res.history[0]["reward_mean"] + 0.1


def test_optimize_latents_early_stop_and_baselines(unet):
    model, sched = unet
    fn = sdo.ClassConditional(model, [10])
    x_T = zoo.initial_noise(2, seed=4)
    res = sdo.optimize_latents(fn, sched, digits_reward(1), x_T, sdo.OptimizeConfig(iters=5),
                               stop=sdo.RewardTarget(-1e9), progress=False)
    assert res.stopped_early and len(res.history) == 1 and torch.equal(res.latents, x_T)

    def shell_and_prior(x, generator):
        return 0.01 * gaussian_shell(x) + 1.0 * gaussian_prior(x, generator=generator)

    res = sdo.optimize_latents(fn, sched, digits_reward(1), x_T, sdo.OptimizeConfig(iters=2),
                               regularizer=shell_and_prior, progress=False)
    assert len(res.history) == 2 and not torch.equal(res.latents, x_T)
    for policy in ["full", "draft:2", "alignprop", "per-sample", "random"]:
        config = sdo.OptimizeConfig(iters=2, chain=sdo.ChainConfig(policy=policy))
        res = sdo.optimize_latents(fn, sched, digits_reward(1), x_T, config, progress=False)
        assert len(res.history) == 2 and not torch.equal(res.latents, x_T)


def test_reached_samples_keep_their_latent(unet):
    """With stop_at, a sample whose reward reaches it is frozen: its latent is the one that
    reached it, while the others keep moving (and without freeze_reached all move)."""
    model, sched = unet
    fn = sdo.ClassConditional(model, [10])
    x_T = zoo.initial_noise(4, seed=6)
    base = digits_reward(int(torch.randint(0, 10, ())))

    def reward(x0):  # sample 1 counts as reached from the start, the others never
        r = base(x0)
        return torch.where(torch.arange(4) == 1, r.detach() * 0 + 1.0, r.clamp_max(0.5))

    # keep_best off: a sample whose reward fell would report its starting latent, not where it moved
    config = sdo.OptimizeConfig(iters=3, keep_best=False)
    res = sdo.optimize_latents(fn, sched, reward, x_T, config, optimizer=normalized(0.1),
                               stop=sdo.RewardTarget(1.0, freeze=True), progress=False)
    assert len(res.history) == 3 and not res.stopped_early
    assert torch.equal(res.latents[1], x_T[1])
    assert all(not torch.equal(res.latents[i], x_T[i]) for i in (0, 2, 3))
    free = sdo.optimize_latents(fn, sched, reward, x_T, config, optimizer=normalized(0.1),
                                stop=sdo.RewardTarget(1.0), progress=False)
    torch.testing.assert_close(free.latents[[0, 2, 3]], res.latents[[0, 2, 3]])


def test_optimize_latents_bad_reward_changes_nothing(unet):
    model, sched = unet
    fn = sdo.ClassConditional(model, [10])
    x_T = zoo.initial_noise(2, seed=5)
    keep = x_T.clone()
    calls = []

    def flaky(x0):
        calls.append(1)
        r = digits_reward(2)(x0)
        return r if len(calls) < 2 else r * float("nan")

    with pytest.raises(RewardError, match="non-finite") as info:
        sdo.optimize_latents(fn, sched, flaky, x_T, sdo.OptimizeConfig(iters=3), progress=False)
    partial = info.value.result
    assert len(partial.history) == 1 and torch.equal(x_T, keep)
    with pytest.raises(RewardError, match="shape"):
        sdo.optimize_latents(fn, sched, lambda x0: x0.mean(), x_T, sdo.OptimizeConfig(iters=1), progress=False)
    with pytest.raises(TypeError, match="reward"):
        sdo.optimize_latents(fn, sched, 3, x_T, sdo.OptimizeConfig(iters=1), progress=False)


def test_autocast_bf16_gradient_close_to_fp32(unet):
    model, sched = unet
    fn = sdo.ClassConditional(model, [10])
    reward = digits_reward(5)

    def grad(autocast):
        x = zoo.initial_noise(2, seed=6).requires_grad_()
        reward(sdo.shortcut_sample(fn, sched, x, sdo.ChainConfig(autocast=autocast))).sum().backward()
        return x.grad

    g32, g16 = grad(None), grad(torch.bfloat16)
    cos = torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0).item()
    assert cos > 0.95
    # fp16 with the dynamic loss scale runs and moves the latent
    config = sdo.OptimizeConfig(iters=2, grad_clip=1.0, chain=sdo.ChainConfig(autocast=torch.float16))
    res = sdo.optimize_latents(fn, sched, reward, zoo.initial_noise(2, seed=6), config, progress=False)
    assert all(math.isfinite(h["reward_mean"]) for h in res.history)
    assert not torch.equal(res.latents, zoo.initial_noise(2, seed=6))


def test_warmup_calls(unet):
    model, _ = unet
    _, cfg = zoo.load("digits-unet")
    sched = zoo.make_scheduler(cfg)
    sched.set_timesteps(6)
    fn = sdo.ClassConditional(model, [10])
    x_T = zoo.initial_noise(2, seed=7)
    res = sdo.optimize_latents(fn, sched, digits_reward(4), x_T, sdo.OptimizeConfig(iters=2, warmup_calls=4),
                               progress=False)
    assert res.warm_start is not None and res.warm_start.index == 4
    assert res.latents.shape == x_T.shape and not torch.equal(res.latents, res.warm_start.x)


def test_normalized_ascent_steps_every_sample_by_the_same_length():
    """Each sample's step is lr * sqrt(d) along its own gradient, whatever the gradient's scale;
    momentum adds the previous normalised direction."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    p = x.clone().requires_grad_(True)
    opt = sdo.NormalizedAscent([p], lr=0.3, momentum=0.5)
    g1 = torch.randn(3, 2, 5, dtype=torch.float64) * torch.tensor([1e-6, 1.0, 1e4], dtype=torch.float64).view(3, 1, 1)
    p.grad = g1.clone()
    opt.step()
    unit1 = g1.flatten(1) / g1.flatten(1).norm(dim=1, keepdim=True)
    step1 = (p.detach() - x).flatten(1)
    torch.testing.assert_close(step1, -0.3 * math.sqrt(10) * unit1)
    g2 = torch.randn(3, 2, 5, dtype=torch.float64)
    p.grad = g2.clone()
    before = p.detach().clone()
    opt.step()
    unit2 = g2.flatten(1) / g2.flatten(1).norm(dim=1, keepdim=True)
    torch.testing.assert_close((p.detach() - before).flatten(1), -0.3 * math.sqrt(10) * (0.5 * unit1 + unit2))
    with pytest.raises(ValueError, match="momentum"):
        sdo.NormalizedAscent([p], lr=0.1, momentum=1.0)


def test_each_sample_keeps_its_best_latent(unet):
    """keep_best: every sample ends at the latent with its highest (exact) reward over the run,
    and result.x0 is that latent's sample; keep_best=False ends at the last step."""
    model, sched = unet
    fn = sdo.ClassConditional(model, [10])
    x_T = zoo.initial_noise(4, seed=8)
    reward = digits_reward(int(torch.randint(0, 10, ())))
    res = sdo.optimize_latents(fn, sched, reward, x_T, sdo.OptimizeConfig(iters=5, decay_to=1.0),
                               optimizer=normalized(0.3), progress=False)
    per_iter = torch.tensor([h["reward"] for h in res.history])
    with torch.no_grad():
        x0 = sdo.shortcut_sample(fn, sched, res.latents, "first")
    torch.testing.assert_close(res.x0, x0)
    torch.testing.assert_close(res.reward, reward(x0), atol=1e-5, rtol=0)
    # the best of the evaluated latents: each iteration's and the one after the last step
    assert bool((res.reward >= per_iter.max(0).values - 1e-5).all())
    last = sdo.optimize_latents(fn, sched, reward, x_T, sdo.OptimizeConfig(iters=5, decay_to=1.0, keep_best=False),
                                optimizer=normalized(0.3), progress=False)
    # without it: the latent after the last step (not the last evaluated one), x0 its own sample
    # and reward its reward; the same run's best is at least as good
    assert not torch.allclose(last.reward, torch.tensor(last.history[-1]["reward"]))
    assert bool((res.reward >= last.reward - 1e-5).all())
    with torch.no_grad():
        x0_last = sdo.shortcut_sample(fn, sched, last.latents, "first")
    torch.testing.assert_close(last.x0, x0_last, rtol=0, atol=1e-6)
    torch.testing.assert_close(last.reward, reward(x0_last), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="not callable"):  # the optimiser is a factory, not a name
        sdo.optimize_latents(fn, sched, reward, x_T, sdo.OptimizeConfig(iters=1), optimizer="sgd", progress=False)
    with pytest.raises(ValueError, match="decay_to"):
        sdo.optimize_latents(fn, sched, reward, x_T, sdo.OptimizeConfig(iters=1, decay_to=0.0), progress=False)
    adam = sdo.optimize_latents(fn, sched, reward, x_T, sdo.OptimizeConfig(iters=2, keep_best=False),
                                optimizer=lambda p: torch.optim.Adam(p, lr=0.25, betas=(0.9, 0.9)), progress=False)
    assert not torch.equal(adam.latents, x_T)


@pytest.mark.parametrize("keep_best", [True, False])
@pytest.mark.parametrize("sampler", ["ddim-eta", "ddpm"])
def test_noisy_samplers_results_are_reproducible(unet, sampler, keep_best):
    """With a sampler that draws noise, every iteration draws the same noise (a latent's reward is
    a function of the latent): sampling the returned latent again with the returned noise gives
    the returned x0 and reward, and keep_best's reward is the best of the history."""
    model, _ = unet
    _, cfg = zoo.load("digits-unet")
    sched = zoo.make_scheduler(cfg, "DDPMScheduler" if sampler == "ddpm" else "DDIMScheduler")
    sched.set_timesteps(4)
    eta = 1.0 if sampler == "ddim-eta" else 0.0
    fn = sdo.ClassConditional(model, [10])
    reward = digits_reward(int(torch.randint(0, 10, ())))
    x_T = zoo.initial_noise(4, seed=9)
    for policy in ["first", "random"]:
        config = sdo.OptimizeConfig(iters=4, keep_best=keep_best, seed=int(torch.randint(0, 2**31, ())),
                                    chain=sdo.ChainConfig(policy=policy, eta=eta))
        res = sdo.optimize_latents(fn, sched, reward, x_T, config, optimizer=normalized(0.3), progress=False)
        assert res.noise_seed is not None
        with torch.no_grad():
            x0 = sdo.shortcut_sample(fn, sched, res.latents, sdo.ChainConfig(eta=eta),
                                     generator=res.noise_generator())
        torch.testing.assert_close(x0, res.x0, rtol=0, atol=1e-6)
        torch.testing.assert_close(reward(x0), res.reward, rtol=0, atol=1e-5)
        if keep_best:  # the best of the evaluated latents (the final one included)
            per_iter = torch.tensor([h["reward"] for h in res.history])
            assert bool((res.reward >= per_iter.max(0).values - 1e-6).all())
    # the same latent, the same noise: the reward of the first iteration is the start's
    with torch.no_grad():
        x0 = sdo.shortcut_sample(fn, sched, x_T, sdo.ChainConfig(eta=eta), generator=res.noise_generator())
    torch.testing.assert_close(reward(x0), torch.tensor(res.history[0]["reward"]), rtol=0, atol=1e-5)
    clean = sdo.optimize_latents(fn, sched, reward, x_T, sdo.OptimizeConfig(iters=1, chain=sdo.ChainConfig()),
                                 progress=False) if sampler == "ddim-eta" else None
    assert clean is None or clean.noise_seed is None and clean.noise_generator() is None


def test_warm_started_latent_gets_a_shell_at_its_own_scale(unet):
    """Euler's latent after warm-up has norm ~ sigma*sqrt(d): the shell regulariser judges it in
    units of its starting scale, so its gradient at the start is ~0, the reward's gradient
    steers the step (without projection the latent keeps its scale instead of being pulled to
    the unit-noise shell) and the optimisation raises the reward."""
    model, _ = unet
    _, cfg = zoo.load("digits-unet")
    sched = zoo.make_scheduler(cfg, "EulerDiscreteScheduler")
    sched.set_timesteps(6)
    fn = sdo.ClassConditional(model, [10])
    x_T = zoo.initial_noise(4, seed=11)
    reward = digits_reward(torch.randint(0, 10, (4,)).tolist())
    shell = sdo.latent_regularizer()
    seen = []

    def recording(x, generator):
        penalty = shell(x, generator)
        (grad,) = torch.autograd.grad(penalty.sum(), x, retain_graph=True)
        seen.append((x.detach().flatten(1).norm(dim=1), grad.flatten(1).norm(dim=1)))
        return penalty

    config = sdo.OptimizeConfig(iters=6, warmup_calls=1, keep_best=False, project=False)
    res = sdo.optimize_latents(fn, sched, reward, x_T, config, regularizer=recording, progress=False)
    warm_norm = res.warm_start.x.flatten(1).norm(dim=1)
    assert bool((warm_norm > 1.5 * 16).all())  # off the unit-noise shell sqrt(256) = 16
    norm0, grad0 = seen[0]
    torch.testing.assert_close(norm0, torch.full_like(norm0, 16.0), rtol=1e-6, atol=0)
    assert bool((grad0 < 1e-6).all())
    assert bool((res.latents.flatten(1).norm(dim=1) > 0.85 * warm_norm).all())
    assert res.reward.mean() > res.history[0]["reward_mean"] + 0.1
