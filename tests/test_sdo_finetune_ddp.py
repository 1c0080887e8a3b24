"""finetune on two gloo ranks equals one process running the same global batch, in the cases
where each rank's local view differs from the global one: stopping (callback / time budget),
a chain schedule under a per-sample policy, stochastic samplers, per-sample class labels.

Each case spawns two CPU ranks with a join timeout, so a rank left waiting in a collective
fails the test instead of blocking it."""
from __future__ import annotations

import datetime
import multiprocessing
import time

import pytest
import torch

from shortcut_kernels import dipgo, sdo, zoo
from shortcut_kernels.zoo.rewards import digits_reward

STEPS = 3
JOIN_TIMEOUT_S = 300
BUDGET_S = 3.0


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
    elif case == "time_budget":  # rank 1's step is slow: only its clock runs past the budget
        iters = 3
        kwargs["optimizer"] = lambda p: SlowStepOnRankOne(p, lr=0.5)
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


class SlowStepOnRankOne(torch.optim.SGD):
    """SGD whose first step sleeps past the budget on rank 1: the step runs after the
    gradients' all_reduce and inside the iteration's clock, so only rank 1's clock runs over."""

    slept = False

    def step(self, closure=None):
        if torch.distributed.get_rank() == 1 and not self.slept:
            self.slept = True
            time.sleep(BUDGET_S + 1.0)
        return super().step(closure)


def _run(case, rank):
    model, sched, config, kwargs = setup(case, rank)
    result = sdo.finetune(model, sched, digits_reward(7), config, **kwargs)
    return lora_state(model), result.iterations


def _rank(rank, world, init_file, out_dir, case):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        state, iterations = _run(case, rank)
        torch.save({"state": state, "iterations": iterations}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, case):
    """Spawn two ranks; fail (killing them) when they do not finish within the timeout."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, 2, str(tmp_path / "init"), str(tmp_path), case)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"{case}: ranks {hung} still running after {JOIN_TIMEOUT_S}s (waiting in a collective)"
    assert [p.exitcode for p in procs] == [0, 0], f"{case}: exit codes {[p.exitcode for p in procs]}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def assert_equal_to_one_process(tmp_path, case, iterations):
    r0, r1 = run_two_ranks(tmp_path, case)
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
    assert_equal_to_one_process(tmp_path, "stop", iterations=1)


def test_time_budget_stop_is_collective(tmp_path):
    """Only rank 1's clock passes the budget (its optimiser step sleeps): both ranks stop
    after that iteration, with the same weights."""
    r0, r1 = run_two_ranks(tmp_path, "time_budget")
    assert r0["iterations"] == r1["iterations"] == 1
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])


def test_per_sample_chain_schedule_keeps_the_global_batch_calls_full(tmp_path):
    """Every rank's chain computes in full the rows of every call the GLOBAL batch keeps, as the
    one process does (not only the calls of its own samples)."""
    assert_equal_to_one_process(tmp_path, "schedule", iterations=2)


@pytest.mark.parametrize("case", ["ddim_eta", "ddpm"])
def test_stochastic_sampler_noise_is_the_global_draw(tmp_path, case):
    """DDIM with eta > 0 and DDPM: each rank's chain noise is its rows of the global batch's draw."""
    assert_equal_to_one_process(tmp_path, case, iterations=2)


def test_per_sample_labels_are_sliced_per_rank(tmp_path):
    """ClassConditional with one label per sample of the global batch: each rank conditions its
    samples on their own labels."""
    assert_equal_to_one_process(tmp_path, "labels", iterations=2)
