"""DiP-GO training under torch.distributed: two CPU ranks on gloo train the same pruner as
one process with the same global batch."""
import os
import sys
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from shortcut_kernels import zoo
    from shortcut_kernels.dipgo.train import train
    from shortcut_kernels.zoo.sampling import make_scheduler

    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    m = zoo.load("digits-unet")
    s = make_scheduler(m.scheduler_config)
    s.set_timesteps(5)
    r = train(m.model, s, method="ste", mode=mode, iters=3, batch_size=4, bank_size=4, lr=0.05, warmup=1,
              sparsity_weight=5.0, granularity="coarse", progress=False, pruner_dim=16, pruner_hidden=8)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"state": r.pruner.state_dict(), "history": r.history,
                "schedule": r.pruner.to_schedule(0.5).keep}, f"{out}/rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()
""")


def _run(tmp: Path, mode: str, ranks: int | None) -> list[dict]:
    script = tmp / "job.py"
    script.write_text(SCRIPT)
    out = tmp / (f"ddp{ranks}" if ranks else "single")
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(script), str(out), mode]
    else:
        cmd = [sys.executable, str(script), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks or 1)]


@pytest.mark.parametrize("mode", ["shortcut", "exact"])
def test_two_gloo_ranks_train_the_same_pruner_as_one_process(tmp_path, mode):
    r0, r1 = _run(tmp_path, mode, 2)
    (single,) = _run(tmp_path, mode, None)
    for k, v in r0["state"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, r1["state"][k]), k  # identical on both ranks
            torch.testing.assert_close(v, single["state"][k], rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["schedule"], single["schedule"])
    for a, b in zip(r0["history"], single["history"]):  # the logged loss is the global batch's
        assert a["consistency"] == pytest.approx(b["consistency"], rel=1e-5, abs=1e-9)
