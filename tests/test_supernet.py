"""DiP-GO's SuperNet (shortcut_kernels.dipgo.supernet): every block blends fresh and cached
outputs with its gate; gates at 1 are the model, hard gates are the runtime's schedule."""
import pytest
import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo import Schedule, accelerate
from shortcut_kernels.dipgo.losses import consistency_loss
from shortcut_kernels.dipgo.supernet import SuperNet
from shortcut_kernels.zoo import models as zoo_models
from shortcut_kernels.zoo.sampling import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)


@pytest.fixture(scope="module", params=["digits-unet", "digits-dit"])
def zoo_model(request):
    m = zoo.load(request.param)
    return request.param, m.model, m.scheduler_config


def _inputs(batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 16, 16, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    return x, labels


def _chain(call, scheduler, x, labels):
    """A short DDIM chain with ``call(x, t, labels, i) -> eps``."""
    for i, t in enumerate(scheduler.timesteps):
        eps = call(x, t.expand(x.shape[0]), labels, i)
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("granularity", ["fine", "coarse"])
def test_gates_at_one_are_the_model_bit_for_bit(zoo_model, granularity):
    _, model, _ = zoo_model
    net = SuperNet(model, granularity)
    x, labels = _inputs()
    t = torch.full((3,), 500)
    ref = model(x, t, labels)
    caches = None
    for _ in range(3):  # with and without caches
        out, caches = net(x, t, labels, gates=torch.ones(net.num_blocks), caches=caches)
        assert torch.equal(out, ref)
    net.remove()
    assert torch.equal(model(x, t, labels), ref)


def test_hard_gates_match_the_runtime_schedule(zoo_model):
    name, model, sched_cfg = zoo_model
    net = SuperNet(model, "fine")
    calls = 6
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(calls, net.num_blocks, generator=gen) > 0.5
    keep[0] = True
    schedule = Schedule(keep, net.graph)
    gates = schedule.keep.double().float()  # the cascade-normalised mask as 0/1 gates
    x, labels = _inputs(seed=1)

    scheduler = make_scheduler(sched_cfg)
    scheduler.set_timesteps(calls)
    state = {}

    def supernet_call(x, t, labels, i):
        out, state["caches"] = net(x, t, labels, gates=gates[i], caches=state.get("caches"))
        return out

    with torch.no_grad():
        ours = _chain(supernet_call, scheduler, x, labels)
    net.remove()
    scheduler = make_scheduler(sched_cfg)
    scheduler.set_timesteps(calls)
    with torch.no_grad(), accelerate(model, schedule) as handle, handle.run():
        runtime = _chain(lambda x, t, labels, i: model(x, t, labels), scheduler, x, labels)
    torch.testing.assert_close(ours, runtime, rtol=1e-5, atol=1e-5)


def test_per_sample_gates_blend_each_sample_with_its_own_gate():
    model = zoo.load("digits-unet").model
    net = SuperNet(model, "coarse")
    x, labels = _inputs(batch=2, seed=2)
    t = torch.full((2,), 300)
    _, caches = net(x, t, labels, gates=torch.ones(net.num_blocks))
    x2 = x + 0.1 * torch.randn_like(x)
    g = torch.ones(2, net.num_blocks)
    g[1, 2:5] = 0
    both, _ = net(x2, t, labels, gates=g, caches=caches)
    first, _ = net(x2[:1], t[:1], labels[:1], gates=g[0], caches=SuperNet.select(caches, torch.tensor([0])))
    second, _ = net(x2[1:], t[1:], labels[1:], gates=g[1], caches=SuperNet.select(caches, torch.tensor([1])))
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, net(x2[1:], t[1:], labels[1:], gates=g[0], caches=SuperNet.select(
        caches, torch.tensor([1])))[0][:1])  # the gate made a difference


def _tiny_double(kind: str):
    """A small zoo-style model in fp64 (fresh random weights) for gradient checks."""
    cfg = dict(zoo.info(kind)["model_config"])
    if kind == "digits-unet":
        cfg.update(block_out_channels=[8, 16, 16], cross_attention_dim=16, attention_head_dim=4)
    else:
        cfg.update(num_layers=3, num_attention_heads=2, attention_head_dim=8)
    torch.manual_seed(0)
    return zoo_models.build(zoo.info(kind)["kind"], cfg).double().eval().requires_grad_(False)


@pytest.mark.parametrize("kind", ["digits-unet", "digits-dit"])
def test_gate_gradient_of_the_consistency_loss_matches_finite_differences(kind):
    model = _tiny_double(kind)
    net = SuperNet(model, "fine")
    scheduler = make_scheduler(zoo.info(kind)["scheduler_config"])
    scheduler.set_timesteps(4)
    x, labels = _inputs(batch=2, seed=4)
    x = x.double()
    with torch.no_grad():
        target = _chain(lambda x, t, labels, i: model(x, t, labels), scheduler, x, labels)

    def loss_of(gates):
        state = {}

        def call(x, t, labels, i):
            out, state["c"] = net(x, t, labels, gates=gates[i], caches=state.get("c"))
            return out
        return consistency_loss(_chain(call, scheduler, x, labels), target, "mse").sum()

    gen = torch.Generator().manual_seed(5)
    gates = (0.3 + 0.4 * torch.rand(4, net.num_blocks, generator=gen, dtype=torch.float64)).requires_grad_()
    (grad,) = torch.autograd.grad(loss_of(gates), gates)
    eps = 1e-6
    for i, b in [(1, 0), (2, net.num_blocks // 2), (3, net.num_blocks - 1), (1, net.num_blocks - 2)]:
        with torch.no_grad():
            up, down = gates.clone(), gates.clone()
            up[i, b] += eps
            down[i, b] -= eps
            fd = (loss_of(up) - loss_of(down)) / (2 * eps)
        # central differences in fp64: ~1e-10 absolute round-off on an O(1) loss
        assert float(grad[i, b]) == pytest.approx(float(fd), rel=1e-5, abs=1e-6 * float(grad.abs().max())), (i, b)
    assert grad[1:].abs().sum() > 0


def test_bad_arguments():
    model = zoo.load("digits-unet").model
    net = SuperNet(model, "coarse")
    x, labels = _inputs(batch=1)
    t = torch.full((1,), 10)
    with pytest.raises(ValueError, match="gates"):
        net(x, t, labels, gates=torch.ones(net.num_blocks + 1))
    with pytest.raises(ValueError, match="caches"):
        net(x, t, labels, gates=torch.ones(net.num_blocks), caches=[None])
