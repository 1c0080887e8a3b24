"""DiP-GO's pruner network and losses (shortcut_kernels.dipgo.pruner / .losses)."""
import pytest
import torch
import torch.nn.functional as F

from shortcut_kernels import zoo
from shortcut_kernels.dipgo import deepcache, from_scores, skip_steps
from shortcut_kernels.dipgo.losses import consistency_loss, kept_macs_fraction, sparsity_loss
from shortcut_kernels.dipgo.pruner import Pruner, straight_through
from shortcut_kernels.models import block_graph

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)


@pytest.fixture(scope="module")
def graphs():
    unet = zoo.load("digits-unet").model.backbone
    dit = zoo.load("digits-dit").model.backbone
    return {"unet-fine": block_graph(unet, "fine", (1, 1, 16, 16)),
            "unet-coarse": block_graph(unet, "coarse", (1, 1, 16, 16)),
            "dit-fine": block_graph(dit, "fine", (1, 1, 16, 16))}


def _randomise_head(p: Pruner, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in p.head.weights:
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5)


def test_pruner_starts_by_keeping_everything(graphs):
    p = Pruner.for_graph(graphs["unet-fine"], calls=7, dim=32, hidden=16)
    gates = p()
    assert gates.shape == (7, len(graphs["unet-fine"]))
    assert torch.equal(gates.detach(), torch.ones_like(gates))
    assert (p.keep_probs() > 0.7).all()


@pytest.mark.parametrize("builder", ["skip_steps", "deepcache"])
def test_pruner_from_a_schedule_starts_at_it(graphs, builder):
    g = graphs["unet-fine"]
    s = (skip_steps(g, 12, count=5, placement="power", exponent=1.5) if builder == "skip_steps"
         else deepcache(g, 12, 3, 0))
    p = Pruner.from_schedule(s, dim=16, hidden=8)
    gates = p.budget_gates(s.macs_kept)
    assert torch.equal(gates.detach().bool(), s.keep)  # the budgeted mode starts at the schedule
    assert torch.equal(p().detach().bool(), s.keep)  # and so do the plain straight-through gates
    assert p.to_schedule(s.macs_kept, ranked=True) == s
    # the gradient reaches every decision's logits (call 0 always computes: none there)
    (gates * torch.rand(gates.shape)).sum().backward()
    grad = p.head.biases[-1].grad[:, 1].view(12, len(g))
    assert grad[1:].abs().min() > 0 and not grad[0].any()


def test_straight_through_is_hard_forward_and_softmax_backward():
    logits = torch.randn(5, 4, 2, requires_grad=True)
    weight = torch.randn(5, 4)
    g = straight_through(logits)
    assert set(g.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(g.detach(), (logits[..., 1] > logits[..., 0]).float())
    (grad,) = torch.autograd.grad((g * weight).sum(), logits)
    (expected,) = torch.autograd.grad((logits.softmax(-1)[..., 1] * weight).sum(), logits)
    torch.testing.assert_close(grad, expected)
    gumbel = straight_through(logits, gumbel_tau=0.5)
    assert set(gumbel.detach().unique().tolist()) <= {0.0, 1.0}


def test_batched_head_equals_one_mlp_per_pair():
    p = Pruner(3, 4, dim=16, hidden=8)
    _randomise_head(p)
    h = torch.randn(12, 16)
    out = p.head(h)
    for pair in (0, 5, 11):
        x = h[pair]
        for i, (w, b) in enumerate(zip(p.head.weights, p.head.biases)):
            x = x @ w[pair] + b[pair]
            if i < len(p.head.weights) - 1:
                x = F.gelu(x)
        torch.testing.assert_close(out[pair], x)


def test_decisions_see_each_other_through_attention():
    torch.manual_seed(0)
    p = Pruner(4, 3, dim=16, hidden=8)
    _randomise_head(p)
    before = p.logits().detach()
    with torch.no_grad():
        p.queries[0] += 1.0  # only decision (0, 0)'s query changes
    after = p.logits().detach()
    assert not torch.allclose(before[2, 1], after[2, 1])  # another decision moves too


def test_call_zero_always_computes():
    p = Pruner(4, 3, dim=16, hidden=8)
    with torch.no_grad():
        p.head.biases[-1].copy_(torch.tensor([5.0, -5.0]).expand(12, 2))  # reuse everything
    g = p()
    assert torch.equal(g[0].detach(), torch.ones(3)) and torch.equal(g[1:].detach(), torch.zeros(3, 3))
    assert torch.equal(p.reuse_scores()[0], torch.zeros(3))


def test_pruner_round_trip_and_refuses_another_model(graphs, tmp_path):
    p = Pruner.for_graph(graphs["unet-fine"], calls=5, dim=16, hidden=8)
    _randomise_head(p)
    torch.save(p.state_dict(), tmp_path / "p.pt")
    q = Pruner(5, len(graphs["unet-fine"]), dim=16, hidden=8)
    q.load_state_dict(torch.load(tmp_path / "p.pt"))
    assert torch.equal(q.logits(), p.logits())
    q.check_compatible(graphs["unet-fine"], calls=5)
    # the loaded pruner knows its graph: it makes a schedule on its own
    s = q.to_schedule(0.5)
    assert s.block_names == graphs["unet-fine"].names and s.calls == 5 and s.macs_kept <= 0.5 + 1e-9
    assert torch.equal(s.keep, p.to_schedule(0.5).keep)
    assert from_scores(q.graph, q.reuse_scores(), 0.5) == s  # to_schedule is DiP-GO's post-processing of its scores
    with pytest.raises(ValueError, match="granularity"):
        q.check_compatible(graphs["unet-coarse"])
    with pytest.raises(ValueError, match="model class"):
        q.check_compatible(graphs["dit-fine"])
    with pytest.raises(ValueError, match="calls"):
        q.check_compatible(graphs["unet-fine"], calls=6)
    wrong = Pruner(6, len(graphs["unet-fine"]), dim=16, hidden=8)
    with pytest.raises((ValueError, RuntimeError)):
        wrong.load_state_dict(torch.load(tmp_path / "p.pt"))


def test_pruner_rejects_bad_sizes():
    with pytest.raises(ValueError, match="calls"):
        Pruner(0, 3)
    with pytest.raises(ValueError, match="block_names"):
        Pruner(2, 3, block_names=["a", "b"])


@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_pointwise_consistency(kind):
    a, b = torch.randn(3, 1, 16, 16, requires_grad=True), torch.randn(3, 1, 16, 16, requires_grad=True)
    loss = consistency_loss(a, b, kind)
    d = (a - b).flatten(1)
    torch.testing.assert_close(loss, d.square().mean(1) if kind == "mse" else d.abs().mean(1))
    loss.sum().backward()
    assert b.grad is None  # the full sample is a target


@pytest.mark.parametrize("kind", ["ssim", "ssim+l1"])
def test_ssim_consistency(kind):
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert consistency_loss(x, x.clone(), kind).abs().max() < 1e-5
    noisy = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    loss = consistency_loss(noisy, x, kind)
    assert (loss > 0.05).all()
    loss.sum().backward()
    assert torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0
    # closer samples score better
    assert (consistency_loss(x + 0.05 * torch.randn_like(x), x, kind) < loss.detach()).all()


def test_consistency_errors():
    with pytest.raises(ValueError, match="kind"):
        consistency_loss(torch.zeros(1, 4), torch.zeros(1, 4), "psnr")
    with pytest.raises(ValueError, match="shape"):
        consistency_loss(torch.zeros(1, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="SSIM"):
        consistency_loss(torch.zeros(1, 4), torch.zeros(1, 4), "ssim")


def test_kept_macs_fraction_matches_graph(graphs):
    g = graphs["unet-fine"]
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(6, len(g), generator=gen) > 0.4
    expected = sum(g.macs_kept(row.tolist()) for row in keep) / (6 * g.total_macs)
    assert float(kept_macs_fraction(keep, g)) == pytest.approx(expected, rel=1e-6)
    assert float(kept_macs_fraction(torch.ones(3, len(g)), g)) == pytest.approx(1.0)
    soft = torch.full((3, len(g)), 0.7, requires_grad=True)
    kept_macs_fraction(soft, g).backward()
    assert (soft.grad >= 0).all() and soft.grad.sum() > 0


def test_sparsity_loss(graphs):
    """The kept-MAC share of the cascaded gates (tests/test_dipgo_ste.py: dead gates, both sides)."""
    g = graphs["unet-coarse"]
    keep = torch.ones(4, len(g), requires_grad=True)
    loss = sparsity_loss(keep, g)
    assert float(loss.detach()) == pytest.approx(1.0)
    loss.backward()
    assert (keep.grad >= 0).all() and keep.grad.sum() > 0
    # on the target nothing pushes; off it, the distance to it
    mostly_reused = torch.zeros(4, len(g))
    mostly_reused[0] = 1
    kept = float(kept_macs_fraction(mostly_reused, g))
    assert float(sparsity_loss(mostly_reused, g, target=kept)) == 0.0
    assert float(sparsity_loss(mostly_reused, g, target=0.5)) == pytest.approx(0.5 - kept)
    assert float(sparsity_loss(torch.ones(4, len(g)), g, target=0.5)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="blocks"):
        sparsity_loss(torch.ones(4, len(g) + 1), g)
