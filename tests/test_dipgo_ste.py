"""The paper's straight-through (STE) training, fixed where the defects were ours: ties between
equal scores are broken by an even spread (not earliest call first), the sparsity term acts on
the cascaded gates, and one budget serves training and selection."""
import pytest
import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo.losses import kept_macs_fraction, sparsity_loss
from shortcut_kernels.dipgo.postprocess import budget_rows, from_scores, tie_order
from shortcut_kernels.dipgo.pruner import Pruner
from shortcut_kernels.dipgo.train import train
from shortcut_kernels.models import block_graph
from shortcut_kernels.zoo.sampling import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)


@pytest.fixture(scope="module")
def unet():
    return zoo.load("digits-unet")


@pytest.fixture(scope="module")
def coarse(unet):
    return block_graph(unet.model.backbone, "coarse", (1, 1, 16, 16))


def _reused_calls(rows) -> list[int]:
    return [t for t, r in enumerate(rows) if not any(r)]


@pytest.mark.parametrize("calls", [20, 50])
def test_tied_scores_reuse_calls_spread_over_the_chain_not_the_first_ones(coarse, calls):
    """A new pruner scores every decision the same; the budget is then met by the tie order
    alone. Earliest call first reused calls 1, 2, 3, ... (the most damaging); the spread
    puts reused calls in both halves of the chain alike and call 1 among the last."""
    assert sorted(tie_order(calls)) == list(range(1, calls))
    # call 1 comes in the second half of the order, so no budget reusing up to half the calls takes it
    assert tie_order(calls).index(1) >= (calls - 1) // 2
    p = Pruner.for_graph(coarse, calls, dim=16, hidden=8)
    scores = p.reuse_scores()
    assert bool((scores[1:] == scores[1, 0]).all())  # every score ties
    one_call = (coarse.total_macs - coarse.overhead_macs) / (calls * coarse.total_macs)
    for reuse in range(1, (calls - 1) // 2 + 1):
        target = 1 - reuse * one_call + one_call / 4  # whole calls: ``reuse`` of them meet it
        reused = _reused_calls(budget_rows(coarse, scores, target))
        assert len(reused) == reuse
        first = sum(2 * t < calls for t in reused)
        assert abs(first - (reuse - first)) <= 1, reused  # both halves alike
        # budget_rows reuses the first calls of the tie order, so never call 1 (earliest-first would)
        assert reused == sorted(tie_order(calls)[:reuse]) and 1 not in reused, reused
        # DiP-GO's threshold post-processing walks calls in the same order
        s = from_scores(coarse, scores, target)
        assert _reused_calls(s.keep.tolist()) == reused


def test_budgeted_gates_of_a_new_pruner_are_spread(coarse):
    p = Pruner.for_graph(coarse, 20, dim=16, hidden=8)
    gates = p.budget_gates(0.5).detach()
    reused = _reused_calls((gates > 0.5).tolist())
    assert len(reused) >= 9 and 1 not in reused and max(reused) >= 17


def test_sparsity_acts_on_cascaded_gates(coarse):
    """A dead gate (every consumer of its block reuses) gets no sparsity gradient: on the raw
    gates it was pulled toward "reuse" with no consistency pull against it. The value is the
    kept-MAC share; an outer gate still carries the MACs of the blocks that die with it."""
    g = coarse
    keep = torch.ones(3, len(g))
    keep[1, -1] = 0  # the output-side block reused at call 1: the blocks feeding only it are dead
    dead = [b for b in range(len(g)) if not g.cascade(keep[1].bool().tolist())[b] and b != len(g) - 1]
    assert dead
    keep.requires_grad_()
    loss = sparsity_loss(keep, g)
    assert float(loss.detach()) == pytest.approx(float(kept_macs_fraction(keep.detach().bool(), g)))
    loss.backward()
    assert torch.all(keep.grad[1, dead] == 0)
    macs = torch.tensor(g.block_macs, dtype=torch.float64)
    # call 2 keeps everything: the output-side gate carries more than its own MACs (the blocks
    # that only feed it); a gate's own MACs are its whole gradient where it feeds the output
    per = 3 * g.total_macs
    assert keep.grad[2, -1].item() > float(macs[-1]) / per * (1 + 1e-4)


def test_sparsity_holds_the_budget_from_both_sides(coarse):
    """Below the target the term pushes the gates back up (it used to switch off, and SGD then
    trained far below the budget the schedule was selected at); above it, down."""
    g = coarse
    low = torch.zeros(4, len(g))
    low[0] = 1
    low.requires_grad_()
    value = sparsity_loss(low, g, target=0.5)
    value.backward()
    assert float(value.detach()) > 0 and float(low.grad.sum()) < 0  # descent raises the gates
    high = torch.ones(4, len(g), requires_grad=True)
    sparsity_loss(high, g, target=0.5).backward()
    assert float(high.grad.sum()) > 0  # descent lowers them


@pytest.mark.parametrize("budget", ["penalty", "anneal"])
def test_the_schedule_is_selected_at_the_budget_it_was_trained_at(unet, budget):
    s = make_scheduler(unet.scheduler_config)
    s.set_timesteps(6)
    r = train(unet.model, s, method="ste", budget=budget, anneal=0.5, target=0.5, iters=4, batch_size=2,
              bank_size=4, lr=0.05, warmup=1, sparsity_weight=5.0, granularity="coarse", progress=False,
              pruner_dim=16, pruner_hidden=8)
    one_call = 1 / 6
    assert r.schedule is not None and 0.5 - one_call < r.schedule.macs_kept <= 0.5 + 1e-9
    assert r.schedule == r.pruner.to_schedule(r.config.target, ranked=True, slack=r.config.slack)
    if budget == "anneal":  # the last forward's gates are the selected schedule
        assert r.history[-1]["kept_macs"] == pytest.approx(r.schedule.macs_kept)


def test_ranked_rows_land_within_the_slack_when_a_smaller_reuse_allows_it():
    """Without a window the last reuse may take a whole cascade (a whole call on a UNet) and land
    far below the target; with it, such a reuse is passed over for smaller ones."""
    g = block_graph(zoo.load("digits-unet").model.backbone, "fine", (1, 1, 16, 16))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    misses = 0
    for target in (0.3, 0.4, 0.55):
        scores = torch.rand(20, len(g), generator=gen)
        share = lambda rows: sum(g.macs_kept(r) for r in rows) / (20 * g.total_macs)  # noqa: E731
        plain, fitted = share(budget_rows(g, scores, target)), share(budget_rows(g, scores, target, 0.01))
        assert target * 0.99 - 1e-9 <= fitted <= target + 1e-9
        misses += plain < target * 0.99
    assert misses > 0  # the case the window exists for occurs on these scores
    coarse = block_graph(zoo.load("digits-unet").model.backbone, "coarse", (1, 1, 16, 16))
    for target in (0.3, 0.5, 0.7) * 10:  # big blocks: often no reuse lands in the window; the budget holds
        rows = budget_rows(coarse, torch.rand(6, len(coarse), generator=gen), target, 0.01)
        assert sum(coarse.macs_kept(r) for r in rows) / (6 * coarse.total_macs) <= target + 1e-9
    with pytest.raises(ValueError, match="slack"):
        budget_rows(g, scores, 0.5, slack=1.0)
