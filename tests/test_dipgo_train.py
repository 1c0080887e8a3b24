"""DiP-GO training (shortcut_kernels.dipgo.train): the shortcut gradient is the gradient of
the chain with one kept call per sample; exact and shortcut modes train; resume is exact."""
import pytest
import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo.losses import consistency_loss
from shortcut_kernels.dipgo.supernet import SuperNet
from shortcut_kernels.dipgo.train import _Chain, _shortcut_loss, _stratified_calls, full_samples, train
from shortcut_kernels.samplers import guided_update
from shortcut_kernels.samplers import Plan
from shortcut_kernels.zoo.sampling import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)


def _tiny_unet_double():
    from shortcut_kernels.zoo import models

    info = zoo.info("digits-unet")
    cfg = dict(info["model_config"], block_out_channels=[8, 16, 16], cross_attention_dim=16, attention_head_dim=4)
    torch.manual_seed(0)
    return models.build(info["kind"], cfg).double().eval().requires_grad_(False)


def _reference_gradient(chain: _Chain, x_T, labels, target, gates, kept):
    """Autograd through the chain in which only call kept[i] of sample i keeps its graph
    (other outputs and every cache detached): what the shortcut must equal."""
    x = x_T * chain.plan.init_scale
    xs, outs, caches = {}, {}, None
    for st in chain.steps:
        i = st.index
        eu, ec, new = chain.call(st.input_scale * x, chain.timesteps[i], labels, gates[i], caches)
        m = (kept == i).view(-1, 1, 1, 1)
        eu, ec = torch.where(m, eu, eu.detach()), torch.where(m, ec, ec.detach())
        caches = [[t.detach() for t in c] for c in new]
        x = guided_update(st, x, eu, ec, chain.w, xs, outs, chain.plan.kept_x, chain.plan.kept_out)
    loss = consistency_loss(x, target, "mse").mean()
    return torch.autograd.grad(loss, gates)[0]


@pytest.mark.parametrize("scheduler_cls", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_shortcut_gradient_equals_the_one_kept_call_chain(scheduler_cls):
    model = _tiny_unet_double()
    net = SuperNet(model, "fine")
    scheduler = make_scheduler(zoo.info("digits-unet")["scheduler_config"], scheduler_cls)
    scheduler.set_timesteps(6)
    chain = _Chain(net, scheduler, guidance=3.0, null_label=10)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(3, 1, 16, 16, generator=gen, dtype=torch.float64)
    labels = torch.tensor([1, 4, 7])
    target = full_samples(net, scheduler, x_T, labels, 3.0, 10) + 0.05 * torch.randn(3, 1, 16, 16, generator=gen,
                                                                                      dtype=torch.float64)
    gates = (0.2 + 0.6 * torch.rand(6, net.num_blocks, generator=gen, dtype=torch.float64)).requires_grad_()
    kept = _stratified_calls(chain.n, 3, gen)
    surrogate, _ = _shortcut_loss(chain, x_T, labels, target, gates, "mse", kept, Plan(scheduler))
    (ours,) = torch.autograd.grad(surrogate, gates)
    ref = _reference_gradient(chain, x_T, labels, target, gates, kept)
    torch.testing.assert_close(ours / (chain.n - 1), ref, rtol=1e-7, atol=1e-12)
    assert ref[kept].abs().sum() > 0
    others = torch.ones(6, dtype=torch.bool)
    others[kept] = False
    assert torch.equal(ours[others], torch.zeros_like(ours[others]))  # only the kept calls' gates learn


def _tiny_dit_double():
    from shortcut_kernels.zoo import models

    info = zoo.info("digits-dit")
    cfg = dict(info["model_config"], num_layers=3, num_attention_heads=2, attention_head_dim=8)
    torch.manual_seed(0)
    return models.build(info["kind"], cfg).double().eval().requires_grad_(False)


@pytest.mark.parametrize("build", [_tiny_unet_double, _tiny_dit_double])
def test_the_no_graph_run_skips_reused_blocks_and_changes_nothing(build):
    """With hard, cascaded gates the shortcut's no-graph run goes through the runtime, which
    skips reused blocks: the same loss and the same gradient as the SuperNet, which computes
    them all (fp64; the DiT's reused residuals round differently: x + c - x)."""
    from shortcut_kernels.dipgo.postprocess import from_ranking

    model = build()
    net = SuperNet(model, "fine")
    scheduler = make_scheduler(zoo.info("digits-unet")["scheduler_config"])
    scheduler.set_timesteps(8)
    chain = _Chain(net, scheduler, guidance=3.0, null_label=10)
    gen = torch.Generator().manual_seed(2)
    schedule = from_ranking(model, torch.rand(8, net.num_blocks, generator=gen), 0.5, granularity="fine")
    gates = schedule.keep.double()
    assert chain.schedule_of(gates) == schedule and 0.3 < schedule.macs_kept <= 0.5
    assert chain.schedule_of(0.9 * gates) is None and chain.schedule_of(torch.ones_like(gates)) is None
    x_T = torch.randn(3, 1, 16, 16, generator=gen, dtype=torch.float64)
    labels = torch.tensor([2, 5, 9])
    target = full_samples(net, scheduler, x_T, labels, 3.0, 10)
    kept = _stratified_calls(chain.n, 3, gen)
    runs = {}
    for skip in (True, False):
        g = gates.clone().requires_grad_()
        run = chain.run
        chain.run = lambda *a, **k: run(*a, skip_reused=skip, **k)
        try:
            surrogate, loss = _shortcut_loss(chain, x_T, labels, target, g, "mse", kept, Plan(scheduler))
        finally:
            chain.run = run
        runs[skip] = (loss, torch.autograd.grad(surrogate, g)[0])
    assert runs[True][0] > 0
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-9, atol=0)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-7, atol=1e-12)
    assert runs[True][1].abs().sum() > 0


def test_stratified_calls_cover_the_chain():
    gen = torch.Generator().manual_seed(1)
    for n, b in [(50, 8), (10, 10), (6, 3), (50, 1)]:
        k = _stratified_calls(n, b, gen)
        assert k.shape == (b,) and int(k.min()) >= 1 and int(k.max()) <= n - 1
        edges = torch.linspace(1, n, b + 1)
        assert bool(((k >= edges[:-1].floor()) & (k <= edges[1:].ceil())).all())


@pytest.fixture(scope="module")
def unet():
    return zoo.load("digits-unet")


@pytest.mark.parametrize("mode,gumbel", [("shortcut", None), ("exact", None), ("shortcut", 1.0)])
def test_training_prunes_and_resume_is_exact(unet, mode, gumbel, tmp_path):
    def run(resume, stop_at=None):
        s = make_scheduler(unet.scheduler_config)
        s.set_timesteps(6)
        return train(unet.model, s, method="ste", mode=mode, iters=4, batch_size=2, bank_size=4, lr=0.05,
                     warmup=1, sparsity_weight=5.0, granularity="coarse", checkpoint_path=tmp_path / "ck.pt",
                     checkpoint_every=3, resume=resume, progress=False, pruner_dim=16, pruner_hidden=8,
                     gumbel_tau=gumbel,
                     callback=None if stop_at is None else lambda rec: rec["iteration"] == stop_at)

    straight = run(False)
    kept = [h["kept_macs"] for h in straight.history]
    if gumbel is None:  # (Gumbel noise samples gates at random from the start)
        assert kept[0] == pytest.approx(1.0) and kept[-1] < 1.0  # the sparsity loss prunes
    (tmp_path / "ck.pt").unlink()
    run(False, stop_at=2)  # interrupted after iteration 2 (a checkpoint is written on stopping)
    resumed = run(True)
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(straight.pruner.state_dict().values(), resumed.pruner.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_budgeted_training_meets_its_annealed_budget(unet):
    s = make_scheduler(unet.scheduler_config)
    s.set_timesteps(6)
    r = train(unet.model, s, method="ste", budget="anneal", anneal=0.5, target=0.5, iters=4, batch_size=2,
              bank_size=4, lr=0.05, warmup=1, granularity="coarse", progress=False, pruner_dim=16, pruner_hidden=8)
    kept = [h["kept_macs"] for h in r.history]
    # the budget falls 1 -> 0.5 over the first 2 iterations, then stays: the forward meets it
    assert kept[0] <= 0.75 + 1e-9 and all(k <= 0.5 + 1e-9 for k in kept[1:])
    assert kept[-1] > 0.3  # by rank, not by overshooting
    sched = r.pruner.to_schedule(0.5, ranked=True)
    assert sched.name == "from_ranking" and sched.macs_kept <= 0.5 + 1e-9
    assert all(h["sparsity"] == 0 for h in r.history)  # no sparsity loss in this mode
    with pytest.raises(ValueError, match="budget"):
        train(unet.model, s, method="ste", budget="hard", iters=1, progress=False)


def test_train_errors(unet):
    s = make_scheduler(unet.scheduler_config)
    with pytest.raises(ValueError, match="set_timesteps"):
        train(unet.model, s, method="ste", iters=1, progress=False)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="mode"):
        train(unet.model, s, method="ste", mode="full", iters=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(unet.model, s, method="ste", batch_size=8, bank_size=2, iters=1, progress=False)
