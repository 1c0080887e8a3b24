"""Schedules: cascade normalisation, builders, MACs, JSON round trip and validation, resize, summary, and
the report's map of a schedule drawn from its JSON."""
import json
import random

import pytest
import torch
from diffusers import UNet2DConditionModel

from shortcut_kernels.dipgo import (COMPUTE, DEAD, READ, Schedule, deepcache, fora, from_ranking, from_scores, full,
                                   skip_steps)
from shortcut_kernels.models import block_graph, build_model, skip_keep
from shortcut_kernels.report.plots import schedule_map, schedule_modes

from _dipgo_models import tiny_dit, tiny_sd15_unet, tiny_unet2d


@pytest.fixture(scope="module")
def sd():
    return tiny_sd15_unet()


@pytest.fixture(scope="module")
def sd15_meta():
    return build_model("sd-1.5", device="meta")


def test_schedule_is_cascade_normalised_and_call0_full(sd):
    g = block_graph(sd, "coarse")
    rng = random.Random(0)
    keep = [[True] * len(g)] + [[rng.random() < 0.5 for _ in g] for _ in range(7)]
    s = Schedule(keep, g)
    assert torch.equal(s.keep, g.cascade(torch.tensor(keep)))
    assert torch.equal(Schedule(s.keep, g).keep, s.keep)  # idempotent
    with pytest.raises(ValueError, match="call 0"):
        Schedule([[False] * len(g)], g)
    with pytest.raises(ValueError, match=r"\[calls, 9\]"):
        Schedule([[True] * 3], g)
    with pytest.raises(ValueError, match="from_scores"):
        Schedule(torch.full((2, len(g)), 0.5), g)


def test_modes_read_vs_dead(sd):
    s = skip_steps(sd, 4, compute=[0, 2])
    last = len(s.graph) - 1
    for t in (1, 3):  # whole-call reuse: the last up block is read, everything else is dead
        assert s.modes[t][last] == READ and set(s.modes[t][:last]) == {DEAD}
    assert set(s.modes[0]) == {COMPUTE} and s.cached_blocks == [last]


def test_macs_and_ideal_speedup(sd15_meta):
    s = deepcache(sd15_meta, 10, 5, 0, sample_shape=(1, 4, 64, 64))
    g = s.graph
    retrieval = sum(b.macs for b, k in zip(g, g.deepcache_keep(0)) if k) + g.overhead_macs
    expected = (2 * g.total_macs + 8 * retrieval) / (10 * g.total_macs)
    assert s.macs_kept == pytest.approx(expected)
    assert s.ideal_speedup == pytest.approx(1 / expected)
    assert s.macs_per_call()[1] == retrieval
    assert full(sd15_meta, 7).macs_kept == 1.0


def test_deepcache_builder(sd):
    s = deepcache(sd, 10, 3, 2)
    g = s.graph
    assert s.computed_calls(g.names[20]) == [0, 3, 6, 9]  # a mid-block module computes only at full calls
    assert [t for t in range(10) if bool(s.keep[t].all())] == [0, 3, 6, 9]
    assert s.keep[1].tolist() == g.deepcache_keep(2)
    assert torch.equal(deepcache(sd, 10, 3, skip=4).keep[1], torch.tensor(skip_keep(g, 4)))
    nu = deepcache(sd, 50, 5, 0, uniform=False, center=15, power=1.4)
    fulls = [t for t in range(50) if bool(nu.keep[t].all())]
    assert len(fulls) == 10 and fulls[0] == 0
    gaps = [b - a for a, b in zip(fulls, fulls[1:])]
    assert min(gaps) < 5 < max(gaps)  # denser around the centre, sparser away from it
    with pytest.raises(ValueError, match="UNet"):
        deepcache(tiny_dit(), 10, 3, 0)
    with pytest.raises(ValueError, match="out of range"):
        deepcache(sd, 10, 3, 12)
    with pytest.raises(ValueError, match="interval"):
        deepcache(sd, 10, 0, 0)


def test_skip_steps_placements(sd):
    s = skip_steps(sd, 50, count=10)
    assert s.computed_calls() == list(range(0, 50, 5))
    p = skip_steps(sd, 50, count=10, placement="power", exponent=1.5)
    calls = p.computed_calls()
    assert len(calls) == 10 and calls[0] == 0 and calls == sorted(set(calls))
    assert calls[:3] == [0, 1, 4]  # floor(50 * (i/10)^1.5): early-dense
    e = skip_steps(sd, 50, compute=[13, 19, 20])
    assert e.computed_calls() == [0, 13, 19, 20]
    assert e.macs_kept == pytest.approx((4 * e.graph.total_macs + 46 * e.graph.overhead_macs) / (50 * e.graph.total_macs))
    with pytest.raises(ValueError, match="either"):
        skip_steps(sd, 10)
    with pytest.raises(ValueError, match="out of range"):
        skip_steps(sd, 10, compute=[10])
    with pytest.raises(ValueError, match="placement"):
        skip_steps(sd, 10, count=3, placement="log")


@pytest.mark.parametrize("seed", range(5))
def test_skip_steps_lead_placement(sd, seed):
    """placement="lead": the first `lead` calls, the rest centred in equal parts of the
    remaining calls (cache-dit's static masks); `lead` kept in params, bad leads named."""
    rng = random.Random(seed)
    calls = rng.randint(8, 60)
    count = rng.randint(2, calls // 2)
    lead = rng.randint(1, count - 1)
    s = skip_steps(sd, calls, count=count, placement="lead", lead=lead)
    comp = s.computed_calls()
    assert comp[:lead] == list(range(lead)) and len(comp) == count == len(set(comp))
    width = (calls - lead) / (count - lead)
    for i, t in enumerate(comp[lead:]):  # the i-th of the rest sits mid-way in its equal part
        assert lead + i * width <= t < lead + (i + 1) * width
    assert s.params["lead"] == lead and s.params["placement"] == "lead"
    assert skip_steps(sd, 50, count=10, placement="lead").computed_calls()[:3] == [0, 1, 5]  # lead 10 // 5 = 2, then 2 + 48 / 8 / 2
    assert "lead" not in skip_steps(sd, 50, count=10).params  # earlier schedules' params unchanged
    for bad in (0, count + 1, 1.5):
        with pytest.raises(ValueError, match="lead"):
            skip_steps(sd, calls, count=count, placement="lead", lead=bad)
    with pytest.raises(ValueError, match="lead"):
        skip_steps(sd, calls, count=count, lead=1)


def test_fora_builder():
    d = tiny_dit()
    s = fora(d, 9, 3)
    assert s.computed_calls() == [0, 3, 6]
    assert all(m == READ for t in (1, 2) for m in s.modes[t])  # transformer blocks are read, never dead
    with pytest.raises(ValueError, match="UNet"):
        fora(tiny_unet2d(), 9, 3)


def test_from_scores_threshold_descent(sd):
    g = block_graph(sd, "coarse")
    calls = 8
    scores = torch.zeros(calls, len(g))
    scores[:, -1] = torch.tensor([0.99, 0.99, 0.2, 0.99, 0.97, 0.9, 0.1, 0.99])  # whole-call reuse candidates
    s = from_scores(sd, scores, target_macs=0.6)
    assert s.macs_kept <= 0.6
    reused = [t for t in range(calls) if not s.keep[t, -1]]
    # the most confident calls go first; call 0 never
    assert 0 not in reused and set(reused) <= {1, 3, 4, 5, 7}
    # a higher budget reuses a subset
    s2 = from_scores(sd, scores, target_macs=0.9)
    assert set(t for t in range(calls) if not s2.keep[t, -1]) <= set(reused)
    # reaching a budget below what the scores allow lowers the threshold down to 0
    s3 = from_scores(sd, torch.full((calls, len(g)), 0.5), target_macs=0.3)
    assert s3.macs_kept <= 0.3
    with pytest.raises(ValueError, match="probabilities"):
        from_scores(sd, scores * 2, 0.5)
    with pytest.raises(ValueError, match="target_macs"):
        from_scores(sd, scores, 0)


def test_from_scores_slack_lands_within_the_window(sd):
    # without slack the last reuse may take a whole cascade and land far below the target;
    # with it, reuses that would leave the window are passed over for smaller ones
    g = block_graph(sd, "coarse")
    gen = torch.Generator().manual_seed(1)
    plain_misses = 0
    for target in (0.25, 0.35, 0.5, 0.65):
        scores = torch.rand(12, len(g), generator=gen)
        plain = from_scores(sd, scores, target)
        fitted = from_scores(sd, scores, target, slack=0.01)
        assert target * 0.99 - 1e-9 <= fitted.macs_kept <= target + 1e-9
        assert fitted.params["slack"] == 0.01 and not fitted.keep[0].logical_not().any()
        plain_misses += plain.macs_kept < target * 0.99
    assert plain_misses > 0  # the case the option exists for does occur on these scores
    with pytest.raises(ValueError, match="slack"):
        from_scores(sd, scores, 0.5, slack=1.5)


def test_from_ranking_meets_the_budget_by_rank(sd):
    g = block_graph(sd, "coarse")
    calls = 9
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    scores = torch.rand(calls, len(g), generator=gen)
    smallest = min(g.block_macs) / (calls * g.total_macs)
    for target in [0.95, 0.7, 0.45]:
        s = from_ranking(sd, scores, target)
        # met, and by at most what the last reuse saved (its cascade included): not overshot by more
        assert s.macs_kept <= target + 1e-12
        assert s.keep[0].all()
    # whole calls scored highest go first, most confident first
    scores = torch.zeros(calls, len(g))
    scores[[2, 5, 7]] = torch.tensor([0.5, 0.9, 0.7]).view(3, 1)
    one_call = (g.total_macs - g.overhead_macs) / (calls * g.total_macs)
    s = from_ranking(sd, scores, 1 - 2 * one_call + smallest / 2)
    reused_calls = [t for t in range(calls) if not s.keep[t].any()]
    assert reused_calls == [5, 7]
    assert s.keep[[t for t in range(calls) if t not in (5, 7)]].all()
    with pytest.raises(ValueError, match="finite"):
        from_ranking(sd, torch.full((calls, len(g)), float("nan")), 0.5)
    with pytest.raises(ValueError, match=r"scores must be \[calls"):
        from_ranking(sd, scores[:, :-1], 0.5)
    with pytest.raises(ValueError, match="target_macs"):
        from_ranking(sd, scores, 1.5)


def test_json_roundtrip_and_validation(sd, tmp_path):
    s = deepcache(sd, 12, 3, 5)
    p = s.save(tmp_path / "s.json")
    t = Schedule.load(p, model=sd, calls=12)
    assert t == s and t.name == "deepcache" and t.params["interval"] == 3 and t.macs_kept == s.macs_kept
    d = json.loads(p.read_text())
    assert d["model_class"] == "UNet2DConditionModel" and len(d["keep"]) == 12
    with pytest.raises(ValueError, match="DiTTransformer2DModel"):
        s.validate(tiny_dit())
    other = tiny_sd15_unet()
    other_cfg = dict(other.config)
    shallow = UNet2DConditionModel.from_config({**other_cfg, "layers_per_block": 1})
    with pytest.raises(ValueError, match="blocks do not match"):
        s.validate(shallow)
    with pytest.raises(ValueError, match="resize"):
        Schedule.load(p, model=sd, calls=25)
    bad = dict(d, keep=d["keep"][:-1])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="calls=12 but 11"):
        Schedule.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        Schedule.load(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="not a schedule"):
        Schedule.from_dict({"keep": []})


def test_resize(sd):
    s = deepcache(sd, 50, 3, 0)
    r = s.resize(25)
    assert r.calls == 25 and r.computed_calls(0) == list(range(0, 25, 3))
    e = skip_steps(sd, 50, compute=[10, 20, 40])
    assert e.resize(25).computed_calls() == [0, 5, 10, 20]
    custom = Schedule(e.keep, e.graph)  # no builder, whole calls: the same share, the same density
    rc = custom.resize(99)  # 4 of 50 -> 8 of 99: each reuse segment (0-10, 10-20, 20-40, 40-50) split in two
    assert rc.calls == 99 and bool(rc.keep[0].all())
    assert rc.computed_calls() == [0, 10, 20, 30, 40, 59, 79, 89]  # 0, 5, ..., 45 of 50, scaled by 99/50
    assert custom.resize(20).computed_calls() == [0, 8]  # 4 of 50 -> 2 of 20: segments merged in pairs
    early = Schedule(skip_steps(sd, 50, compute=[0, 1, 2, 3, 4, 5, 30, 49]).keep, e.graph).resize(25)
    assert early.computed_calls() == [0, 1, 2, 15]  # 8 of 50 -> 4 of 25: calls 0, 2, 4, 30, still early-dense
    uniform = Schedule(skip_steps(sd, 50, count=10).keep, e.graph)
    assert uniform.resize(25).computed_calls() == [0, 5, 10, 15, 20]  # uniform stays uniform
    up = Schedule(skip_steps(sd, 3, compute=[0, 1]).keep, e.graph).resize(7)
    assert up.computed_calls() == [0, 1, 2, 3, 5]  # 0, 0.4, 0.8, 1.4, 2.2 of 3, scaled by 7/3
    dc = deepcache(sd, 50, 3, 0)
    partial = Schedule(dc.keep, dc.graph).resize(20)  # every kind of row keeps its share
    assert partial.calls == 20 and bool(partial.keep[0].all())
    assert len(partial.computed_calls(dc.graph.names[0])) == 7 and abs(partial.macs_kept - dc.macs_kept) < 0.03
    # whole calls and partial rows of one pattern: each kind keeps its density, whole calls first
    keep = torch.zeros(50, len(dc.graph), dtype=torch.bool)
    keep[list(range(0, 50, 5))] = True
    pattern = dc.keep[1]
    keep[[2, 12, 22, 32, 42, 47]] = pattern
    mixed = Schedule(keep, dc.graph).resize(25)
    whole = [c for c in range(25) if bool(mixed.keep[c].all())]
    rows = [c for c in range(25) if bool(mixed.keep[c].any()) and c not in whole]
    assert whole == [0, 5, 10, 15, 20]
    assert rows == [1, 11, 21] and all(torch.equal(mixed.keep[c], pattern) for c in rows)  # 2, 22, 42 halved


def test_resize_keeps_the_nearest_mac_share_and_breaks_ties_for_whole_calls(sd):
    """9 whole calls and 3 partial rows of 50, halved: rounding each kind on its own (4 or 5 whole,
    1 or 2 partial) misses the share; 5 + 0 and 4 + 3 are nearer, and equally near."""
    dc = deepcache(sd, 50, 3, 0)
    pattern = dc.keep[1]
    share = pattern.float() @ torch.tensor(dc.graph.block_macs, dtype=torch.float) / sum(dc.graph.block_macs)
    assert share < 1 / 3  # the premise: (5, 0) and (4, 3) are the nearest counts
    keep = torch.zeros(50, len(dc.graph), dtype=torch.bool)
    keep[[0, 4, 7, 11, 16, 22, 29, 38, 45]] = True
    keep[[1, 2, 9]] = pattern
    s = Schedule(keep, dc.graph)

    def share_of(whole: int, partial: int) -> float:
        k = torch.zeros(25, len(dc.graph), dtype=torch.bool)
        k[:whole] = True
        k[whole:whole + partial] = pattern
        return Schedule(k, dc.graph).macs_kept

    r = s.resize(25)
    whole = sum(bool(r.keep[c].all()) for c in range(25))
    partial = sum(bool(r.keep[c].any()) and not bool(r.keep[c].all()) for c in range(25))
    assert (whole, partial) == (5, 0)
    error = abs(r.macs_kept - s.macs_kept)
    assert all(error <= abs(share_of(w, p) - s.macs_kept) + 1e-9 for w in (3, 4, 5, 6) for p in (0, 1, 2, 3))
    assert error < min(abs(share_of(w, p) - s.macs_kept) for w in (4, 5) for p in (1, 2)) - 1e-3


def test_summary_cache_memory_and_plot(sd, tmp_path):
    s = deepcache(sd, 6, 2, 0)
    txt = s.summary(sample_shape=(2, 4, 16, 16))
    assert "MACs kept" in txt and "ideal speedup" in txt and "cache:" in txt and "#" in txt
    g = s.graph
    b = s.cached_blocks
    per_item = sum(g.blocks[i].output_numel() for i in b) // g.blocks[0].output_shapes[0][0]
    assert s.cache_bytes((2, 4, 16, 16)) == 2 * per_item * 4
    assert s.cache_bytes((2, 4, 32, 32), torch.float16) == 4 * per_item * 4
    d = s.to_dict()
    assert schedule_modes(d).tolist() == [list(row) for row in s.modes]  # the JSON carries the modes
    assert {COMPUTE, READ, DEAD} <= {m for row in s.modes for m in row}
    old = {k: v for k, v in d.items() if k != "modes"}  # JSON from before the modes: compute or read
    assert schedule_modes(old).tolist() == [[COMPUTE if k else READ for k in row] for row in s.keep.tolist()]
    for i, doc in enumerate((d, old)):
        out = schedule_map(doc, tmp_path / f"map{i}.png")
        assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
