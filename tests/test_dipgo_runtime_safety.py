"""accelerate(): no silent wrong answers - one accelerate per model, run boundaries of bare models,
debug placeholders (every bundled architecture's block graph is complete), no host sync from the
default NaN check on CUDA, remove() undoes compile()'s Dynamo setting, one run at a time across threads."""
import threading

import diffusers
import pytest
import torch

import shortcut_kernels.runtime.cache as rt
from shortcut_kernels import zoo
from shortcut_kernels.dipgo import DEAD, READ, accelerate, deepcache, fora, skip_steps
from shortcut_kernels.models import available_models, build_model

from _dipgo_models import tiny_dit, tiny_sd15_unet, zoo_unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)

TINY = {  # every bundled architecture at toy width (the layouts of the real configs)
    "sd-1.5": {"block_out_channels": [16, 16, 32, 32], "cross_attention_dim": 16, "norm_num_groups": 8,
               "attention_head_dim": 4, "sample_size": 8},
    "sd-2.1": {"block_out_channels": [16, 16, 32, 32], "cross_attention_dim": 16, "norm_num_groups": 8,
               "attention_head_dim": [2, 2, 4, 4], "sample_size": 8},
    "sdxl": {"block_out_channels": [16, 16, 32], "cross_attention_dim": 16, "norm_num_groups": 8,
             "attention_head_dim": [2, 2, 4], "transformer_layers_per_block": [1, 1, 1], "sample_size": 8,
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 16 + 6 * 8},
    "dit-xl-2": {"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 8, "sample_size": 8,
                 "in_channels": 4, "out_channels": 8},
}


def _kwargs(model, step, batch=2, seed=0):
    """Inputs of denoiser call ``step`` of a run: timesteps fall from call to call, as samplers' do."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    c = model.config
    t = torch.tensor(900 - 97 * step)
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    if type(model).__name__ == "UNet2DConditionModel":
        kw = dict(sample=x, timestep=t, encoder_hidden_states=torch.randn(batch, 5, c.cross_attention_dim, generator=g))
        if c.addition_embed_type == "text_time":
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 16, generator=g),
                                       "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * batch)}
        return kw
    return dict(hidden_states=x, timestep=t.expand(batch), class_labels=torch.tensor([step % 10] * batch))


def _call(model, step, seed=0):
    with torch.no_grad():
        return model(**_kwargs(model, step, seed=seed), return_dict=False)[0]


def _run(model, calls, seed=0):
    return [_call(model, i, seed) for i in range(calls)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _snapshot(model):
    """Everything accelerate() may touch: classes, instance attributes, hooks, parameters and buffers."""
    return ({n: (type(m), sorted(m.__dict__), len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in
             model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()})


def _assert_restored(model, snap):
    now = _snapshot(model)
    assert now[0] == snap[0]
    assert now[1].keys() == snap[1].keys() and all(torch.equal(now[1][k], snap[1][k]) for k in snap[1])


# ----------------------------------------------------------------------------- one accelerate per model


@pytest.mark.parametrize("order", ["fine-then-coarse", "coarse-then-fine"])
def test_any_second_accelerate_is_refused_until_remove(order):
    model = tiny_sd15_unet()
    snap = _snapshot(model)
    ref = _run(model, 4)
    fine, coarse = deepcache(model, 4, 2, 0), skip_steps(model, 4, compute=[0, 2])
    first, second = (fine, coarse) if order == "fine-then-coarse" else (coarse, fine)
    alone = {}
    for name, s in (("first", first), ("second", second)):
        with accelerate(model, s):
            alone[name] = _run(model, 4)
    assert not _same(alone["first"], alone["second"])
    h1 = accelerate(model, first)
    installed = _snapshot(model)[0]
    with pytest.raises(RuntimeError, match=r"already accelerated.*handle\.remove\(\)"):
        accelerate(model, second)
    with pytest.raises(RuntimeError, match=r"already accelerated.*handle\.remove\(\)"):
        accelerate(model, first)
    assert _snapshot(model)[0] == installed  # the refused call changed nothing
    assert _same(_run(model, 4), alone["first"])
    h1.remove()
    _assert_restored(model, snap)
    assert _same(_run(model, 4), ref)
    h2 = accelerate(model, second)
    assert _same(_run(model, 4), alone["second"])
    h2.remove()
    _assert_restored(model, snap)
    assert _same(_run(model, 4), ref)


# ----------------------------------------------------------------------------- run boundaries


@pytest.mark.parametrize("where", ["inside-model-call-2", "inside-model-call-0", "outside-after-call-2"])
def test_bare_model_interrupted_run_does_not_shift_later_runs(where):
    """A run interrupted by an exception (in the model, or in the caller's loop) leaves the next
    full run equal to a fresh handle's: the next run's first timestep starts a new run."""
    model = tiny_dit()
    s = fora(model, 5, 2)
    with accelerate(model, s):
        fresh = _run(model, 5)
    stop_at = 0 if where.endswith("call-0") else 2
    with accelerate(model, s):
        calls = {"n": 0}

        def boom(mod, args):
            calls["n"] += 1
            if where.startswith("inside") and calls["n"] == stop_at + 1:
                raise RuntimeError("interrupted")

        hk = model.transformer_blocks[0].register_forward_pre_hook(boom)
        try:
            for i in range(5):
                if where.startswith("outside") and i == stop_at:
                    break  # the caller's loop raised between two calls
                try:
                    _call(model, i)
                except RuntimeError as e:
                    assert "interrupted" in str(e)
                    break
        finally:
            hk.remove()
        assert _same(_run(model, 5), fresh)
        assert _same(_run(model, 5), fresh)  # and the run after it


def test_bare_model_same_timestep_at_call_1_is_refused_with_the_fixes():
    """Two calls at one timestep at the start of a run is ambiguous (a restarted run or two passes
    per step): the error names the fixes; after ``reset()`` runs are exact again."""
    model = tiny_dit()
    s = fora(model, 4, 2)
    with accelerate(model, s) as h:
        fresh = _run(model, 4)
        _call(model, 0)
        with pytest.raises(RuntimeError, match=r"scheduler=.*handle\.reset\(\).*batch"):
            _call(model, 0, seed=1)
        h.reset()
        assert _same(_run(model, 4), fresh)


def test_scheduler_loop_reusing_timesteps_starts_a_new_run_and_errors_name_the_fixes():
    """A custom loop with ``scheduler=`` that runs twice over one ``set_timesteps``: the first
    timestep after a complete run starts a new run; any other extra call gets an error naming the
    real fixes (set_timesteps / reset between runs, batched CFG)."""
    m, cond, uncond, x = zoo_unet_inputs(n=2)
    sched = diffusers.DDIMScheduler.from_config(zoo.info("digits-unet")["scheduler_config"])
    s = deepcache(m.unet, 4, 2, 0)
    sched.set_timesteps(4)
    ctx = torch.cat([cond, uncond])

    def loop(timesteps):
        with torch.no_grad():
            return [m.unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample for t in timesteps]

    with accelerate(m.unet, s, scheduler=sched) as h:
        a = loop(sched.timesteps)
        b = loop(sched.timesteps)  # no set_timesteps in between
        assert _same(a, b) and h.runs_started == 2
        with pytest.raises(RuntimeError, match=r"set_timesteps.*handle\.reset\(\).*batch"):
            loop(sched.timesteps[1:2])


# ----------------------------------------------------------------------------- debug placeholders


def _tiny(name):
    return build_model(name, overrides=TINY[name])


def _schedules(model):
    if type(model).__name__ == "DiTTransformer2DModel":
        return [fora(model, 6, 3), skip_steps(model, 6, compute=[0, 3]),
                skip_steps(model, 6, compute=[0, 3], granularity="fine")]
    return [deepcache(model, 6, 3, 0), deepcache(model, 6, 2, 1), skip_steps(model, 6, compute=[0, 3]),
            skip_steps(model, 6, compute=[0, 3], granularity="fine")]


@pytest.mark.parametrize("name", available_models())
def test_debug_mode_every_bundled_graph_is_complete(name):
    """debug=True: dead blocks return NaN; a graph that missed a consumer would put it in the output."""
    assert name in TINY, f"add a tiny config of {name} to TINY"
    model = _tiny(name)
    for s in _schedules(model):
        with accelerate(model, s, debug=True):
            ref = _run(model, 6)
        with accelerate(model, s):
            got = _run(model, 6)
        assert all(torch.isfinite(o).all() for o in ref), s
        assert _same(got, ref), s  # NaN placeholders change nothing when no one reads them
    if type(model).__name__ != "DiTTransformer2DModel":  # transformer chains pass dead blocks' input on
        assert any(DEAD in row for s in _schedules(model) for row in s.modes)


def test_debug_mode_shows_a_missing_consumer():
    """A graph that calls a block dead where its output is read: debug mode raises, naming the dead blocks."""
    model = tiny_sd15_unet()
    s = deepcache(model, 4, 2, 0)
    with accelerate(model, s, debug=True) as h:
        modes = h._call_modes.modes
        victim = next(b for b, m in enumerate(modes[1]) if m == READ)
        modes[1] = tuple(DEAD if b == victim else m for b, m in enumerate(modes[1]))
        _call(model, 0)
        with pytest.raises(FloatingPointError, match=s.graph.names[victim].replace(".", r"\.")):
            _call(model, 1)


def test_debug_placeholders_are_nan():
    model = tiny_sd15_unet()
    s = deepcache(model, 3, 3, 0)
    seen = []
    real = rt._placeholder
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rt, "_placeholder", lambda meta: seen.append(real(meta)) or seen[-1])
        with accelerate(model, s, debug=True):
            _run(model, 3)
    leaves = [t for p in seen for t in rt._leaves(p)]
    assert leaves and all(torch.isnan(t).all() for t in leaves)


# ----------------------------------------------------------------------------- NaN check and host syncs


def test_default_finite_check_is_on_host_tensors_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert rt._checks_finite(None, cpu) and not rt._checks_finite(None, cuda)
    assert rt._checks_finite(True, cuda) and rt._checks_finite(True, cpu)
    assert not rt._checks_finite(False, cpu) and not rt._checks_finite(False, cuda)


@pytest.mark.parametrize("check_finite", [None, True, False])
def test_no_finite_check_sync_for_cuda_tensors_by_default(monkeypatch, check_finite):
    """With the tensors' device seen as CUDA, the default makes no ``isfinite`` reduction (a host
    sync on a GPU); ``check_finite=True`` does and raises at the reuse of the NaN."""
    model = tiny_dit()
    s = fora(model, 3, 3)
    real = rt._checks_finite
    asked = []
    monkeypatch.setattr(rt, "_checks_finite", lambda setting, device: asked.append(device) or
                        real(setting, torch.device("cuda")))
    reductions = []
    real_isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: reductions.append(t) or real_isfinite(t))
    hk = model.transformer_blocks[2].ff.register_forward_hook(lambda m, a, o: o + float("inf"))
    kw = {} if check_finite is None else {"check_finite": check_finite}
    try:
        with accelerate(model, s, **kw):
            _call(model, 0)
            if check_finite:
                with pytest.raises(FloatingPointError, match="transformer_blocks.2"):
                    _call(model, 1)
                assert reductions
            else:
                reductions.clear()
                out = _call(model, 1)
                assert not reductions
                assert not real_isfinite(out).all()  # not checked: NaN/inf flows on
    finally:
        hk.remove()
    assert check_finite is False or asked


# ----------------------------------------------------------------------------- compile


def test_remove_restores_dynamos_recompile_limit():
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    before = getattr(cfg, name)
    # set and restored by hand: monkeypatch's undo deletes a config-module attribute, which
    # hides it from Dynamo for every later test
    setattr(cfg, name, 1)
    try:
        model = tiny_dit()
        s = skip_steps(model, 6, compute=[0, 2, 4], granularity="fine")
        h = accelerate(model, s)
        h.compile(backend=lambda gm, inputs: gm.forward)
        assert getattr(cfg, name) > 1  # one graph per distinct keep-pattern
        h.remove()
        assert getattr(cfg, name) == 1
    finally:
        setattr(cfg, name, before)


# ----------------------------------------------------------------------------- threads


def test_concurrent_runs_through_one_handle_are_refused():
    """Thread A is inside its run (held at call 1 by a forward hook); thread B's call raises;
    A's run is untouched, and once it is over B can run."""
    model = tiny_dit()
    s = fora(model, 4, 2)
    with accelerate(model, s):
        fresh = _run(model, 4)
    a_inside, b_done = threading.Event(), threading.Event()
    results, errors = {}, {}

    def hold(mod, args, out):
        if threading.current_thread().name == "A" and not a_inside.is_set() and hold.calls == 1:
            a_inside.set()
            assert b_done.wait(60)
        hold.calls += threading.current_thread().name == "A"

    hold.calls = 0

    def thread_a():
        results["A"] = _run(model, 4)

    def thread_b():
        assert a_inside.wait(60)
        try:
            _call(model, 0, seed=1)
        except RuntimeError as e:
            errors["B"] = e
        finally:
            b_done.set()

    with accelerate(model, s):
        hk = model.register_forward_hook(hold)
        try:
            ts = [threading.Thread(target=f, name=n) for f, n in ((thread_a, "A"), (thread_b, "B"))]
            for t in ts:
                t.start()
            for t in ts:
                t.join(120)
        finally:
            hk.remove()
        assert "another thread" in str(errors.get("B")) and _same(results["A"], fresh)
        other = {}
        t = threading.Thread(target=lambda: other.setdefault("r", _run(model, 4)))
        t.start()
        t.join(120)
        assert _same(other["r"], fresh)
