"""The DiP-GO learner (shortcut_kernels.dipgo.learn): the forward-difference estimate is exact
for the linearised loss and its flipped outputs are the flipped schedule's; the learner keeps
the budget, never ends below its start on the bank, and runs on bare diffusers models."""
import diffusers
import pytest
import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo import accelerate, skip_steps
from shortcut_kernels.dipgo.learn import (LEAD_SHARES, start_options, Bank, LabelConditioned, _guided, bank_loss, estimate, learn, make_bank,
                                          order_moves, units_of)
from shortcut_kernels.dipgo.losses import consistency_loss
from shortcut_kernels.runtime.schedule import Schedule, graph_of
from shortcut_kernels.dipgo.search import branch_patterns
from shortcut_kernels.dipgo.supernet import SuperNet
from shortcut_kernels.dipgo.train import _Chain
from shortcut_kernels.zoo import models
from shortcut_kernels.zoo.sampling import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_unet(dtype=torch.float64):
    info = zoo.info("digits-unet")
    cfg = dict(info["model_config"], block_out_channels=[8, 16, 16], cross_attention_dim=16, attention_head_dim=4)
    torch.manual_seed(0)
    return models.build(info["kind"], cfg).to(dtype).eval().requires_grad_(False)


def _tiny_dit(dtype=torch.float64):
    info = zoo.info("digits-dit")
    cfg = dict(info["model_config"], num_layers=3, num_attention_heads=2, attention_head_dim=8)
    torch.manual_seed(0)
    return models.build(info["kind"], cfg).to(dtype).eval().requires_grad_(False)


def _scheduler(calls, name="digits-unet", cls=None):
    s = make_scheduler(zoo.info(name)["scheduler_config"], cls)
    s.set_timesteps(calls)
    return s


def _bank(model, scheduler, n=3):
    """A bank whose targets are off the full samples, so the loss has a real gradient."""
    bank = make_bank(model, scheduler, n, guidance=3.0, seed=int(torch.randint(1 << 30, ())))
    return Bank(bank.noise, bank.labels, bank.targets + 0.05 * torch.randn_like(bank.targets))


def _inputs(chain, bank, schedule):
    """The sample entering every call of a run of ``schedule`` and the final sample."""
    xs = {}
    x0 = chain.run(bank.noise, bank.labels, schedule.keep.to(bank.noise.dtype),
                   on_call=lambda i, x, c: xs.__setitem__(i, x), skip_reused=False)
    return xs, x0


def _held_input_outputs(chain, bank, schedule, xs):
    """Brute force: every call of ``schedule`` recomputed on the held inputs ``xs``, its caches
    passed from call 0 on: each call's guided output."""
    caches, outs = None, {}
    for s in range(chain.n):
        eu, ec, caches = chain.call(chain.steps[s].input_scale * xs[s], chain.timesteps[s], bank.labels,
                                    schedule.keep[s].to(bank.noise.dtype), caches)
        outs[s] = _guided(chain, eu, ec)
    return outs


def _runtime_held_input_outputs(chain, bank, schedule, xs):
    """The same through the runtime (``accelerate``, forecast reuse as the schedule says), every
    call on the held inputs ``xs``: an independent reference for the SuperNet's forecasts."""
    from shortcut_kernels.models.conditioning import guidance_batch

    model, outs = chain.net.model, {}
    with accelerate(model, schedule, scheduler=chain.chain.scheduler) as handle, handle.run():
        for s in range(chain.n):
            x_in = chain.steps[s].input_scale * xs[s]
            t = chain.timesteps[s].expand(x_in.shape[0])
            eu, ec = model(*guidance_batch(x_in, t, bank.labels, chain.null)).chunk(2)
            outs[s] = _guided(chain, eu, ec)
    return outs


def _replay(chain, bank, outs):
    """The final sample of the chain whose calls return ``outs`` (model-free)."""
    return chain.chain.run(chain.chain.first_latent(bank.noise), lambda i, x, t: (outs[i], outs[i]))


def _flipped(schedule, u):
    keep, forecast = schedule.keep.clone(), schedule.forecast.clone()
    keep[u.call] = torch.tensor(u.row)
    if schedule.forecast_blocks is not None:  # the flipped call's reused blocks take their block's order
        forecast[u.call] = torch.tensor(schedule.forecast_blocks, dtype=forecast.dtype)
    return Schedule(keep, schedule.graph, forecast=forecast)


@pytest.mark.parametrize("build,order", [(_tiny_unet, 1), (_tiny_unet, 2), (_tiny_dit, 1), (_tiny_dit, 2)])
def test_estimate_with_forecast_is_exact_for_the_linearised_loss(build, order):
    """With forecast reuse: the SuperNet run is the runtime's (final sample), and each unit's
    estimate is <dL/dx0, x0' - x0> for x0' the replay of the runtime's outputs of the flipped
    schedule on the held inputs; a flip reaches the reused calls after the next whole calls,
    whose extrapolations read it (fp64)."""
    model = build()
    sched = _scheduler(9)
    start = skip_steps(model, 9, compute=[0, 2, 3, 5, 6], granularity="fine").with_forecast(order)
    net = SuperNet(model, graph=start.graph)
    chain = _Chain(net, sched, 3.0, model.null_label)
    bank = _bank(model, sched)
    est = estimate(chain, bank, start)
    xs = {}
    x0 = chain.run_schedule(bank.noise, bank.labels, start, on_call=lambda i, x, h: xs.__setitem__(i, x))
    torch.testing.assert_close(x0, chain._run_skipping(bank.noise, bank.labels, start, None))
    torch.testing.assert_close(_replay(chain, bank, _runtime_held_input_outputs(chain, bank, start, xs)), x0)
    assert est.loss == pytest.approx(float(consistency_loss(x0, bank.targets, "mse").mean()), rel=1e-9)
    x0 = x0.requires_grad_()
    g, = torch.autograd.grad(consistency_loss(x0, bank.targets, "mse").mean(), x0)
    # dropping call 2: calls 3 and 5 compute everything, the reused calls 4, 7 and 8 extrapolate
    # from histories that lacked it (order 2 reads three computed calls back)
    drop_2 = next(j for j, u in enumerate(est.units) if u.call == 2 and not any(u.row))
    for j in [drop_2] + torch.randperm(len(est.units))[:3].tolist():
        u = est.units[j]
        flipped = _flipped(start, u)
        x_lin = _replay(chain, bank, _runtime_held_input_outputs(chain, bank, flipped, xs))
        reference = float((g * (x_lin - x0.detach())).sum())
        assert abs(reference) > 0
        torch.testing.assert_close(est.predicted[j].item(), reference, rtol=1e-7, atol=1e-14)
    net.remove()


@pytest.mark.parametrize("build,granularity,cls", [(_tiny_unet, "fine", None),
                                                   (_tiny_unet, "coarse", "DPMSolverMultistepScheduler"),
                                                   (_tiny_dit, "fine", None)])
def test_estimate_is_exact_for_the_linearised_loss(build, granularity, cls):
    """Brute force: hold every call's input at the current run's, recompute every call of the
    flipped schedule on those inputs (its caches passed on from call 0), replay the chain with
    those outputs: the estimate is <dL/dx0, x0' - x0> (fp64), also for flips whose reuse
    segment reaches later calls through the caches."""
    model = build()
    sched = _scheduler(6, cls=cls)
    start = skip_steps(model, 6, compute=[0, 2, 3], granularity=granularity)
    patterns = branch_patterns(start.graph)
    net = SuperNet(model, graph=start.graph)
    chain = _Chain(net, sched, 3.0, model.null_label)
    bank = _bank(model, sched)
    est = estimate(chain, bank, start, patterns=patterns)
    assert {u.kind for u in est.units} == {"drop", "add"} and len(est.units) >= 5 * (1 + bool(patterns))
    xs, x0 = _inputs(chain, bank, start)
    torch.testing.assert_close(_replay(chain, bank, _held_input_outputs(chain, bank, start, xs)), x0)
    x0 = x0.requires_grad_()
    g, = torch.autograd.grad(consistency_loss(x0, bank.targets, "mse").mean(), x0)
    drop_3 = next(j for j, u in enumerate(est.units) if u.call == 3 and not any(u.row))  # calls 4, 5 read its caches
    for j in [drop_3] + torch.randperm(len(est.units))[:3].tolist():
        u = est.units[j]
        x_lin = _replay(chain, bank, _held_input_outputs(chain, bank, _flipped(start, u), xs))
        reference = float((g * (x_lin - x0.detach())).sum())
        assert abs(reference) > 0
        torch.testing.assert_close(est.predicted[j].item(), reference, rtol=1e-7, atol=1e-14)
    net.remove()


@pytest.mark.parametrize("cls", [None, "DPMSolverMultistepScheduler"])
def test_output_adjoints_are_the_loss_gradient_in_each_calls_output(cls):
    """dL/d out_s (a graph through the SuperNet chain) against a central difference of the
    runtime's run with ``out_s`` moved along a random direction (fp64): it carries the change
    through every later call's input and the caches they read."""
    from shortcut_kernels.dipgo.learn import output_adjoints

    model = _tiny_unet()
    sched = _scheduler(6, cls=cls)
    start = skip_steps(model, 6, compute=[0, 2, 3])
    net = SuperNet(model, graph=start.graph)
    chain = _Chain(net, sched, 3.0, model.null_label)
    bank = _bank(model, sched)
    lam = output_adjoints(chain, bank, start)
    assert len(lam) == 6 and all(l.shape == bank.noise.shape for l in lam)
    h = 1e-6
    for s in (1, 2, 4):  # a reused call, a computed call whose caches calls 4, 5 read, a late reused one
        v = torch.randn_like(bank.noise)

        def loss(eps):
            def moved(i, eu, ec):
                return (eu + eps * v, ec + eps * v) if i == s else (eu, ec)
            with torch.no_grad():
                x0 = chain._run_skipping(bank.noise, bank.labels, start, None, on_output=moved)
            return float(consistency_loss(x0, bank.targets, "mse").mean())

        fd = (loss(h) - loss(-h)) / (2 * h)
        assert abs(fd) > 0
        torch.testing.assert_close(float((lam[s] * v).sum()), fd, rtol=1e-5, atol=1e-12)
    # the last call has no later calls: its adjoint is the shortcut's gamma * dL/dx_0, and the
    # two estimates agree on the flips of that call
    both = {k: estimate(chain, bank, start, sensitivity=k) for k in ("shortcut", "adjoint")}
    last = [j for j, u in enumerate(both["shortcut"].units) if u.call == 5]
    torch.testing.assert_close(both["adjoint"].predicted[last], both["shortcut"].predicted[last], rtol=1e-9, atol=0)
    assert not torch.allclose(both["adjoint"].predicted, both["shortcut"].predicted)
    with pytest.raises(ValueError, match="sensitivity"):
        estimate(chain, bank, start, sensitivity="exact")
    net.remove()


def test_estimate_loss_is_the_true_bank_loss_and_ranks_single_flips():
    """The recorded run's loss is the schedule's true loss; and on a tiny model the estimate
    has the sign of the measured change for the flips whose effect is large."""
    model = _tiny_unet()
    sched = _scheduler(8)
    start = skip_steps(model, 8, compute=[0, 1, 3, 5])
    net = SuperNet(model, graph=start.graph)
    chain = _Chain(net, sched, 3.0, model.null_label)
    bank = make_bank(model, sched, 4, guidance=3.0)
    est = estimate(chain, bank, start)
    base = bank_loss(chain, bank, start)
    assert est.loss == pytest.approx(base, rel=1e-9)
    true = torch.tensor([bank_loss(chain, bank, Schedule(
        torch.cat([start.keep[:u.call], torch.tensor([u.row]), start.keep[u.call + 1:]]), start.graph)) - base
        for u in est.units], dtype=torch.float64)
    adds = torch.tensor([u.kind == "add" for u in est.units])
    # the full model is the target: every add helps and the estimate says so
    assert bool((true[adds] < 0).all()) and bool((est.predicted[adds] < 0).all())
    net.remove()


def test_learner_keeps_the_budget_and_never_ends_below_its_start():
    model = _tiny_unet(torch.float32)
    sched = _scheduler(8)
    start = skip_steps(model, 8, compute=[0, 5, 6])  # a poor placement the moves can improve
    target = start.macs_kept + 0.02
    bank = make_bank(model, sched, 4)
    res = learn(model, sched, target, start=start, bank=bank, progress=False, estimate_size=2, max_validations=4)
    assert res.schedule.macs_kept <= target + 1e-9
    assert all(h["macs_kept"] <= target + 1e-9 for h in res.history)
    assert res.psnr >= res.start_psnr
    assert len(res.history) >= 2 and res.psnr > res.start_psnr  # the placement was poor: it moved
    psnrs = [h["psnr"] for h in res.history]
    assert psnrs == sorted(psnrs)
    # the reported PSNR is the schedule's on the bank
    net = SuperNet(model, graph=res.schedule.graph)
    chain = _Chain(net, sched, 3.0, model.null_label)
    assert res.psnr == pytest.approx(10 * torch.log10(torch.tensor(4.0 / bank_loss(chain, bank, res.schedule))).item())
    net.remove()


def test_learner_starts_from_the_best_handmade_schedule_within_the_budget():
    model = _tiny_dit(torch.float32)
    sched = _scheduler(8, "digits-dit")
    res = learn(model, sched, 0.5, bank=make_bank(model, sched, 2), time_budget=5.0, progress=False,
                estimate_size=2, max_validations=4)
    assert res.start.macs_kept <= 0.5 and res.schedule.macs_kept <= 0.5 + 1e-9
    assert res.psnr >= res.start_psnr


def _bare(kind):
    torch.manual_seed(0)
    if kind == "dit":
        m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                            out_channels=1, num_layers=2, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=10, norm_num_groups=1)
        return LabelConditioned(m.eval().requires_grad_(False))
    m = diffusers.UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                       block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                       attention_head_dim=4,
                                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return LabelConditioned(m.eval().requires_grad_(False), embeddings=torch.randn(11, 2, 8))


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_learner_runs_on_bare_diffusers_models_and_accelerate_applies_its_schedule(kind):
    model = _bare(kind)
    sched = _scheduler(6)
    start = skip_steps(model, 6, compute=[0, 4])
    res = learn(model, sched, start.macs_kept + 0.01, start=start, bank=make_bank(model, sched, 2),
                progress=False, estimate_size=2, max_validations=4, time_budget=30)
    assert isinstance(res.schedule, Schedule)
    assert res.schedule.model_class == type(model.backbone).__name__
    assert res.schedule.macs_kept <= start.macs_kept + 0.01 + 1e-9 and res.psnr >= res.start_psnr
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([1, 2])
    with accelerate(model.backbone, res.schedule, scheduler=sched):  # the backbone's own runtime applies it
        for t in sched.timesteps:
            out = model(x, t, labels)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_learner_climbs_several_starts_and_keeps_the_best_on_the_bank():
    """starts=2: two hand-made starts with distinct keep rows, the best two on the bank, each
    climbed; the result is the climb with the highest bank PSNR. starts=1 climbs the best one."""
    model = _tiny_unet(torch.float32)
    sched = _scheduler(8)
    bank = make_bank(model, sched, 2)
    kw = dict(bank=bank, time_budget=30.0, progress=False, estimate_size=1, max_validations=4, patterns=False)
    two = learn(model, sched, 0.5, starts=2, **kw)
    assert len(two.climbs) == 2 and two.psnr == max(c["psnr"] for c in two.climbs)
    assert sum(c["seconds"] for c in two.climbs) <= two.seconds  # each climb's own time, not the total
    net = SuperNet(model, "coarse")
    chain = _Chain(net, sched, 3.0, model.null_label)
    scored = sorted(start_options(model, 8, 0.5), key=lambda s: bank_loss(chain, bank, s))
    net.remove()
    firsts = [scored[0]] + [next(s for s in scored if not torch.equal(s.keep, scored[0].keep))]
    assert [c["start_psnr"] for c in two.climbs] == pytest.approx(
        [10 * torch.log10(torch.tensor(4.0 / bank_loss(chain, bank, s))).item() for s in firsts])
    one = learn(model, sched, 0.5, starts=1, **kw)
    assert len(one.climbs) == 1 and one.climbs[0]["start_psnr"] == pytest.approx(two.climbs[0]["start_psnr"])
    assert one.start.name == firsts[0].name and one.start.params == firsts[0].params


def test_bad_inputs_name_the_argument():
    model = _tiny_unet(torch.float32)
    sched = _scheduler(6)
    bank = make_bank(model, sched, 2)
    start = skip_steps(model, 6, compute=[0, 2, 4])
    with pytest.raises(ValueError, match="target_macs"):
        learn(model, sched, 1.5, bank=bank)
    with pytest.raises(ValueError, match="over target_macs"):
        learn(model, sched, 0.2, start=start, bank=bank)
    with pytest.raises(ValueError, match="start has 10 calls"):
        learn(model, sched, 0.9, start=skip_steps(model, 10, compute=[0, 5]), bank=bank)
    with pytest.raises(TypeError, match="start must be a Schedule"):
        learn(model, sched, 0.9, start="skip", bank=bank)
    with pytest.raises(ValueError, match="time_budget"):
        learn(model, sched, 0.9, start=start, bank=bank, time_budget=0)
    with pytest.raises(ValueError, match="validate"):
        learn(model, sched, 0.9, start=start, bank=bank, validate=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="starts"):
            learn(model, sched, 0.9, bank=bank, starts=bad)
    for bad in ((0, 3), 2, (), (True,)):
        with pytest.raises(ValueError, match="forecast"):
            learn(model, sched, 0.9, start=start, bank=bank, forecast=bad)
    with pytest.raises(TypeError, match="null_label"):
        learn(model.backbone, sched, 0.9, start=start, bank=bank)
    with pytest.raises(ValueError, match="bank"):
        Bank(bank.noise, bank.labels[:1], bank.targets)
    with pytest.raises(ValueError, match="size"):
        make_bank(model, sched, 0)
    with pytest.raises(ValueError, match="embeddings"):
        LabelConditioned(diffusers.UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1,
                                                        block_out_channels=(8, 16), norm_num_groups=4,
                                                        cross_attention_dim=8, attention_head_dim=4,
                                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")))
    net = SuperNet(model, "fine")
    with pytest.raises(ValueError, match="graph=schedule.graph"):
        estimate(_Chain(net, sched, 3.0, 10), bank, start)
    net.remove()


def test_proposals_keep_the_budget_rank_by_prediction_and_spread_over_units():
    from shortcut_kernels.dipgo.learn import Estimate, Unit, proposals

    units = [Unit(c, (False,), -0.01, "drop") for c in range(1, 6)] + [Unit(c, (True,), 0.01, "add")
                                                                         for c in range(6, 12)]
    pred = torch.randn(len(units), dtype=torch.float64)
    est = Estimate(1.0, units, pred)
    moves = proposals(est, macs=0.4, budget=0.4, max_per_unit=2)
    score = dict(zip(units, pred.tolist()))
    for p, us in moves:
        assert 0.4 + sum(u.macs for u in us) <= 0.4 + 1e-9  # adds come only with a drop
        assert p == pytest.approx(sum(score[u] for u in us))
        if len(us) == 2:
            assert {u.kind for u in us} == {"drop", "add"} and us[0].call != us[1].call
    assert len(moves) == 5 + 5 * 6  # every single drop and every swap: none is lost, only deferred
    counts, k = {}, 0  # the spread-out moves end at the first one that would use a unit a third time
    while k < len(moves) and all(counts.get(u, 0) < 2 for u in moves[k][1]):
        for u in moves[k][1]:
            counts[u] = counts.get(u, 0) + 1
        k += 1
    first, later = moves[:k], moves[k:]  # then the deferred ones; each part best first
    assert later and [m[0] for m in first] == sorted(m[0] for m in first)
    assert [m[0] for m in later] == sorted(m[0] for m in later)
    assert all(len(us) == 1 for _, us in proposals(est, 0.4, 0.4, swaps=False))
    # a floor (LearnConfig.window): no single drop, only equal-MAC swaps and what stays above it
    floored = proposals(est, 0.4, 0.4, floor=0.395)
    assert floored and all(len(us) == 2 for _, us in floored)


def test_learner_window_keeps_the_macs_near_the_target():
    """With a window the moves never take the MACs below (1 - window) of the target (a drop
    that helps on the bank is otherwise accepted, and the comparison at equal MACs is lost)."""
    model = _tiny_unet(torch.float32)
    sched = _scheduler(8)
    start = skip_steps(model, 8, compute=[0, 1, 2, 5])
    bank = make_bank(model, sched, 4)
    res = learn(model, sched, start.macs_kept, start=start, bank=bank, progress=False, estimate_size=2,
                max_validations=8, window=0.02, patterns=False)
    assert all(start.macs_kept * 0.98 - 1e-9 <= h["macs_kept"] <= start.macs_kept + 1e-9 for h in res.history)
    with pytest.raises(ValueError, match="window"):
        learn(model, sched, start.macs_kept, start=start, bank=bank, window=1.0)


def test_train_defaults_to_the_learner_and_refuses_the_other_methods_settings():
    """``dipgo.train`` is the learner unless ``method="ste"``; a setting of the other method is
    refused by name rather than ignored."""
    from shortcut_kernels.dipgo.learn import LearnConfig, LearnResult
    from shortcut_kernels.dipgo.train import TrainConfig, TrainResult, train

    model = _tiny_unet(torch.float32)
    sched = _scheduler(6)
    bank = make_bank(model, sched, 2)
    start = skip_steps(model, 6, compute=[0, 4])
    target = start.macs_kept + 0.01
    res = train(model, sched, target=target, start=start, bank=bank, progress=False, estimate_size=1,
                max_validations=4)
    direct = learn(model, sched, target, start=start, bank=bank, progress=False, estimate_size=1, max_validations=4)
    assert isinstance(res, LearnResult) and res.schedule == direct.schedule and res.psnr == direct.psnr
    via_config = train(model, sched, LearnConfig(estimate_size=1, max_validations=4), target=target, start=start,
                       bank=bank, progress=False)
    assert via_config.schedule == direct.schedule
    for kwargs, name in [(dict(mode="exact"), "mode"), (dict(iters=3), "iters"), (dict(resume=True), "resume"),
                         (dict(config=TrainConfig(lr=0.2)), "lr")]:
        with pytest.raises(ValueError, match=f"{name}: settings of method='ste'"):
            train(model, sched, target=target, start=start, bank=bank, progress=False, **kwargs)
    with pytest.raises(ValueError, match="estimate_size: settings of method='learn'"):
        train(model, sched, method="ste", estimate_size=2, progress=False)
    with pytest.raises(ValueError, match="start and bank"):
        train(model, sched, method="ste", start=start, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        train(model, sched, method="sgd", progress=False)
    ste = train(model, sched, method="ste", target=0.5, iters=2, batch_size=2, bank_size=2, granularity="coarse",
                progress=False, pruner_dim=8, pruner_hidden=8)
    assert isinstance(ste, TrainResult) and ste.schedule.macs_kept <= 0.5 + 1e-9


def test_order_moves_change_only_reused_blocks_and_skip_the_current_orders():
    model = _tiny_dit(torch.float32)
    keep = torch.ones(6, 3, dtype=torch.bool)
    keep[[2, 4], 1:] = False  # block 0 computes at every call: it has no order to choose
    s = Schedule(keep, graph_of(model, "fine"), forecast=[0, 1, 1])
    moves = order_moves(s, (0, 1, 2))
    assert [0, 1, 1] not in moves and len(moves) == len({tuple(m) for m in moves})
    assert all(m[0] == 0 for m in moves)
    assert [0, 0, 0] in moves and [0, 2, 2] in moves and [0, 2, 1] in moves and [0, 1, 0] in moves
    assert order_moves(s, (1,)) == []  # only the current order allowed: nothing to try


def test_segment_order_moves_change_one_reuse_segment_and_keep_moves_keep_other_calls_orders():
    from shortcut_kernels.dipgo.learn import Unit, _with_units, segment_order_moves

    model = _tiny_dit(torch.float32)
    keep = torch.ones(9, 3, dtype=torch.bool)
    keep[[1, 2, 3, 5, 6, 8]] = False
    keep[5, 0] = True  # a partial row inside the second segment: its computed cell keeps order 0
    s = Schedule(keep, graph_of(model, "fine"), forecast=2)
    segments = [[1, 2, 3], [5, 6], [8]]
    moves = segment_order_moves(s, (0, 1, 2))
    assert len(moves) == 6 and len({tuple(m.flatten().tolist()) for m in moves}) == 6  # 3 segments, 2 other orders
    for m in moves:
        changed = sorted({int(t) for t in (m != s.forecast).nonzero()[:, 0]})
        assert changed and any(set(changed) <= set(seg) for seg in segments)
        assert bool((m[keep] == 0).all()) and set(m[~keep].tolist()) <= {0, 1, 2}
        seg = next(seg for seg in segments if set(changed) <= set(seg))
        assert len(set(m[seg][~keep[seg]].tolist())) == 1  # one order over the segment's reused cells
    assert segment_order_moves(s, (2,)) == []
    # a keep move keeps the per-cell orders of the calls it does not touch
    mixed = Schedule(keep, s.graph, forecast=moves[0])
    moved = _with_units(mixed, [Unit(4, (False, False, False), -0.1, "drop")])
    untouched = [t for t in range(9) if t != 4]
    assert torch.equal(moved.forecast[untouched], mixed.forecast[untouched])
    assert moved.forecast[4].tolist() == [2, 2, 2]  # the newly reused call: each block's order


def test_learner_chooses_forecast_orders_and_keeps_them_through_keep_moves():
    """With forecast=(0, 1, 2) the start is the best hand-made schedule at any order; the result
    runs with orders from that set, never below its start on the bank, within the budget; and its
    bank PSNR is the one of its forecasting run (not of the same keep rows repeating)."""
    model = _tiny_dit(torch.float32)
    sched = _scheduler(10, "digits-dit")
    bank = make_bank(model, sched, 3)
    res = learn(model, sched, 0.5, bank=bank, time_budget=20.0, progress=False, estimate_size=2, max_validations=4,
                forecast=(0, 1, 2))
    s = res.schedule
    assert s.macs_kept <= 0.5 + 1e-9 and res.psnr >= res.start_psnr
    assert set(s.forecast[~s.keep].tolist()) <= {0, 1, 2}
    net = SuperNet(model, graph=s.graph)
    chain = _Chain(net, sched, 3.0, model.null_label)
    loss = bank_loss(chain, bank, s)
    assert res.psnr == pytest.approx(10 * torch.log10(torch.tensor(4.0 / loss)).item())
    # the start was scored at every order: it is no worse than each hand-made start's other orders
    for o in (0, 1, 2):
        assert bank_loss(chain, bank, res.start.with_forecast(o)) >= bank_loss(chain, bank, res.start) - 1e-12
    if s.forecast.any():
        assert bank_loss(chain, bank, s.with_forecast(0)) != loss
    net.remove()


def test_partial_rows_are_deepcache_branches_on_unets_and_leading_blocks_on_transformers():
    from shortcut_kernels.dipgo.learn import partial_rows

    dit = _tiny_dit(torch.float32)  # 3 transformer blocks: the first 1 or 2 computing
    fine = skip_steps(dit, 8, count=3, granularity="fine")
    start, patterns = partial_rows(dit, fine)
    assert start is fine and patterns == [[0], [0, 1]]
    assert partial_rows(dit, skip_steps(dit, 8, count=3))[1] == []  # the coarse graph: whole calls only
    unet = _tiny_unet(torch.float32)
    start, patterns = partial_rows(unet, skip_steps(unet, 8, count=3))
    assert start.graph.granularity == "fine" and patterns == branch_patterns(start.graph) and patterns


def test_start_options_add_the_lead_placement_at_every_order():
    """The learner's starts: the hand-made schedules in the top 10% of the budget and, for
    each skip_steps count among them, the lead-and-even placement at each lead share; every
    one at every allowed order, none over the budget."""
    model = zoo.load("digits-dit").model
    opts = start_options(model, 50, 0.402, (0, 1))
    assert all(s.macs_kept <= 0.402 + 1e-9 for s in opts)
    counts = {s.params["count"] for s in opts if s.name == "skip_steps" and s.params["placement"] != "lead"}
    leads = {(s.params["count"], s.params["lead"]) for s in opts if s.params.get("placement") == "lead"}
    assert counts and leads == {(c, max(1, round(f * c))) for c in counts for f in LEAD_SHARES}
    orders = {}
    for s in opts:
        orders.setdefault(s.computed_calls() and tuple(s.keep.flatten().tolist()), set()).add(int(s.forecast.max()))
    assert all(o == {0, 1} for o in orders.values())


def test_shift_moves_move_every_call_from_a_whole_call_on_and_keep_the_macs():
    from shortcut_kernels.dipgo.learn import shift_moves

    model = _tiny_dit(torch.float32)
    calls = 20
    computed = sorted({0, 1} | set(torch.randperm(calls - 3)[:4].add(2).tolist()))
    s = skip_steps(model, calls, compute=computed, granularity="fine").with_forecast(int(torch.randint(1, 3, ())))
    keep = s.keep.clone()
    keep[computed[-1] + 1 if computed[-1] + 1 < calls else 2, 0] = True  # a partial row moves too
    s = Schedule(keep, s.graph, forecast=s.forecast)
    moves = shift_moves(s)
    whole = [c for c in range(1, calls) if bool(s.keep[c].all())]
    assert {m["call"] for m, _ in moves} <= set(whole) and moves
    for m, cand in moves:
        c, d = m["call"], m["by"]
        assert cand.macs_kept == pytest.approx(s.macs_kept, rel=1e-12)
        assert torch.equal(cand.keep[:min(c, c + d)], s.keep[:min(c, c + d)])  # before the shift: unchanged
        for t in range(c, calls):
            if 0 <= t + d < calls:
                assert torch.equal(cand.keep[t + d], s.keep[t])
                assert torch.equal(cand.forecast[t + d][~cand.keep[t + d]], s.forecast[t][~s.keep[t]])
        assert not bool(cand.keep[c if d > 0 else calls - 1].any())
    # a shift that would overwrite or push out a computed row is not offered
    for c in whole:
        assert ((c, -1) in {(m["call"], m["by"]) for m, _ in moves}) == (c >= 2 and not bool(s.keep[c - 1].any()))
        assert ((c, 1) in {(m["call"], m["by"]) for m, _ in moves}) == (not bool(s.keep[calls - 1].any()))


def test_first_improving_takes_the_best_of_the_first_batch_that_improves_and_samples_no_further():
    from shortcut_kernels.dipgo import learn as L

    losses = [1.0, 0.99999, 0.5, 1.2, 0.9, 0.1, 0.2, 0.3]  # batch 2 improves (0.5 best), batch 3 would do better
    sampled = []

    def score(cand):
        sampled.append(cand)
        return losses[cand], f"trace{cand}"

    cfg = L.LearnConfig(validate=2, min_gain=0.02)
    res = L.LearnResult(None, None, 0.0, 0.0, 0, 0.0)
    got = L._first_improving(score, [(f"m{i}", i) for i in range(len(losses))], 1.0, cfg, res, lambda: False)
    assert got == (0.5, "m2", 2, "trace2")
    assert sampled == [0, 1, 2, 3] and res.evaluations == 4
    # a gain under min_gain is no move; nothing improving: None after sampling all
    sampled.clear()
    assert L._first_improving(score, [("a", 1)], 1.0, cfg, res, lambda: False) is None
    # out of time after the first candidate: that batch is judged, no further one is sampled
    sampled.clear()
    assert L._first_improving(score, [(f"m{i}", i) for i in (0, 5, 6)], 1.0, cfg, res, lambda: True) is None
    assert sampled == [0]



def test_climbs_are_picked_on_the_bank_samples_they_did_not_see(monkeypatch):
    """climb_size=2 of a bank of 4: the starts are scored and the climbs run on the first 2
    samples; the schedule returned is the best on the other 2 of every one the climbs passed
    through (the starts included), with the moves after it dropped, even where another is best
    on the climbs' own samples."""
    from shortcut_kernels.dipgo import learn as L

    model = _tiny_unet(torch.float32)
    sched = _scheduler(8)
    bank = make_bank(model, sched, 4)
    head, rest = bank.head(2), Bank(bank.noise[2:], bank.labels[2:], bank.targets[2:])
    net = SuperNet(model, "coarse")
    chain = _Chain(net, sched, 3.0, model.null_label)
    options = start_options(model, 8, 0.5)
    scored = sorted(options, key=lambda s: bank_loss(chain, head, s))
    firsts = [scored[0]] + [next(s for s in scored if not torch.equal(s.keep, scored[0].keep))]
    # each climb "moves" through two other schedules within the budget
    paths = [[firsts[0], *options[-2:]], [firsts[1], *options[:2]]]
    on_rest = [[L._psnr(bank_loss(chain, rest, s)) for s in path] for path in paths]
    net.remove()
    k, i = max(((k, i) for k in range(2) for i in range(3)), key=lambda ki: on_rest[ki[0]][ki[1]])

    # a real climb scores its start and each accepted move on the other samples
    real = learn(model, sched, 0.5, bank=bank, climb_size=2, starts=1, progress=False, estimate_size=2,
                 max_validations=4)
    assert len(real.history) >= 1 and [h["pick_psnr"] for h in real.history] == [
        pytest.approx(L._psnr(bank_loss(chain, rest, s))) for s in real.path]

    def fake_climb(model, scheduler, climb_bank, start, target, cfg, budget, progress, pick_bank):
        assert torch.equal(climb_bank.noise, head.noise) and torch.equal(pick_bank.noise, rest.noise)
        j = next(j for j, s in enumerate(firsts) if torch.equal(s.keep, start.keep))
        r = L.LearnResult(paths[j][-1], start, 0.0, 100.0, 1, 0.0, path=list(paths[j]))  # each end best on its bank
        r.history = [dict(psnr=10.0 * i, move=i, pick_psnr=p) for i, p in enumerate(on_rest[j])]
        return r

    monkeypatch.setattr(L, "_climb", fake_climb)
    got = learn(model, sched, 0.5, bank=bank, climb_size=2, starts=2, progress=False)
    assert [c["pick_psnrs"] for c in got.climbs] == [pytest.approx(p) for p in on_rest]
    assert torch.equal(got.schedule.keep, paths[k][i].keep) and got.schedule.name == paths[k][i].name
    assert torch.equal(got.start.keep, firsts[k].keep) and [h["move"] for h in got.history] == list(range(i + 1))
    assert got.psnr == 10.0 * i  # the climb bank's PSNR of the schedule returned
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="climb_size"):
            learn(model, sched, 0.5, bank=bank, climb_size=bad)


def test_structure_move_takes_the_best_shift_of_the_whole_family(monkeypatch):
    """A structure family is sampled whole and its best move taken (steepest ascent), not the
    first few that improve as the proposals are."""
    from shortcut_kernels.dipgo import learn as L

    model = _tiny_unet(torch.float32)
    start = skip_steps(model, 12, compute=[0, 2, 5, 8]).with_forecast(2)
    shifts = L.shift_moves(start)
    assert len(shifts) > 4
    losses = {id(c): 0.9 - 0.1 * k / len(shifts) for k, (_, c) in enumerate(shifts)}  # all improve, the last most
    monkeypatch.setattr(L, "shift_moves", lambda s: shifts)
    res = L.LearnResult(None, None, 0.0, 0.0, 0, 0.0)
    got = L._structure_move(lambda cand: (losses[id(cand)], None), start, 1.0,
                            L.LearnConfig(validate=2, forecast=(0, 1, 2)), res, lambda: False)
    assert got[2] is shifts[-1][1] and got[1] == dict(shift=shifts[-1][0]) and res.evaluations == len(shifts)


@pytest.mark.parametrize("build", [_tiny_unet, _tiny_dit])
def test_traced_runs_resume_at_the_first_changed_call_bit_for_bit(build):
    """A move's bank run resumed from the current schedule's trace gives the sample of a whole
    run, bit for bit, and runs only the calls from its first changed one on; its own trace
    resumes back to the current schedule; a move forecasting from more outputs than the trace
    keeps runs whole."""
    from shortcut_kernels.dipgo import learn as L
    from shortcut_kernels.dipgo.gated_chain import first_change

    model, calls = build(torch.float32), 12
    sched = _scheduler(calls)
    start, patterns = L.partial_rows(model, skip_steps(model, calls, compute=[0, 2, 5, 8]).with_forecast(1))
    net = SuperNet(model, graph=start.graph)
    net.remove()
    chain = _Chain(net, sched, 3.0, model.null_label)
    bank = _bank(model, sched, 2)
    made = []
    model.register_forward_pre_hook(lambda m, a: made.append(1))
    x0, trace = chain.traced_run(bank.noise, bank.labels, start)
    assert torch.equal(x0, chain._run_skipping(bank.noise, bank.labels, start, None))
    units = L.units_of(start, patterns)
    picks = torch.randperm(len(units))[:6].tolist()
    moves = [L._with_units(start, [units[i]]) for i in picks] + [c for _, c in L.shift_moves(start)]
    moves += [L._learned(start, start.keep, f) for f in L.segment_order_moves(start, (0, 1, 2))]
    moves += [L._learned(start, start.keep, o) for o in L.order_moves(start, (0, 1, 2))]
    firsts = []
    for move in moves:
        firsts.append(first_change(start, move))
        made.clear()
        got, moved = chain.traced_run(bank.noise, bank.labels, move, trace)
        assert len(made) == calls - firsts[-1]
        assert torch.equal(got, chain._run_skipping(bank.noise, bank.labels, move, None))
        back, _ = chain.traced_run(bank.noise, bank.labels, start, moved)
        assert torch.equal(back, x0)
    assert any(0 < f < calls for f in firsts)
    deeper = start.with_forecast(2)
    assert max(deeper.forecast_depth) > max(start.forecast_depth) and first_change(start, deeper) == 0


def test_learner_climbs_the_same_with_resumed_and_whole_bank_runs():
    """resume=False runs every move's bank run whole: the climb (every accepted move, its bank
    PSNR, the schedule returned) is the same as with runs resumed from the current schedule's."""
    model = _tiny_dit(torch.float32)
    sched = _scheduler(10, "digits-dit")
    bank = make_bank(model, sched, 3)
    runs = [learn(model, sched, 0.5, bank=bank, progress=False, estimate_size=2, max_validations=4, starts=1,
                  forecast=(0, 1, 2), resume=r) for r in (True, False)]
    assert len(runs[0].history) >= 2  # it moved
    assert [h["psnr"] for h in runs[0].history] == [h["psnr"] for h in runs[1].history]
    assert [h["move"] for h in runs[0].history] == [h["move"] for h in runs[1].history]
    assert torch.equal(runs[0].schedule.keep, runs[1].schedule.keep)
    assert torch.equal(runs[0].schedule.forecast, runs[1].schedule.forecast)


def test_bank_sampler_gives_each_schedules_whole_run_and_resumes_a_searchs_moves():
    """bank_sampler (what a search scores on) returns every schedule's whole-run samples bit for
    bit, in a search's order (the start, its moves, one accepted, that one's moves), and resumes
    the moves' runs: fewer denoiser calls than whole runs."""
    from shortcut_kernels.dipgo import learn as L
    from shortcut_kernels.dipgo.search import _swapped

    model, calls = _tiny_unet(torch.float32), 10
    sched = _scheduler(calls)
    bank = make_bank(model, sched, 2)
    sample = L.bank_sampler(model, sched, bank)
    start = skip_steps(model, calls, compute=[0, 2, 4, 7])
    accepted = _swapped(start, 7, 6)
    order = [start, _swapped(start, 4, 5), _swapped(start, 7, 8), accepted, _swapped(accepted, 4, 3),
             _swapped(accepted, 6, 5), _swapped(accepted, 2, 1)]
    net = SuperNet(model, "coarse")
    net.remove()
    chain = _Chain(net, sched, 3.0, model.null_label)
    made = []
    model.register_forward_pre_hook(lambda m, a: made.append(1))
    assert torch.equal(sample(None), bank.targets)
    sampled = 0
    for s in order:
        made.clear()
        got = sample(s)
        sampled += len(made)
        assert torch.equal(got, chain._run_skipping(bank.noise, bank.labels, s, None))
    assert sampled < 0.7 * calls * len(order)  # whole runs: calls * len(order)
