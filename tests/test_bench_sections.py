"""The `make bench` sections (bench/sections, imported as the package `bench` from the repository
root): the SDO section's settings run its parts (FULL=1 runs the LoRA part, which no quick run
reaches), and the GPU section's parts on tiny versions of the architectures on the CPU."""
from __future__ import annotations

import time

import pytest
import torch

from bench.sections import gpu as gpu_section
from bench.sections import sdo as sdo_section


def test_full_sdo_settings_run_the_finetune_part(one_thread):
    args = sdo_section.settings(full=True)
    args.steps, args.batch, args.ft_iters, args.eval_every = 2, 2, 1, 1
    sdo_method = args.methods[0]  # the settings' own SDO run: importance draws, a cached chain
    assert "+deepcache:" in sdo_method
    args.methods, args.lrs = ["full", sdo_method], args.lrs[:1]
    out = sdo_section.finetune(args)
    assert [r["method"] for r in out["runs"]] == ["full", sdo_method]
    assert out["runs"][1]["chain_macs_kept"] < 1.0 and set(out["best"]) == {"full", sdo_method}


def test_finetune_part_pairs_extra_seeds_with_full_on_the_same_seed(one_thread):
    args = sdo_section.settings(full=True)
    args.steps, args.batch, args.ft_iters, args.eval_every, args.ft_seeds = 2, 2, 1, 1, 2
    args.methods, args.lrs = ["per-sample", "full"], [1e-3, 1e-2]
    out = sdo_section.finetune(args)
    grid, extra = out["runs"][:4], out["runs"][4:]
    assert [(r["method"], r["seed"]) for r in extra] == [("full", 1), ("per-sample", 1)]
    for m, b in out["best"].items():  # the extra seed reruns the grid's best lr
        assert extra[[r["method"] for r in extra].index(m)]["lr"] == b["lr"]
        assert [s["seed"] for s in b["seeds"]] == [0, 1] and 0 <= b["seeds_within_fifth"] <= 2
        assert b["seeds"][1]["full_final"] == extra[0]["final"]  # paired with full on seed 1
        assert b["seeds"][0]["full_final"] == max(r["final"] for r in grid if r["method"] == "full")
    assert out["best"]["full"]["seeds"][1]["fraction_of_full_time"] <= 1.0  # full reaches its own final


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
    assert set(rows) == {"full", "sdo", "sdo+deepcache(3,0)", "sdo+deepcache(5,0)"}
    assert rows["full"]["full_over_this"] == 1.0 and rows["sdo"]["chain_macs_kept"] == 1.0
    assert rows["sdo+deepcache(5,0)"]["chain_macs_kept"] < rows["sdo+deepcache(3,0)"]["chain_macs_kept"] < 1
    assert all(r["grad_finite"] and r["seconds"] > 0 for r in rows.values())


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
