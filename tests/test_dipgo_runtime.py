"""accelerate(): exactness of full(), remove(), per-run counters, pipelines, errors, cache memory, NaN checks."""
import gc

import diffusers
import pytest
import torch

import shortcut_kernels.runtime.cache as rt
from shortcut_kernels import zoo
from shortcut_kernels.dipgo import COMPUTE, READ, Schedule, accelerate, deepcache, fora, full, skip_steps
from shortcut_kernels.runtime.cache import _CachedBlock

from _dipgo_models import (cfg_loop, run_pipe, tiny_dit, tiny_pixart, tiny_sd15_unet, tiny_sd_pipeline, tiny_unet2d,
                           zoo_unet_inputs)


pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)


def _kwargs(model, seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    name = type(model).__name__
    t = torch.tensor(500 - 37 * seed)
    if name == "UNet2DConditionModel":
        c = model.config
        return dict(sample=torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g), timestep=t,
                    encoder_hidden_states=torch.randn(batch, 3, c.cross_attention_dim, generator=g))
    if name == "UNet2DModel":
        return dict(sample=torch.randn(batch, 3, 8, 8, generator=g), timestep=t)
    if name == "PixArtTransformer2DModel":
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=t.expand(batch),
                    encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    c = model.config
    return dict(hidden_states=torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g),
                timestep=t.expand(batch), class_labels=torch.tensor([seed % 10] * batch))


def _calls(model, n, seed0=0):
    with torch.no_grad():
        return [model(**_kwargs(model, seed0 + i), return_dict=False)[0] for i in range(n)]


MODELS = {"sd15": tiny_sd15_unet, "unet2d": tiny_unet2d, "dit": tiny_dit, "pixart": tiny_pixart,
          "zoo-unet": lambda: zoo.load("digits-unet").model.unet, "zoo-dit": lambda: zoo.load("digits-dit").model.transformer}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("gran", ["coarse", "fine"])
def test_full_is_bit_identical_and_remove_restores(name, gran):
    model = MODELS[name]()
    classes = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    ref = _calls(model, 3)
    h = accelerate(model, full(model, 3, granularity=gran))
    assert any(isinstance(m, _CachedBlock) for m in model.modules())
    assert list(model.state_dict()) == keys  # module paths untouched
    got = _calls(model, 3)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    h.remove()
    assert not h.state.cached_tensors() and not h.active
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(hasattr(m, "_sk_slot") or "forward" in m.__dict__ for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(torch.equal(a, b) for a, b in zip(_calls(model, 3), ref))


@pytest.mark.parametrize("name", ["sd15", "unet2d", "dit", "pixart"])
def test_schedules_equal_a_hand_written_cache(name):
    """Every schedule kind against a direct reference: at reuse calls, the block's output (UNet) or residual
    (transformer) is what it was at its last computing call; computed by running the untouched model with hooks."""
    model = MODELS[name]()
    calls = 5
    if name in ("dit", "pixart"):
        s = fora(model, calls, 2)
    else:
        s = deepcache(model, calls, 2, 1) if name == "sd15" else skip_steps(model, calls, compute=[0, 3])
    g = s.graph
    cache, outs = {}, []
    for t in range(calls):
        hooks = []
        for b in g.blocks:
            mod = model.get_submodule(b.module_path)

            def hook(m, args, kw, out, b=b, t=t):
                x = args[0] if args else kw["hidden_states"]
                if s.keep[t, b.index]:
                    cache[b.index] = (out - x) if b.residual else out
                    return out
                return x + cache[b.index] if b.residual else cache[b.index]

            hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
        try:
            outs += _calls(model, 1, seed0=t)
        finally:
            for hk in hooks:
                hk.remove()
    with accelerate(model, s):
        got = _calls(model, calls)
    for t, (a, b) in enumerate(zip(got, outs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"call {t}")


def _leaf_counter(model):
    ran = []
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: ran.append(n))
             for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return ran, hooks


def test_reused_and_dead_blocks_compute_nothing():
    """At a retrieval call, exactly the conv/linear layers of the COMPUTE blocks (plus the stem/head) run."""
    model = tiny_sd15_unet()
    s = deepcache(model, 4, 3, 3)
    g = s.graph
    block_of = lambda n: next((b.index for b in g if n.startswith(b.module_path + ".")), -1)  # noqa: E731
    with accelerate(model, s):
        ran, hooks = _leaf_counter(model)
        try:
            _calls(model, 1)
            call0 = {block_of(n) for n in ran}
            ran.clear()
            _calls(model, 1, seed0=1)
            call1 = {block_of(n) for n in ran}
        finally:
            for hk in hooks:
                hk.remove()
    assert call0 == set(range(len(g))) | {-1}
    assert call1 == {b.index for b in g if s.modes[1][b.index] == COMPUTE} | {-1}
    assert len(call1) < len(call0) / 2


def test_dead_block_placeholders_allocated_once_per_run_without_grad(monkeypatch):
    """Sampling (no grad): a dead block's placeholder is made once per run and reused; with
    grad on (training through a schedule) every call gets a fresh one, since a graph may save
    it. The outputs are the same either way."""
    model = tiny_sd15_unet()
    s = deepcache(model, 6, 3, 0)
    made = []
    real = rt._placeholder
    monkeypatch.setattr(rt, "_placeholder", lambda meta: made.append(meta) or real(meta))
    with accelerate(model, s) as h:
        modes = h._call_modes.modes
        dead = [[b for b, m in enumerate(modes[c]) if m not in (COMPUTE, READ)] for c in range(6)]
        assert sum(map(len, dead)) > len(set().union(*dead)) > 0
        first = _calls(model, 6)
        assert len(made) == len(set().union(*dead))  # once per dead block per run
        made.clear()
        with torch.enable_grad():
            graph = [model(**_kwargs(model, i), return_dict=False)[0].detach() for i in range(6)]
        assert len(made) == sum(map(len, dead))  # once per dead block per call
        made.clear()
        second = _calls(model, 6)  # a new run records its shapes and makes them again
        assert len(made) == len(set().union(*dead))
    for a, b, c in zip(first, second, graph):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_transformer_run_of_reused_blocks_is_one_cache_residual(monkeypatch):
    model = tiny_dit(layers=4)
    n = []
    real = rt.cache_residual
    monkeypatch.setattr(rt, "cache_residual",
                        lambda x, caches, weights=None: (n.append(len(caches)), real(x, caches, weights=weights))[1])
    s = fora(model, 3, 3)
    with accelerate(model, s):
        _calls(model, 3)
    assert n == [4, 4]  # calls 1 and 2: one op adds the 4 cached residuals
    keep = s.keep.clone()
    keep[1] = torch.tensor([True, False, False, True])
    n.clear()
    with accelerate(model, Schedule(keep, s.graph)):
        _calls(model, 3)
    assert n == [2, 4]


def test_bare_model_runs_follow_each_other_and_run_context():
    model = tiny_dit()
    s = fora(model, 3, 3)
    with accelerate(model, s) as h:
        a = _calls(model, 6)  # two runs of 3 calls back to back
        assert h.runs_started == 2
        assert all(torch.equal(x, y) for x, y in zip(a[:3], _calls(model, 3)))  # same inputs, same run
        with h.run():
            b = _calls(model, 3)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        with pytest.raises(ValueError, match="made 2 denoiser calls"):
            with h.run():
                _calls(model, 2)
        with pytest.raises(ValueError, match="more than the schedule's 3"):
            with h.run():
                _calls(model, 4)
        _calls(model, 1)
        h.reset()  # a fresh run after an interrupted one
        assert all(torch.equal(x, y) for x, y in zip(_calls(model, 3), a))


def test_scheduler_starts_runs_and_checks_call_count():
    m, cond, uncond, x = zoo_unet_inputs(n=2)
    sched = diffusers.DDIMScheduler.from_config(zoo.info("digits-unet")["scheduler_config"])
    s = deepcache(m.unet, 6, 3, 0)
    with accelerate(m.unet, s, scheduler=sched) as h:
        a = cfg_loop(m.unet, sched, 6, cond, uncond, x)
        cfg_loop(m.unet, sched, 6, cond * 0, uncond, x[:1].expand_as(x).clone())  # another run, other inputs
        b = cfg_loop(m.unet, sched, 6, cond, uncond, x)
        assert torch.equal(a, b)  # no stale cache from the run in between
        assert h.runs_started == 3 and not h.state.cached_tensors()
        with pytest.raises(ValueError, match="schedule has 6 denoiser calls but this run makes 4"):
            cfg_loop(m.unet, sched, 4, cond, uncond, x)
    with accelerate(m.unet, s, scheduler=sched, auto_resize=True):
        r = cfg_loop(m.unet, sched, 4, cond, uncond, x)
    with accelerate(m.unet, s.resize(4), scheduler=sched):
        assert torch.equal(r, cfg_loop(m.unet, sched, 4, cond, uncond, x))


def test_separate_cond_uncond_passes_are_refused():
    m, cond, uncond, x = zoo_unet_inputs(n=2)
    sched = diffusers.DDIMScheduler.from_config(zoo.info("digits-unet")["scheduler_config"])
    sched.set_timesteps(4)
    with accelerate(m.unet, full(m.unet, 4), scheduler=sched):
        with pytest.raises(RuntimeError, match="more than once per step"):
            for t in sched.timesteps:
                m.unet(x, t, encoder_hidden_states=cond)
                m.unet(x, t, encoder_hidden_states=uncond)


def test_pipeline_full_identity_runs_memory_and_to():
    pipe = tiny_sd_pipeline()
    ref = run_pipe(pipe, 5)
    with accelerate(pipe, full(pipe, 5)):
        assert torch.equal(run_pipe(pipe, 5), ref)
    s = deepcache(pipe, 5, 2, 1)
    with accelerate(pipe, s) as h:
        first = run_pipe(pipe, 5)
        gc.collect()
        counts = []
        for i in range(10):
            out = run_pipe(pipe, 5, batch=1 + i % 2)
            assert not h.state.cached_tensors()
            del out
            gc.collect()
            counts.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
        assert len(set(counts[2::2])) == 1 and len(set(counts[3::2])) == 1  # no growth run over run
        assert torch.equal(run_pipe(pipe, 5), first)
        with pytest.raises(ValueError, match="resize"):
            run_pipe(pipe, 7)
        pipe.to(torch.float64)
        out64 = run_pipe(pipe, 5)
    assert h.state.cached_tensors() == []  # after remove() (the with block): nothing held
    assert out64.dtype == torch.float64
    with accelerate(pipe, s):
        assert torch.equal(run_pipe(pipe, 5), out64)
    pipe.to(torch.float32)


@pytest.mark.parametrize("cls", ["DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                                 "EulerDiscreteScheduler", "HeunDiscreteScheduler"])
def test_samplers_count_calls(cls):
    pipe = tiny_sd_pipeline(scheduler_cls=getattr(diffusers, cls))
    steps = 4
    ref = run_pipe(pipe, steps)
    pipe.scheduler.set_timesteps(steps)
    calls = len(pipe.scheduler.timesteps)
    assert (calls == 2 * steps - 1) if cls.startswith("Heun") else calls in (steps, steps + 1)
    with accelerate(pipe, full(pipe, calls)):
        assert torch.equal(run_pipe(pipe, steps), ref)
    with accelerate(pipe, deepcache(pipe, calls, 2, 0)) as h:
        out = run_pipe(pipe, steps)
        assert h.state.call == calls - 1
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_mismatched_model_refused_and_double_accelerate():
    a, d = tiny_sd15_unet(), tiny_dit()
    with pytest.raises(ValueError, match="UNet2DConditionModel, not for this DiTTransformer2DModel"):
        accelerate(d, full(a, 3))
    with accelerate(a, full(a, 3)):
        with pytest.raises(RuntimeError, match="already cached"):
            accelerate(a, full(a, 3))
    with pytest.raises(TypeError, match="Schedule"):
        accelerate(a, "s.json")


def test_nan_in_cache_raises_where_reused():
    model = tiny_sd15_unet()
    s = deepcache(model, 3, 3, 0)
    g = s.graph
    victim = next(b for b in g if s.modes[1][b.index] == READ)
    mod = model.get_submodule(victim.module_path)
    # the NaN arises inside the block (its last layer), so the block's own output - the cache - holds it
    leaf = [m for m in mod.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][-1]
    hk = leaf.register_forward_hook(lambda m, a, o: o * float("nan"))
    with accelerate(model, s):
        _calls(model, 1)
        with pytest.raises(FloatingPointError, match=victim.name.replace(".", r"\.") + r".*computed at call 0.*call 1"):
            _calls(model, 1, seed0=1)
    hk.remove()
    dit = tiny_dit()
    s = fora(dit, 3, 3)
    hk = dit.transformer_blocks[2].ff.register_forward_hook(lambda m, a, o: o + float("inf"))
    with accelerate(dit, s):
        _calls(dit, 1)
        with pytest.raises(FloatingPointError, match="transformer_blocks.2"):
            _calls(dit, 1, seed0=1)
    with accelerate(dit, s, check_finite=False):
        _calls(dit, 2)  # no check: NaN/inf flows on
    hk.remove()


def test_inf_in_a_forecast_cache_names_the_block():
    """A run of forecasting transformer blocks is one pass; an inf in one block's newest
    computed residual fails the run's check, and the error names that block and the forecast."""
    dit = tiny_dit()
    s = fora(dit, 6, 3, forecast=1)
    poisoned = [False]
    hk = dit.transformer_blocks[2].ff.register_forward_hook(lambda m, a, o: o + float("inf") if poisoned[0] else o)
    with accelerate(dit, s):
        _calls(dit, 3)  # computes at call 0, repeats at 1 and 2 (one computed residual each)
        poisoned[0] = True
        _calls(dit, 1, seed0=3)  # computes at call 3, the inf lands in block 2's residual
        poisoned[0] = False
        with pytest.raises(FloatingPointError, match=r"transformer_blocks\.2.*call 4 would forecast from it"):
            _calls(dit, 1, seed0=4)
    hk.remove()
