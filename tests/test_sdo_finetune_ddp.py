"""finetune on two gloo ranks equals one process running the same global batch, in the cases
where each rank's local view differs from the global one: stopping (callback / time budget),
a chain schedule under a per-sample policy, stochastic samplers, per-sample class labels.

Each case spawns two CPU ranks with a join timeout, so a rank left waiting in a collective
fails the test instead of blocking it."""
from __future__ import annotations

import datetime
import multiprocessing

import pytest
import torch

from shortcut_kernels import dipgo, sdo, zoo
from shortcut_kernels.zoo.rewards import digits_reward

STEPS = 3
JOIN_TIMEOUT_S = 300
BUDGET_S = 1000.0


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def stop_on_rank(rank, at_iter):
    """A callback that asks to stop after ``at_iter`` on ``rank`` only (every rank when None)."""
    def callback(entry):
        me = torch.distributed.get_rank() if torch.distributed.is_initialized() else None
        return entry["iter"] == at_iter and (rank is None or me == rank)
    return callback


def setup(case, rank):
    """(model, scheduler, config, finetune kwargs) of ``case``; ``rank`` None: one process."""
    model, cfg = zoo.load("digits-unet")
    sched = zoo.make_scheduler(cfg)
    sched.set_timesteps(STEPS)
    chain = sdo.ChainConfig(policy="per-sample")
    kwargs = dict(optimizer=lambda p: torch.optim.SGD(p, lr=0.5), progress=False)
    iters = 2
    if case == "stop":  # rank 1 asks to stop after the first of three iterations
        iters = 3
        kwargs["callback"] = stop_on_rank(1 if rank is not None else None, 1)
    elif case == "time_budget":  # only rank 1's clock runs past the budget (see _run)
        iters = 3
    elif case == "schedule":  # only the calls the global batch keeps compute in full
        chain = sdo.ChainConfig(policy="per-sample", chain_schedule=dipgo.deepcache(model, STEPS, interval=2,
                                                                                     branch=0))
    elif case == "ddim_eta":
        chain = sdo.ChainConfig(policy="per-sample", eta=0.7)
    elif case == "ddpm":
        sched = zoo.make_scheduler(cfg, "DDPMScheduler")
        sched.set_timesteps(STEPS)
    elif case == "labels":  # one class label per sample of the global batch
        kwargs["model_fn"] = sdo.ClassConditional(model, [1, 3, 5, 7])
    config = sdo.FinetuneConfig(lora=2, iters=iters, batch_size=4, seed=3, chain=chain,
                                time_budget=BUDGET_S if case == "time_budget" else None)
    return model, sched, config, kwargs


class FastClock:
    """A ``time`` stand-in whose clock advances a whole budget per reading: the first iteration
    already runs past the budget, on the rank that uses it only."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += BUDGET_S
        return self.now


def _run(case, rank):
    model, sched, config, kwargs = setup(case, rank)
    if case == "time_budget" and rank == 1:
        from shortcut_kernels.sdo import finetuning

        finetuning.time = FastClock()  # this spawned rank's process only
    result = sdo.finetune(model, sched, digits_reward(7), config, **kwargs)
    return lora_state(model), result.iterations


def _rank(rank, world, init_file, out_dir, cases):
    """Run ``cases`` one after the other (one process start for several cases); each case's
    weights and iterations, or its error, go to ``out_dir``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for case in cases:
            try:
                state, iterations = _run(case, rank)
                out = {"state": state, "iterations": iterations}
            except Exception as err:  # the next case still runs; the test reports this one
                out = {"error": f"{type(err).__name__}: {err}"}
            torch.save(out, f"{out_dir}/{case}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, cases):
    """Spawn two ranks running ``cases``; fail (killing them) when they do not finish within
    the timeout. Returns each case's two results."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, 2, str(tmp_path / "init"), str(tmp_path), cases))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"{cases}: ranks {hung} still running after {JOIN_TIMEOUT_S}s (waiting in a collective)"
    assert [p.exitcode for p in procs] == [0, 0], f"{cases}: exit codes {[p.exitcode for p in procs]}"
    return {case: [torch.load(tmp_path / f"{case}-rank{r}.pt") for r in range(2)] for case in cases}


EQUAL_CASES = ("schedule", "ddim_eta", "ddpm", "labels")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """The cases that must equal one process, run on two ranks by one spawn."""
    return run_two_ranks(tmp_path_factory.mktemp("ddp"), EQUAL_CASES)


def assert_equal_to_one_process(results, case, iterations):
    r0, r1 = results
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    single, single_iterations = _run(case, None)
    assert r0["iterations"] == r1["iterations"] == single_iterations == iterations
    assert r0["state"].keys() == single.keys()
    moved = 0
    for k in single:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
        assert (r0["state"][k] - single[k]).abs().max().item() <= 1e-6, k
        moved += int("lora_B" in k and single[k].abs().max().item() > 0)
    assert moved > 0


def test_one_rank_asking_to_stop_stops_every_rank(tmp_path):
    """The callback says stop on rank 1 only: both ranks stop after that iteration, with the
    weights of one process stopped there (no rank left waiting in all_reduce)."""
    assert_equal_to_one_process(run_two_ranks(tmp_path, ["stop"])["stop"], "stop", iterations=1)


def test_time_budget_stop_is_collective(tmp_path):
    """Only rank 1's clock passes the budget (its clock runs fast): both ranks stop after that
    iteration, with the same weights."""
    r0, r1 = run_two_ranks(tmp_path, ["time_budget"])["time_budget"]
    assert r0["iterations"] == r1["iterations"] == 1
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])


def test_per_sample_chain_schedule_keeps_the_global_batch_calls_full(two_rank_runs):
    """Every rank's chain computes in full the rows of every call the GLOBAL batch keeps, as the
    one process does (not only the calls of its own samples)."""
    assert_equal_to_one_process(two_rank_runs["schedule"], "schedule", iterations=2)


@pytest.mark.parametrize("case", ["ddim_eta", "ddpm"])
def test_stochastic_sampler_noise_is_the_global_draw(two_rank_runs, case):
    """DDIM with eta > 0 and DDPM: each rank's chain noise is its rows of the global batch's draw."""
    assert_equal_to_one_process(two_rank_runs[case], case, iterations=2)


def test_per_sample_labels_are_sliced_per_rank(two_rank_runs):
    """ClassConditional with one label per sample of the global batch: each rank conditions its
    samples on their own labels."""
    assert_equal_to_one_process(two_rank_runs["labels"], "labels", iterations=2)


# ---------------------------------------------------------------- one process: the pieces

def test_chain_noise_rows_are_the_global_draws_rows():
    """A chain running rows 2:5 of a batch of 6 draws exactly those rows of the batch's noise,
    call after call; bad noise_rows raise errors naming it."""
    from shortcut_kernels.chain import Chain
    from shortcut_kernels.samplers import Plan

    _, cfg = zoo.load("digits-unet")
    sched = zoo.make_scheduler(cfg)
    sched.set_timesteps(STEPS)
    plan = Plan(sched, 0.8)
    like = torch.empty(3, 1, 16, 16, dtype=torch.float64)
    whole = Chain(sched, generator=torch.Generator().manual_seed(11), plan=plan)
    part = Chain(sched, generator=torch.Generator().manual_seed(11), plan=plan, noise_rows=(6, slice(2, 5)))
    noisy = [st for st in plan.steps if st.noise]
    assert noisy
    for st in noisy:
        torch.testing.assert_close(part.noise(st, like), whole.noise(st, torch.empty(6, 1, 16, 16,
                                                                                      dtype=like.dtype))[2:5],
                                   rtol=0, atol=0)
    with pytest.raises(TypeError, match="noise_rows"):
        Chain(sched, plan=plan, noise_rows=(6, (2, 5)))
    wrong = Chain(sched, generator=torch.Generator().manual_seed(11), plan=plan, noise_rows=(6, slice(0, 2)))
    with pytest.raises(ValueError, match="noise_rows"):
        wrong.noise(noisy[0], like)


def test_finetune_refuses_labels_that_fit_no_batch_before_changing_the_model():
    model, cfg = zoo.load("digits-unet")
    sched = zoo.make_scheduler(cfg)
    sched.set_timesteps(STEPS)
    config = sdo.FinetuneConfig(lora=2, iters=1, batch_size=4)
    with pytest.raises(ValueError, match=r"model_fn has 3 class labels for the global batch_size 4: give 1"):
        sdo.finetune(model, sched, digits_reward(7), config, model_fn=sdo.ClassConditional(model, [1, 2, 3]),
                     progress=False)
    assert not lora_state(model)  # refused before any adapter was added


def test_rank_conditioning_slices_per_sample_rows_only():
    from shortcut_kernels.sdo.finetuning import _rank_conditioning

    unet = torch.nn.Identity()
    fn = sdo.ClassConditional(unet, [4, 5, 6, 7], guidance=True, null_label=9)
    mine = _rank_conditioning(fn, 4, slice(2, 4))
    assert mine.labels.tolist() == [6, 7] and mine.guidance and mine.null_label == 9 and mine.model is unet
    assert fn.labels.tolist() == [4, 5, 6, 7]  # the caller's model_fn is unchanged
    assert _rank_conditioning(sdo.ClassConditional(unet, [3]), 4, slice(2, 4)).labels.tolist() == [3]
    cond, neg = torch.randn(4, 5, 8), torch.randn(1, 5, 8)
    added = {"text_embeds": torch.randn(4, 6), "time_ids": torch.randn(1, 6)}
    text = sdo.TextConditional(unet, cond, neg, added)
    mine = _rank_conditioning(text, 4, slice(0, 2))
    assert torch.equal(mine.cond, cond[:2]) and torch.equal(mine.uncond, neg)
    assert torch.equal(mine.added["text_embeds"], added["text_embeds"][:2])
    assert torch.equal(mine.added["time_ids"], added["time_ids"])
    with pytest.raises(ValueError, match="prompt_embeds rows for the global batch_size 4"):
        _rank_conditioning(sdo.TextConditional(unet, torch.randn(3, 5, 8)), 4, slice(0, 2))
    custom = lambda x, t: x  # noqa: E731  (a callable of the caller's own: as it is)
    assert _rank_conditioning(custom, 4, slice(0, 2)) is custom
