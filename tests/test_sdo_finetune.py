"""finetune: LoRA and full weights, gradients through the shortcut, checkpoint/resume, LoRA in
diffusers' format, bad rewards leave the weights untouched."""
from __future__ import annotations

import pytest
import torch

from dataclasses import replace

from shortcut_kernels import sdo, zoo
from shortcut_kernels.sdo.finetuning import add_lora, load_lora, save_lora
from shortcut_kernels.sdo.rewards import RewardError
from shortcut_kernels.zoo.rewards import digits_reward

STEPS = 3


def adamw(lr):
    """finetune's default optimiser (AdamW, no weight decay) at ``lr``."""
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def chain_config(**kwargs):
    """A ChainConfig with finetune's default policy (``per-sample:importance``) unless given."""
    return sdo.ChainConfig(**{"policy": "per-sample:importance", **kwargs})


def fresh(dtype=torch.float32):
    model, cfg = zoo.load("digits-unet", dtype=dtype)
    sched = zoo.make_scheduler(cfg)
    sched.set_timesteps(STEPS)
    return model, sched


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_gradient_reaches_lora_parameters_only():
    model, sched = fresh(torch.float64)
    params = add_lora(model, rank=2)
    assert params and all(p.requires_grad for p in params)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)
    fn = sdo.ClassConditional(model, [10])
    with torch.no_grad():  # B starts at zero: the adapted model is the model
        for p in params:
            p.add_(torch.randn_like(p) * 0.01)
    grads = {}
    # memory-light with the chain's adapters merged (the default) and apart; the reference chain
    for light, merge in ((True, True), (True, False), (False, True)):
        for p in params:
            p.grad = None
        gen = torch.Generator().manual_seed(0)
        config = sdo.ChainConfig(policy="per-sample", memory_light=light, merge_adapters=merge)
        x0 = sdo.shortcut_sample(fn, sched, zoo.initial_noise(2, seed=1).double(), config, params=params,
                                 generator=gen)
        digits_reward(3)(x0).sum().backward()
        grads[light, merge] = torch.cat([p.grad.flatten() for p in params])
    ref = grads[False, True]
    assert ref.abs().sum() > 0
    for key in ((True, True), (True, False)):
        assert ((grads[key] - ref).norm() / ref.norm()).item() <= 1e-5, key  # fp64


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def test_merged_adapters_are_exact_and_restored():
    from shortcut_kernels.sdo.lora_merge import merged_adapters

    model, sched = fresh(torch.float64)
    params = add_lora(model, rank=3)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    x, t = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor(500)
    labels = torch.full((3,), zoo.NULL_LABEL)
    with torch.no_grad():
        apart = model(x, t, labels)
        for _ in range(7):  # many cycles: no drift
            with merged_adapters(model):
                assert all(m.merged for m in _lora_layers(model))
                merged = model(x, t, labels)
    torch.testing.assert_close(merged, apart, rtol=1e-10, atol=1e-12)
    assert not any(m.merged for m in _lora_layers(model))
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters() if "lora_" not in n)
    with pytest.raises(RuntimeError, match="inside"):  # an error inside restores them too
        with merged_adapters(model):
            raise RuntimeError("inside")
    assert not any(m.merged for m in _lora_layers(model))
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters() if "lora_" not in n)
    with merged_adapters(None), merged_adapters(fresh()[0]):  # nothing to merge: a no-op
        pass


@pytest.mark.parametrize("merge", [True, False])
def test_shortcut_chain_runs_merged_kept_call_apart(merge):
    """With merge_adapters, the adapters run only in the backward recompute of the kept call."""
    model, sched = fresh()
    params = add_lora(model, rank=2)
    fn = sdo.ClassConditional(model, [zoo.NULL_LABEL])
    calls = []
    hooks = [m.lora_A["default"].register_forward_hook(lambda *a: calls.append(1)) for m in _lora_layers(model)]
    x0 = sdo.shortcut_sample(fn, sched, zoo.initial_noise(2, seed=1), sdo.ChainConfig(merge_adapters=merge),
                             params=params)
    in_chain = len(calls)
    x0.sum().backward()
    for h in hooks:
        h.remove()
    assert in_chain == (0 if merge else STEPS * len(hooks))
    assert len(calls) - in_chain == len(hooks)  # the kept call's recompute: adapters apart
    assert all(p.grad is not None for p in params)


def test_finetune_lora_resume_and_save(tmp_path):
    config = sdo.FinetuneConfig(lora=2, iters=3, batch_size=2, seed=5)
    kwargs = dict(optimizer=adamw(1e-2), progress=False)
    model_a, sched = fresh()
    res_a = sdo.finetune(model_a, sched, digits_reward(7), config, **kwargs)
    assert len(res_a.history) == 3 and res_a.iterations == 3
    base_a = {n: p for n, p in model_a.named_parameters() if "lora_" not in n}
    model_ref, _ = fresh()
    for n, p in model_ref.named_parameters():  # base weights untouched (peft renames them)
        key = n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(base_a.get(n, base_a.get(key)), p, rtol=0, atol=0)
    # 2 iterations + checkpoint, then a fresh model resumes to 3: the same weights
    model_b, sched_b = fresh()
    sdo.finetune(model_b, sched_b, digits_reward(7), replace(config, iters=2, save_every=1), checkpoint_dir=tmp_path,
                 **kwargs)
    model_c, sched_c = fresh()
    res_c = sdo.finetune(model_c, sched_c, digits_reward(7), config, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert res_c.iterations == 3 and len(res_c.history) == 3
    sa, sc = lora_state(model_a), lora_state(model_c)
    assert sa.keys() == sc.keys()
    for k in sa:
        torch.testing.assert_close(sc[k], sa[k], rtol=1e-5, atol=1e-7)
    # LoRA in diffusers' format: a fresh model loading it samples the same images
    path = save_lora(model_a, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    from safetensors.torch import load_file
    keys = list(load_file(str(path)))
    assert keys and all(k.startswith("unet.") for k in keys)
    model_d, _ = fresh()
    load_lora(model_d, tmp_path / "lora")
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor(500)
    lab = torch.full((2,), 10)
    with torch.no_grad():
        torch.testing.assert_close(model_d(x, t, lab), model_a(x, t, lab), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model_d(x, t, lab), model_ref(x, t, lab), atol=1e-4)
    # the path pipe.load_lora_weights(directory) takes: lora_state_dict + load_lora_into_unet
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    state, alphas = Loader.lora_state_dict(str(tmp_path / "lora"))
    model_e, _ = fresh()
    Loader.load_lora_into_unet(state, alphas, unet=model_e.unet)
    with torch.no_grad():
        torch.testing.assert_close(model_e(x, t, lab), model_a(x, t, lab), rtol=1e-5, atol=1e-5)


def test_finetune_full_weights_and_eval():
    model, sched = fresh()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = sdo.FinetuneConfig(lora=None, iters=2, batch_size=2, grad_accum=2, eval_every=1)
    res = sdo.finetune(model, sched, digits_reward(1), config, optimizer=adamw(1e-4),
                       eval_noise=zoo.initial_noise(3, seed=9), progress=False)
    assert [e["iter"] for e in res.eval_history] == [0, 1, 2]
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert changed > 0


def fresh_with_lora():
    """A model with rank-2 adapters moved off their zero start (B = 0 would hide the adapters)."""
    model, sched = fresh()
    add_lora(model, rank=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.01)
    return model, sched


def test_finetune_bad_reward_leaves_weights():
    model, sched = fresh_with_lora()
    before = lora_state(model)
    with pytest.raises(RewardError, match="non-finite"):
        sdo.finetune(model, sched, lambda x0: x0.flatten(1).mean(1) * float("inf"),
                     sdo.FinetuneConfig(lora=2, iters=2, batch_size=2), progress=False)
    after = lora_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RewardError, match="shape"):
        sdo.finetune(model, sched, lambda x0: x0.mean(), sdo.FinetuneConfig(lora=2, iters=1, batch_size=2),
                     progress=False)
    with pytest.raises(FileNotFoundError):
        sdo.finetune(model, sched, digits_reward(1), sdo.FinetuneConfig(lora=2, iters=1), resume=True, progress=False)


def test_finetune_fp16_loss_scale_skips_overflowing_steps():
    """fp16: a step whose gradients overflow is skipped (weights kept, scale lowered); without
    the loss scale the same run writes non-finite weights; a sane reward trains."""
    def overflowing(x0):  # finite rewards whose gradients overflow fp16
        return digits_reward(7)(x0) * 1e30

    runs = {}
    for scale in (None, False):
        model, sched = fresh_with_lora()
        before = lora_state(model)
        config = sdo.FinetuneConfig(lora=2, iters=2 if scale is None else 1, batch_size=2,
                                    chain=chain_config(autocast=torch.float16, loss_scale=scale))
        res = sdo.finetune(model, sched, overflowing, config, progress=False)
        runs[scale] = (before, lora_state(model), res)
    before, after, res = runs[None]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res.history[-1]["loss_scale"] < res.history[0]["loss_scale"] <= 2.0 ** 16
    before, after, res = runs[False]
    assert "loss_scale" not in res.history[0]
    assert not all(torch.isfinite(v).all() for v in after.values())
    model, sched = fresh()
    config = sdo.FinetuneConfig(lora=2, iters=2, batch_size=2, chain=chain_config(autocast=torch.float16))
    res = sdo.finetune(model, sched, digits_reward(7), config, optimizer=adamw(1e-2), progress=False)
    trained = lora_state(model)
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # B starts at zero


@pytest.mark.parametrize("merge", [True, False])
def test_finetune_merge_switch_reaches_training_and_evaluation(monkeypatch, merge):
    from shortcut_kernels.sdo import chain

    merged_chains = []
    real = chain.merged_adapters

    def spy(module):
        merged_chains.append(module is not None)
        return real(module)

    monkeypatch.setattr(chain, "merged_adapters", spy)
    model, sched = fresh()
    config = sdo.FinetuneConfig(lora=2, iters=1, batch_size=2, eval_every=1, chain=chain_config(merge_adapters=merge))
    sdo.finetune(model, sched, digits_reward(7), config, eval_noise=zoo.initial_noise(2, seed=4), progress=False)
    # one chain per training iteration and per evaluation (before and after the iteration)
    assert merged_chains == [merge] * 3


def ddp_config(policy):
    """The DDP runs' settings: the global batch of 4, the same seed on every rank."""
    return sdo.FinetuneConfig(lora=2, iters=2, batch_size=4, seed=3, chain=sdo.ChainConfig(policy=policy))


def _ddp_rank(rank, world, init_file, out_dir, policy):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, sched = fresh()
        sdo.finetune(model, sched, digits_reward(7), ddp_config(policy), optimizer=sgd(0.5), progress=False)
        torch.save(lora_state(model), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# the job `accelerate launch` runs: the process group from the launcher's environment
LAUNCHED_JOB = """
import sys, torch, torch.distributed as dist
from shortcut_kernels import sdo, zoo
from shortcut_kernels.zoo.rewards import digits_reward
torch.set_num_threads(1)
dist.init_process_group("gloo")
model, cfg = zoo.load("digits-unet")
sched = zoo.make_scheduler(cfg)
sched.set_timesteps({steps})
config = sdo.FinetuneConfig(lora=2, iters=2, batch_size=4, seed=3, chain=sdo.ChainConfig(policy="{policy}"))
sdo.finetune(model, sched, digits_reward(7), config, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), progress=False)
torch.save({{n: p.detach() for n, p in model.named_parameters() if "lora_" in n}},
           f"{{sys.argv[1]}}/rank{{dist.get_rank()}}.pt")
dist.destroy_process_group()
"""


def _accelerate_launch(tmp_path, policy):
    """Two ranks under `accelerate launch` (its multi-process launcher is torchrun's; on a
    machine without CUDA the job picks gloo)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    job = tmp_path / "job.py"
    job.write_text(LAUNCHED_JOB.format(steps=STEPS, policy=policy))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1",
               HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(job), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("launcher", ["spawn", "accelerate"])
def test_ddp_two_gloo_ranks_equal_one_process(tmp_path, launcher):
    """Two CPU ranks on gloo: identical LoRA weights on both, equal (max abs diff <= 1e-6) to one
    process running the same global batch. SGD: the update is linear in the averaged gradient
    (Adam would divide tiny fp32 rounding differences by tiny second moments). The spawned run
    uses importance draws: each rank gets its slice of the kept calls and of their weights."""
    import torch.multiprocessing as mp

    policy = "per-sample:importance" if launcher == "spawn" else "per-sample"
    if launcher == "spawn":
        mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path), policy), nprocs=2, join=True)
    else:
        _accelerate_launch(tmp_path, policy)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    model, sched = fresh()
    sdo.finetune(model, sched, digits_reward(7), ddp_config(policy), optimizer=sgd(0.5), progress=False)
    single = lora_state(model)
    assert r0.keys() == single.keys()
    moved = 0
    for k in single:
        assert torch.equal(r0[k], r1[k]), k
        assert (r0[k] - single[k]).abs().max().item() <= 1e-6, k
        moved += int("lora_B" in k and single[k].abs().max().item() > 0)
    assert moved > 0  # the adapters did train


def test_finetune_chain_schedule_runs_the_chain_through_the_schedule():
    from shortcut_kernels import dipgo

    def config(schedule, policy="random"):
        chain = sdo.ChainConfig(policy=policy, chain_schedule=schedule)
        return sdo.FinetuneConfig(lora=2, iters=2, batch_size=2, seed=3, chain=chain)

    kwargs = dict(optimizer=adamw(1e-2), progress=False)
    trained = {}
    for name in ("none", "full", "deepcache"):
        model, sched = fresh()
        chain = {"none": None, "full": dipgo.full(model, STEPS),
                 "deepcache": dipgo.deepcache(model, STEPS, interval=2, branch=0)}[name]
        sdo.finetune(model, sched, digits_reward(7), config(chain), **kwargs)
        trained[name] = lora_state(model)
    for k in trained["none"]:  # an all-compute schedule changes nothing
        torch.testing.assert_close(trained["full"][k], trained["none"][k], rtol=0, atol=0)
    assert any(not torch.equal(trained["deepcache"][k], trained["none"][k]) for k in trained["none"])
    model, sched = fresh()
    with pytest.raises(ValueError, match="chain_schedule"):
        sdo.finetune(model, sched, digits_reward(7), config(dipgo.full(model, STEPS), policy="full"), **kwargs)
    with pytest.raises(ValueError, match="resize"):
        sdo.finetune(model, sched, digits_reward(7), config(dipgo.full(model, STEPS + 1)), **kwargs)
    assert not lora_state(model)  # refused before any adapter was added
