"""Forecast reuse (shortcut_kernels.runtime.forecast): a reused block's output extrapolated from
its last computed outputs. Checked against a plain-PyTorch reference loop written here (every
block hooked: computed outputs kept, reused ones extrapolated by hand from divided differences),
order 0 against plain READ bit for bit, the JSON (version 2, version-1 files), resize, compile
and the pipelines."""
import json
from pathlib import Path

import diffusers
import pytest
import torch

from shortcut_kernels import zoo
from shortcut_kernels.dipgo import COMPUTE, FORECAST, READ, Schedule, accelerate, deepcache, fora, full, skip_steps
from shortcut_kernels.models import denoiser
from shortcut_kernels.runtime import forecast as F

from _dipgo_models import (call_kwargs, prompt_embeds, run_pipe, tiny_dit, tiny_dit_pipeline, tiny_pixart,
                           tiny_sd15_unet, tiny_sd_pipeline)

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the reference


class Reference:
    """A schedule run by hand: forward hooks count the denoiser calls; every block of the
    schedule's graph keeps the outputs (transformer blocks: residuals ``out - in``) it computes
    where ``keep`` says so, and elsewhere extrapolates from its last ``min(order, computed - 1)
    + 1`` computed outputs (order 0: the last one) by divided differences, in fp64 (:func:`_by_hand`).
    ``order`` is one int for every block."""

    def __init__(self, model, schedule: Schedule, order: int):
        self.model, self.schedule, self.order = denoiser(model), schedule, order
        self.call = -1
        self.hist: dict[int, list] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles = [self.model.register_forward_pre_hook(self._count)]
        for blk in schedule.graph.blocks:
            paths = blk.module_paths
            for j, p in enumerate(paths):
                mod = self.model.get_submodule(p)
                self.handles.append(mod.register_forward_pre_hook(self._pre(blk, j == 0), with_kwargs=True))
                self.handles.append(mod.register_forward_hook(self._post(blk, j == 0, j == len(paths) - 1),
                                                              with_kwargs=True))

    def reset(self):
        self.call, self.hist, self.inputs = -1, {}, {}

    def remove(self):
        for h in self.handles:
            h.remove()

    def _count(self, module, args):
        self.call += 1

    def _keep(self, b):
        return bool(self.schedule.keep[self.call, b])

    def _pre(self, blk, first):
        def hook(module, args, kwargs):
            if blk.residual and first and self._keep(blk.index):
                self.inputs[blk.index] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    def _post(self, blk, first, last):
        def hook(module, args, kwargs, out):
            b = blk.index
            if self._keep(b):
                if last:
                    val = out - self.inputs.pop(b) if blk.residual else out
                    self.hist.setdefault(b, []).append((self.call, val))
                return out
            if blk.residual:
                x = args[0] if args else kwargs["hidden_states"]
                return x + self._forecast(b) if first else x  # later modules of a group: the first added it
            return self._forecast(b)
        return hook

    def _forecast(self, b):
        hist = self.hist[b]
        n = min(self.order, len(hist) - 1) + 1
        pts = hist[-n:]
        return _map(lambda *ys: _by_hand(self.call, [c for c, _ in pts][::-1], ys[::-1]), *[y for _, y in pts])


def _map(fn, *outs):
    if isinstance(outs[0], torch.Tensor):
        return fn(*outs)
    return tuple(_map(fn, *parts) for parts in zip(*outs))


def _by_hand(t, calls, ys):
    """The forecast at ``t`` from outputs ``ys`` computed at ``calls`` (newest first), in fp64:
    ``y_0 + e d1 + e^2 d2`` with the slope ``d1`` of the last two and the second divided
    difference ``d2`` of the last three (``e = t - calls[0]``)."""
    y = [x.double() for x in ys]
    e = t - calls[0]
    out = y[0]
    if len(y) > 1:
        d1 = (y[0] - y[1]) / (calls[0] - calls[1])
        out = out + e * d1
    if len(y) > 2:
        d1_before = (y[1] - y[2]) / (calls[1] - calls[2])
        out = out + e * e * (d1 - d1_before) / (calls[0] - calls[2])
    return out.to(ys[0].dtype)


def _zoo_samples(model, scheduler, calls, n=6, seed=0):
    return zoo.sample(model, scheduler, torch.arange(n) % 10, steps=calls, guidance=3.0, seed=seed, progress=False)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- the weights


@pytest.mark.parametrize("order", [1, 2])
def test_weights_are_exact_on_lines_and_sum_to_one(order):
    calls = sorted(torch.randperm(30)[:order + 1].tolist(), reverse=True)  # newest first, uneven spacing
    t = calls[0] + int(torch.randint(1, 8, ()))
    a, b = torch.randn(2, dtype=torch.float64).tolist()
    w = F.weights(t, calls)
    assert abs(sum(w) - 1) < 1e-12 and w[0] > 1
    assert abs(sum(wi * (a + b * c) for wi, c in zip(w, calls)) - (a + b * t)) < 1e-9


def test_order_two_on_even_spacing_is_taylorseer():
    """cache-dit's TaylorSeer on evenly spaced computations (window h, s = e / h):
    y_0 + s D1 + s^2 / 2 D2 with the backward differences D1, D2."""
    h, e = int(torch.randint(1, 6, ())), int(torch.randint(1, 6, ()))
    c0 = 2 * h + int(torch.randint(0, 10, ()))
    s = e / h
    w = F.weights(c0 + e, [c0, c0 - h, c0 - 2 * h])
    want = (1 + s + s * s / 2, -s - s * s, s * s / 2)  # y_0 + s (y_0 - y_1) + s^2/2 (y_0 - 2 y_1 + y_2)
    assert w == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("order", [1, 2])
def test_extrapolate_on_the_fused_op_is_the_weighted_sum(order):
    calls = sorted(torch.randperm(20)[:order + 1].tolist(), reverse=True)
    t = calls[0] + int(torch.randint(1, 6, ()))
    ys = [torch.randn(3, 5, 7, dtype=torch.float64) for _ in calls]
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    w = F.weights(t, calls)
    gates = [None if g is None else torch.tensor(g, dtype=torch.float64) for g in F.gates(w)]
    want = x + sum(wi * y for wi, y in zip(w, ys))
    # with a residual (transformer blocks): one weighted cache_residual pass on the weights themselves
    torch.testing.assert_close(F.extrapolate(ys, torch.tensor(w, dtype=torch.float64), residual=x), want,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F.extrapolate(ys, gates), want - x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_by_hand(t, calls, ys), want - x, rtol=1e-9, atol=1e-9)


def test_fallback_to_the_order_the_computed_outputs_allow():
    m = zoo.load("digits-dit").model
    s = fora(m, 12, 3, forecast=2)
    orders = [row[0] for row in s.forecast_orders]
    # calls 1, 2: one computed output (call 0) -> READ; 4, 5: two (0, 3) -> order 1; then order 2
    assert orders == [0, 0, 0, 0, 1, 1, 0, 2, 2, 0, 2, 2]
    assert [row[0] for row in s.modes][1:6] == [READ, READ, 0, FORECAST, FORECAST]
    assert s.forecast_weights[7][0] == pytest.approx(F.weights(7, [6, 3, 0]))
    assert s.forecast_depth == [2] * len(s.graph)
    assert s.cache_bytes() == 3 * fora(m, 12, 3).cache_bytes()  # three outputs kept per block


# ----------------------------------------------------------------------------- parity with the reference


def _zoo_parity(name, build, order, calls):
    z = zoo.load(name)
    model, sched = z.model, zoo.make_scheduler(z.scheduler_config)
    s = build(model, calls, order)
    seed = int(torch.randint(0, 2**20, ()))
    ref = Reference(model, s, order)
    try:
        want = _zoo_samples(model, sched, calls, seed=seed)
    finally:
        ref.remove()
    with accelerate(model, s, scheduler=sched):
        got = _zoo_samples(model, sched, calls, seed=seed)
    with accelerate(model, s.with_forecast(0), scheduler=sched):
        plain = _zoo_samples(model, sched, calls, seed=seed)
    return got, want, plain, s


@pytest.mark.parametrize("name,build,order", [
    ("digits-dit", lambda m, c, o: fora(m, c, 3, forecast=o), 1),
    ("digits-dit", lambda m, c, o: fora(m, c, 3, forecast=o), 2),
    ("digits-dit", lambda m, c, o: skip_steps(m, c, compute=[0, 2, 3, 7, 8, 12, 13], forecast=o), 2),
    ("digits-dit", lambda m, c, o: skip_steps(m, c, count=6, granularity="fine", forecast=o), 1),
    ("digits-unet", lambda m, c, o: deepcache(m, c, 3, 0, forecast=o), 1),
    ("digits-unet", lambda m, c, o: deepcache(m, c, 4, skip=1, forecast=o), 2),
    ("digits-unet", lambda m, c, o: skip_steps(m, c, count=7, forecast=o), 2),
], ids=["dit-fora-1", "dit-fora-2", "dit-skip-uneven-2", "dit-skip-fine-1", "unet-deepcache-1",
        "unet-deepcache-skip-2", "unet-skip-2"])
def test_accelerate_matches_the_reference_loop(name, build, order):
    got, want, plain, s = _zoo_parity(name, build, order, calls=16)
    assert any(FORECAST in row for row in s.modes)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    assert _rel(got, plain) > 1e-3  # forecasting changed the samples


@pytest.mark.parametrize("order", [1, 2])
def test_a_run_of_reused_transformer_blocks_is_one_weighted_cache_residual_pass(order, monkeypatch):
    """At every reused call each run of consecutive reused transformer blocks (fora: all of
    them; the Fn-1 row: all but the first) is one cache_residual call reading x and, per block,
    its order + 1 cached residuals with the weights of :func:`F.weights` (a repeating block: its
    one residual at weight 1; no weights when all repeat), a 1-D tensor in the accumulation dtype
    made once per call and placement (the same tensor in a second run), no gated_blend."""
    from shortcut_kernels.runtime import cache as runtime_cache

    z = zoo.load("digits-dit")
    model, sched = z.model, zoo.make_scheduler(z.scheduler_config)
    base = fora(model, 12, 3, forecast=order)
    keep = base.keep.clone()
    keep[:, 0] = True  # the first block at every call: the run starts at block 1
    seen = []
    real = runtime_cache.cache_residual

    def counting(x, caches, weights=None):
        seen.append((len(caches), weights))
        return real(x, caches, weights=weights)

    monkeypatch.setattr(runtime_cache, "cache_residual", counting)
    monkeypatch.setattr(F, "gated_blend", lambda *a, **k: pytest.fail("a transformer forecast ran gated_blend"))
    for s in (base, Schedule(keep, base.graph, forecast=order)):
        seen.clear()
        with accelerate(model, s, scheduler=sched):
            _zoo_samples(model, sched, 12, seed=0)
            first = list(seen)
            _zoo_samples(model, sched, 12, seed=1)
        reused = [t for t in range(12) if not s.keep[t].all()]
        assert len(reused) > 0 and len(first) == len(reused) and len(seen) == 2 * len(reused)
        for t, (count, weights) in zip(reused, first):
            cells = [b for b, m in enumerate(s.modes[t]) if m != COMPUTE]
            assert cells == list(range(cells[0], len(s.modes[t])))  # one run, to the last block
            want = [w for b in cells for w in (s.forecast_weights[t][b] if s.modes[t][b] == FORECAST else (1.0,))]
            assert count == len(want)
            if all(s.modes[t][b] == READ for b in cells):
                assert weights is None
            else:
                assert weights.dtype == torch.float32 and weights.tolist() == pytest.approx(want, rel=1e-6)
        assert all(a[1] is b[1] for a, b in zip(first, seen[len(first):]))  # not rebuilt per call


def test_the_reference_at_order_zero_is_read():
    """The reference loop itself, on the path that existed before forecasting (READ)."""
    got, want, plain, s = _zoo_parity("digits-dit", lambda m, c, o: fora(m, c, 3, forecast=o), 0, calls=16)
    assert torch.equal(got, plain) and all(FORECAST not in row for row in s.modes)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)


def test_order_zero_is_read_bit_for_bit():
    m = zoo.load("digits-dit").model
    for plain, zero in ((fora(m, 10, 3), fora(m, 10, 3, forecast=0)),
                        (skip_steps(m, 10, count=4), skip_steps(m, 10, count=4, forecast=0))):
        assert zero == plain and zero.to_dict() == plain.to_dict() and "forecast" not in zero.params
        assert not zero.forecast.any() and all(FORECAST not in row for row in zero.modes)
    z = zoo.load("digits-unet")
    sched = zoo.make_scheduler(z.scheduler_config)
    base = deepcache(z.model, 12, 3, 0)
    assert base.to_dict() == deepcache(z.model, 12, 3, 0, forecast=0).to_dict()
    seed = int(torch.randint(0, 2**20, ()))
    outs = []
    for s in (base, deepcache(z.model, 12, 3, 0, forecast=1).with_forecast(0)):
        with accelerate(z.model, s, scheduler=sched):
            outs.append(_zoo_samples(z.model, sched, 12, seed=seed))
    assert torch.equal(outs[0], outs[1])


def test_per_cell_orders_match_the_reference():
    """A forecast on some (call, block) cells only: the reference with its order on those cells."""
    z = zoo.load("digits-dit")
    model, sched = z.model, zoo.make_scheduler(z.scheduler_config)
    base = fora(model, 12, 3)
    cells = torch.zeros(12, len(base.graph), dtype=torch.int64)
    cells[7:9, 2:5] = 2  # blocks 2-4 forecast at calls 7 and 8
    s = base.with_forecast(cells)
    assert s.forecast_blocks is None and s.name == "fora" and "forecast" not in s.params
    assert [b for b, m in enumerate(s.modes[7]) if m == FORECAST] == [2, 3, 4]

    class CellReference(Reference):
        def _forecast(self, b):
            self.order = int(cells[self.call, b])
            return super()._forecast(b)

    seed = int(torch.randint(0, 2**20, ()))
    ref = CellReference(model, s, 0)
    try:
        want = _zoo_samples(model, sched, 12, seed=seed)
    finally:
        ref.remove()
    with accelerate(model, s, scheduler=sched):
        got = _zoo_samples(model, sched, 12, seed=seed)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)


# ----------------------------------------------------------------------------- JSON, resize, arguments


def test_json_round_trip_per_block_and_per_cell(tmp_path):
    m = zoo.load("digits-dit").model
    for s in (fora(m, 20, 4, forecast=2), skip_steps(m, 20, count=5, forecast=1),
              fora(m, 20, 4).with_forecast([0, 1, 2, 1, 0, 2]),
              fora(m, 20, 4).with_forecast(torch.randint(0, 3, (20, 6)))):
        d = json.loads(json.dumps(s.to_dict()))
        assert d["version"] == 2 and any("3" in row for row in d["modes"])
        back = Schedule.load(s.save(tmp_path / "s.json"), m, 20)
        assert back == s and back.forecast_orders == s.forecast_orders and back.params == s.params
    assert fora(m, 20, 4, forecast=2).to_dict()["forecast"] == [2] * 6


def test_version_1_files_still_load():
    """The schedules of a committed make-bench run were written in format version 1."""
    d = json.loads((ROOT / "experiments/measurements/bench-quick-2026-12-07/dipgo-learn.json").read_text())
    unet = zoo.load("digits-unet").model
    for key, sd in d["schedules"].items():
        assert sd["version"] == 1 and "forecast" not in sd
        s = Schedule.from_dict(sd)
        s.validate(unet, sd["calls"])
        assert not s.forecast.any() and ["".join(map(str, r)) for r in s.modes] == sd["modes"]
    dc = Schedule.from_dict(d["schedules"]["deepcache(10,skip=1)"])
    assert dc == deepcache(unet, dc.calls, **dc.params)
    v1 = {k: v for k, v in fora(tiny_dit(), 9, 3).to_dict().items() if k != "forecast"}
    assert Schedule.from_dict({**v1, "version": 1}) == fora(tiny_dit(), 9, 3)
    with pytest.raises(ValueError, match="version 3"):
        Schedule.from_dict({**v1, "version": 3})


def test_resize_keeps_the_forecast():
    m = zoo.load("digits-dit").model
    s = fora(m, 20, 4, forecast=2)
    r = s.resize(40)
    assert r == fora(m, 40, 4, forecast=2) and r.params["forecast"] == 2
    custom = Schedule(s.keep, s.graph, forecast=[1, 2, 0, 1, 2, 0])  # no builder: rows are mapped
    r = custom.resize(30)
    assert r.calls == 30 and r.forecast_blocks == [1, 2, 0, 1, 2, 0]
    cells = torch.zeros(20, 6, dtype=torch.int64)
    cells[10:] = 1
    r = Schedule(s.keep, s.graph, forecast=cells).resize(40)
    assert r.forecast_blocks is None and not r.forecast[:18].any() and bool(r.forecast[22:][~r.keep[22:]].all())


@pytest.mark.parametrize("bad", [3, -1, True, 1.0, "1"])
def test_bad_forecast_values_name_the_argument(bad):
    m = zoo.load("digits-dit").model
    for build in (lambda: fora(m, 10, 3, forecast=bad), lambda: skip_steps(m, 10, count=3, forecast=bad),
                  lambda: fora(m, 10, 3).with_forecast(bad)):
        with pytest.raises(ValueError, match="forecast"):
            build()
    with pytest.raises(ValueError, match="forecast"):
        deepcache(zoo.load("digits-unet").model, 10, 3, forecast=bad)


def test_bad_forecast_shapes_and_files_name_the_field():
    m = zoo.load("digits-dit").model
    s = fora(m, 10, 3)
    for bad in ([1, 2], [[1] * 6] * 3, torch.full((10, 6), 4), torch.full((10, 6), 0.5)):
        with pytest.raises(ValueError, match="forecast"):
            s.with_forecast(bad)
    d = s.to_dict()
    for bad in (["01"] * 10, ["012345"] * 10, [1, 2], "1"):
        with pytest.raises(ValueError, match="forecast"):
            Schedule.from_dict({**d, "forecast": bad})
    s2 = fora(m, 10, 3, forecast=1)
    s2.forecast[0, 0] = 1  # in place, at a computing cell
    with pytest.raises(ValueError, match="forecast"):
        s2.validate(m)


# ----------------------------------------------------------------------------- compile


@pytest.mark.parametrize("make,build,backend", [
    (tiny_dit, lambda m: fora(m, 11, 3, forecast=2), "counting"),
    (tiny_dit, lambda m: fora(m, 11, 3, forecast=2), "aot_eager"),
    (tiny_dit, lambda m: skip_steps(m, 11, compute=[0, 1, 4, 5, 8], forecast=1, granularity="fine"), "counting"),
    (tiny_sd15_unet, lambda m: deepcache(m, 11, 3, 2, forecast=2), "counting"),
], ids=["dit-fora-2", "dit-fora-2-aot", "dit-skip-1", "unet-deepcache-2"])
def test_compile_fullgraph_one_graph_per_pattern(make, build, backend):
    torch._dynamo.reset()
    model = make()
    s = build(model)
    assert any(FORECAST in row for row in s.modes)
    runs = 2

    def run():
        with torch.no_grad():
            return [model(**call_kwargs(model, i)).sample for _ in range(runs) for i in range(s.calls)]

    with accelerate(model, s):
        eager = run()
    graphs = []

    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward

    def aot(gm, inputs):  # through AOTAutograd: the fused op's fake kernel and functionalisation
        graphs.append(gm)
        from functorch.compile import nop
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=nop)(gm, inputs)

    with accelerate(model, s) as h:
        h.compile(backend=counting if backend == "counting" else aot)  # fullgraph=True: a graph break raises
        got = run()
    patterns = set(zip(s.modes[1:], s.forecast_orders[1:]))
    assert len(graphs) == len(patterns)  # weights differ per call, graphs do not
    assert len(patterns) < s.calls - 1
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- pipelines


def _pipeline_parity(pipe, build, order, run):
    s = build(order)
    ref = Reference(pipe.transformer if hasattr(pipe, "transformer") else pipe.unet, s, order)
    try:
        want = run()
    finally:
        ref.remove()
    with accelerate(pipe, s):
        got = run()
    with accelerate(pipe, s.with_forecast(0)):
        plain = run()
    assert torch.isfinite(got).all() and _rel(got, plain) > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_dit_pipeline():
    pipe = tiny_dit_pipeline()

    def run():
        with torch.no_grad():
            return torch.as_tensor(pipe(class_labels=[1, 2], num_inference_steps=10, output_type="latent",
                                        generator=torch.Generator().manual_seed(0)).images)

    _pipeline_parity(pipe, lambda o: fora(pipe, 10, 3, forecast=o), 2, run)


def test_pixart_alpha_pipeline():
    vae = diffusers.AutoencoderKL(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"],
                                  up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=8,
                                  sample_size=8).eval()
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tiny_pixart(),
                                         scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pe, ne = prompt_embeds(2)
    mask = torch.ones(2, pe.shape[1], dtype=torch.long)

    def run():
        with torch.no_grad():
            return torch.as_tensor(pipe(prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt=None,
                                        negative_prompt_embeds=ne, negative_prompt_attention_mask=mask,
                                        num_inference_steps=10, height=8, width=8, use_resolution_binning=False,
                                        output_type="latent", generator=torch.Generator().manual_seed(0)).images)

    _pipeline_parity(pipe, lambda o: skip_steps(pipe, 10, count=5, forecast=o), 1, run)


def test_sd15_pipeline():
    pipe = tiny_sd_pipeline()
    _pipeline_parity(pipe, lambda o: deepcache(pipe, 10, 3, 0, forecast=o), 1,
                     lambda: torch.as_tensor(run_pipe(pipe, 10)))


def test_full_has_nothing_to_forecast():
    s = full(tiny_dit(), 5).with_forecast(2)
    assert not s.forecast.any() and s.forecast_depth == [0] * len(s.graph)


# ----------------------------------------------------------------------------- the schedule map


def _colour_pixels(path, hex_colour):
    import matplotlib.image
    import numpy as np

    rgb = np.round(np.asarray(matplotlib.image.imread(path))[..., :3] * 255).astype(int)
    want = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return int((rgb == want).all(-1).sum())


def test_schedule_map_draws_forecast_apart_from_read(tmp_path):
    """The map has a colour of its own for FORECAST cells (it was drawn as 'not needed' once)."""
    from shortcut_kernels.report import plots

    calls = 9
    repeat, forecast = fora(tiny_dit(), calls, 3), fora(tiny_dit(), calls, 3, forecast=1)
    assert FORECAST in {m for row in forecast.modes for m in row}
    modes = plots.schedule_modes(forecast.to_dict())
    assert modes.tolist() == [list(row) for row in forecast.modes]
    paths = [plots.schedule_map(s.to_dict(), tmp_path / f"{i}.png") for i, s in enumerate((repeat, forecast))]
    read_colour, dead_colour, forecast_colour = (plots._MODE_COLOURS[m] for m in (READ, 2, FORECAST))
    assert len(set(plots._MODE_COLOURS)) == len(plots._MODE_COLOURS)
    assert _colour_pixels(paths[0], forecast_colour) == 0
    assert _colour_pixels(paths[1], forecast_colour) > 1000  # the cells, not only a legend patch
    assert _colour_pixels(paths[1], read_colour) < _colour_pixels(paths[0], read_colour)
    assert _colour_pixels(paths[1], dead_colour) == _colour_pixels(paths[0], dead_colour)


def test_schedule_map_rejects_unknown_modes(tmp_path):
    from shortcut_kernels.report import plots

    d = fora(tiny_dit(), 6, 3).to_dict()
    d["modes"] = [row[:-1] + "7" for row in d["modes"]]
    with pytest.raises(ValueError, match="modes hold \\[7\\]"):
        plots.schedule_map(d, tmp_path / "x.png")
