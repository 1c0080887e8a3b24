"""The `make bench` sections (bench/sections, imported as the package `bench` from the repository
root): the SDO section's settings run its parts (FULL=1 runs the LoRA part, which no quick run
reaches), and the GPU section's parts on tiny versions of the architectures on the CPU."""
from __future__ import annotations

import time

import pytest
import torch

from bench.sections import gpu as gpu_section
from bench.sections import sdo as sdo_section


def test_finetune_protocol_tunes_on_its_own_seed_and_reports_every_seed(one_thread):
    args = sdo_section.settings(full=True)
    assert args.ft_tune_seed not in range(args.seed, args.seed + args.ft_seeds)  # tuning is never reported
    baseline, sdo_method = args.methods[0], args.methods[1]
    assert baseline == sdo_section.PLAIN_FULL and "+deepcache:" in sdo_method  # the stronger baseline, the chain
    args.steps, args.batch, args.ft_iters, args.eval_every, args.ft_seeds, args.ft_max_iters = 2, 2, 1, 1, 2, 3
    args.methods, args.lrs = [baseline, sdo_method], [1e-3, 1e-2]
    out = sdo_section.finetune(args)
    assert {r["seed"] for r in out["tuning"]} == {args.ft_tune_seed} and len(out["tuning"]) == 4
    assert [(r["method"], r["seed"]) for r in out["rows"]] == [(m, s) for s in (0, 1) for m in args.methods]
    for m, summary in out["summary"].items():
        tuned = max((r for r in out["tuning"] if r["method"] == m), key=lambda r: r["final"])
        assert summary["lr"] == tuned["lr"] and all(r["lr"] == tuned["lr"] for r in out["rows"] if r["method"] == m)
        assert len(summary["fraction_of_baseline_per_level"]) == len(args.ft_levels) + 1
    for seed in (0, 1):
        base = next(r for r in out["runs"] if r["seed"] == seed and r["method"] == baseline)
        assert base["iterations"] <= args.ft_max_iters
        row = next(r for r in out["rows"] if r["seed"] == seed and r["method"] == baseline)
        assert row["levels"][-1] == base["best"] and row["fraction_of_baseline"][-1] == 1.0
        for r in out["rows"]:
            assert 0.0 <= r["samples"]["judged_target_fraction"] <= 1.0 and r["samples"]["fd_to_real_digit"] >= 0


@pytest.mark.parametrize("rewards, stops", [([-1.0, -0.5, -0.3, -0.29, -0.3, -0.31], True),
                                            ([-1.0, -0.5, -0.3, -0.2, -0.1, -0.05], False),
                                            ([-1.0, -1.0, -1.0], False)])
def test_plateau_rule(rewards, stops):
    # window 3, 5%: the last three evaluations must beat the best before them by 5% of its size
    assert sdo_section.plateaued(rewards, 3, 0.05) is stops
# ---- the GPU section's parts, on tiny versions of the architectures on the CPU ------------

TINY_SD = {"block_out_channels": [16, 16, 32, 32], "cross_attention_dim": 16, "norm_num_groups": 8,
           "attention_head_dim": 4, "sample_size": 16}
TINY_SDXL = {"block_out_channels": [16, 16, 32], "cross_attention_dim": 16, "norm_num_groups": 8,
             "attention_head_dim": [2, 2, 4], "transformer_layers_per_block": [1, 1, 1], "sample_size": 16,
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 16 + 6 * 8}
TINY_DIT = {"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 8, "sample_size": 8, "in_channels": 4,
            "out_channels": 8}


def test_gpu_section_schedule_rows_with_the_deepcache_package(one_thread):
    rows = gpu_section.model_rows("sd-1.5", 16, reps=1, dtype=torch.float32, device="cpu", overrides=TINY_SD, calls=6)
    ours = {r["schedule"]: r for r in rows if r["by"] == "ours"}
    assert set(ours) == {"deepcache(3,0)", "deepcache(5,0)", "skip_steps(10,power1.5)"}
    package = [r for r in rows if r["by"] == "DeepCache package"]
    assert {r["schedule"] for r in package} == {"deepcache(3,0)", "deepcache(5,0)"}
    for r in package:  # the package's helper computes what our schedule computes
        assert r["rel_diff_to_ours"] <= 1e-5 and r["macs_kept"] == ours[r["schedule"]]["macs_kept"] < 1
    assert all(r["finite"] and r["speedup"] > 0 and r["full_s"] > 0 for r in rows)


@pytest.mark.parametrize("name,overrides", [("sdxl", TINY_SDXL), ("dit-xl-2", TINY_DIT)])
def test_gpu_section_sdxl_and_dit_rows(name, overrides, one_thread):
    rows = gpu_section.model_rows(name, 8, reps=1, dtype=torch.float32, device="cpu", overrides=overrides, calls=6)
    kinds = {r["schedule"].split("(")[0] for r in rows if r["by"] == "ours"}
    assert kinds == ({"deepcache", "skip_steps"} if name == "sdxl" else {"fora", "skip_steps"})
    assert all(r["finite"] and 0 < r["macs_kept"] < 1 for r in rows)


def test_gpu_section_sdo_cost_rows(one_thread):
    doc = gpu_section.sdo_rows("sd-1.5", 16, rounds=1, dtype=torch.float32, device="cpu", overrides=TINY_SD, calls=8)
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"full", sdo_section.PLAIN_FULL, "sdo", "sdo+deepcache(3,0)", "sdo+deepcache(5,0)"}
    assert rows["full"]["full_over_this"] == 1.0 and rows["sdo"]["chain_macs_kept"] == 1.0
    assert rows["sdo+deepcache(5,0)"]["chain_macs_kept"] < rows["sdo+deepcache(3,0)"]["chain_macs_kept"] < 1
    assert all(r["grad_finite"] and r["seconds"] > 0 for r in rows.values())


def test_gpu_section_sdo_records_exact_backprop_that_does_not_fit(one_thread, monkeypatch):
    from shortcut_kernels import sdo

    real = sdo.shortcut_sample

    def without_room(fn, sched, x, config, **kw):
        if config.policy.kind == "full" and not config.checkpoint:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(fn, sched, x, config, **kw)

    monkeypatch.setattr(sdo, "shortcut_sample", without_room)
    doc = gpu_section.sdo_rows("sd-1.5", 16, rounds=1, dtype=torch.float32, device="cpu", overrides=TINY_SD, calls=4)
    rows = {r["method"]: r for r in doc["rows"]}
    assert rows[sdo_section.PLAIN_FULL] == {"method": sdo_section.PLAIN_FULL, "policy": "full", "fits_in_memory": False}
    assert rows["full"]["seconds"] > 0 and rows["sdo"]["grad_finite"]


def test_gpu_section_compile_rows(one_thread):
    rows = gpu_section.compile_rows("sd-1.5", 16, reps=1, dtype=torch.float32, device="cpu", overrides=TINY_SD,
                                    calls=4, backend="eager")
    assert [r["variant"] for r in rows] == ["compile(full)", "compile(deepcache(5,0))"]
    assert rows[0]["speedup_over_compiled_full"] == 1.0 and rows[1]["macs_kept"] < 1


def test_gpu_section_deadline_leaves_notes(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a GPU")
    monkeypatch.setenv("SHORTCUT_BENCH_DEADLINE", str(time.time() + 5))
    doc = gpu_section.run(tmp_path, full=True)  # FULL tries every part
    assert doc["rows"] == [] and doc["sdo"] is None
    assert len(doc["notes"]) == len(gpu_section.PART_SECONDS) and all("not run" in n for n in doc["notes"])


def test_gpu_section_own_budget_without_full(monkeypatch, tmp_path):
    """make bench (not FULL): parts that would start past the section's budget leave notes,
    with no SHORTCUT_BENCH_DEADLINE set; FULL has no budget of its own."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a GPU")
    monkeypatch.delenv("SHORTCUT_BENCH_DEADLINE", raising=False)
    monkeypatch.delenv("SHORTCUT_GPU_PARTS", raising=False)
    monkeypatch.setattr(gpu_section, "BUDGET_S", 1)
    doc = gpu_section.run(tmp_path)
    assert len(doc["notes"]) == len(gpu_section.PART_SECONDS) - 1  # cuda-graphs is FULL's
    assert all("not run" in n and "1 s" in n for n in doc["notes"])
    assert gpu_section.seconds_left(None) == float("inf")


def test_gpu_section_parts_chosen_by_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SHORTCUT_GPU_PARTS", raising=False)
    assert "cuda-graphs" not in gpu_section.selected_parts(full=False)
    assert gpu_section.selected_parts(full=True) == list(gpu_section.PART_SECONDS)
    monkeypatch.setenv("SHORTCUT_GPU_PARTS", "cuda-graphs, compile")
    assert gpu_section.selected_parts(full=False) == ["cuda-graphs", "compile"]  # in the order given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a GPU")
    monkeypatch.setenv("SHORTCUT_BENCH_DEADLINE", str(time.time() + 5))
    doc = gpu_section.run(tmp_path)
    assert [n.split(":")[0] for n in doc["notes"]] == ["cuda-graphs", "compile"]
    monkeypatch.setenv("SHORTCUT_GPU_PARTS", "compile,sd15")
    with pytest.raises(ValueError, match="unknown part.*sd15"):
        gpu_section.selected_parts(full=False)
