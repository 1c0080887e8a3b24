"""shortcut_kernels.report: report.md and the plots from section JSON shaped like what
`make bench` (bench/run.py) writes. The numbers are made up here and looked for in the report."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from shortcut_kernels.cli import main
from shortcut_kernels.runtime.schedule import Schedule
from shortcut_kernels.models.graph import EXTERNAL, BlockGraph

rng = random.Random(0)


def r2(lo, hi):  # values with two decimals: their formatting in the report is unambiguous
    return round(rng.uniform(lo, hi), 2)


def spread(lo, hi):  # a median [min, max] over three seeds, as bench.sections.sdo.spread writes it
    lo_, mid, hi_ = sorted(r2(lo, hi) for _ in range(3))
    return {"median": mid, "min": lo_, "max": hi_, "missing": 0}


def images(n):
    return [[[rng.randrange(256) for _ in range(16)] for _ in range(16)] for _ in range(n)]


def schedule_dict(calls=6):
    """A learned-schedule JSON (Schedule.to_dict) over a made-up 4-block residual chain."""
    n = 4
    graph = BlockGraph.from_dict({"model_class": "DiTTransformer2DModel", "granularity": "fine", "total_macs": 1000,
                                  "input_shapes": {}, "blocks": [
                                      {"name": f"transformer_blocks.{i}", "module_paths": [f"transformer_blocks.{i}"],
                                       "macs": 200, "consumers": [i + 1] if i < n - 1 else [EXTERNAL],
                                       "producers": [i - 1] if i else [], "residual": True, "stage": "chain"}
                                      for i in range(n)]})
    keep = [[1] * n] + [[rng.random() < 0.5 for _ in range(n)] for _ in range(calls - 1)]
    return Schedule(keep, graph, name="from_scores").to_dict()


def op_rows():
    rows = []
    for op, size in [("gated_blend", "(2, 320, 64, 64)"), ("guided_step", "(2, 4096, 1152)")]:
        t = {"eager": r2(100, 900) * 1e-6, "compile": r2(50, 400) * 1e-6, "cpu": r2(20, 300) * 1e-6}
        for p, s in t.items():
            rows.append(dict(op=op, mode="fwd", size=size, dtype="float32", provider=p, median_s=s, p20_s=s,
                             p80_s=s, rounds=20, gb_per_s=r2(1, 50), device="x86_64 (2 threads)", threads=2,
                             speedup_vs_eager=t["eager"] / s, speedup_vs_compile=t["compile"] / s, pct_of_copy=None))
    return rows


def sections():
    env = {"date_utc": "2031-02-03 04:05:06 UTC", "machine": "Linux x86_64", "cpu": "Test CPU 9000", "cores": 2,
           "torch_threads": 2, "gpu": None, "cuda": None, "python": "3.11.7", "torch": "2.99.0",
           "diffusers": "0.99.1", "shortcut_kernels": "0.1.0", "commit": "abc1234", "full": False}
    eff = [dict(model="zoo-unet", schedule=f"deepcache({i},0)", calls=12, batch_per_call=40, threads=1, reps=2,
                macs_kept=r2(0.2, 0.6), mac_ideal=r2(1.5, 4), full_s=r2(2, 4), ours_s=r2(0.5, 1.5), speedup=r2(1.5, 4),
                fraction_of_ideal=r2(0.5, 1.2), package_s=r2(0.5, 1.5), package_speedup=r2(1.5, 4))
           for i in (3, 5)]
    learned, dc, ss, found = "learned(shortcut)", "deepcache(10,skip=1)", "skip_steps(7,power1.5)", "searched"
    macs = {learned: r2(0.34, 0.36), found: r2(0.34, 0.36), dc: r2(0.34, 0.36), ss: r2(0.34, 0.36)}
    quality = [dict(model="digits-unet", schedule=k, calls=20, macs_kept=m, ideal_speedup=1 / m,
                    class_accuracy=r2(0.8, 1), digits_fd=r2(1, 3), psnr_vs_full=r2(20, 40), seconds=r2(1, 9),
                    n_samples=100) for k, m in macs.items()]
    quality.append(dict(model="digits-unet", schedule="full", calls=20, macs_kept=1.0, ideal_speedup=1.0,
                        class_accuracy=r2(0.9, 1), digits_fd=r2(1, 2), psnr_vs_full=float("inf"),
                        seconds=float("nan"), n_samples=100))
    timing = [dict(model="zoo-unet", schedule=k, calls=20, batch_per_call=40, threads=1, reps=3, macs_kept=m,
                   mac_ideal=1 / m, full_s=r2(2, 3), ours_s=r2(0.5, 1.5), speedup=r2(1.5, 3.5),
                   fraction_of_ideal=r2(0.6, 1.1)) for k, m in macs.items()]
    history = [dict(iteration=i + 1, consistency=r2(0.01, 0.1), sparsity=r2(0, 1), kept_macs=r2(0.2, 1),
                    seconds=1.5 * (i + 1)) for i in range(12)]
    learn = {"section": "dipgo-learn", "wall_s": 300.0, "budget_s": 390, "model": "digits-unet", "calls": 6,
             "learned": learned, "searched": found, "deepcache": dc, "skip_steps": ss,
             "search": {"start": ss, "time_budget_s": 60.0, "seconds": r2(50, 60), "evaluations": 97, "moves": 5,
                        "bank_samples": 20, "bank_psnr_start": r2(30, 35), "bank_psnr": r2(35, 38)},
             "train": {"settings": dict(mode="shortcut", target=0.35, iters=100, batch_size=8, bank_size=64,
                                        optimizer="sgd", lr=0.2, sparsity_weight=10.0),
                       "time_budget_s": 150.0, "iterations": 12, "train_seconds": 18.0, "wall_s": 30.0,
                       "history": history},
             "equal_macs": {"macs_kept": macs, "max_relative_gap": max(macs.values()) / min(macs.values()) - 1,
                            "tolerance": 0.02, "holds": True},
             "schedules": {learned: schedule_dict()}, "quality": quality, "timing": timing,
             "samples": {"labels": list(range(10)), "full": images(10), learned: images(10), dc: images(10),
                         ss: images(10)}}
    methods = ["full", "draft:1", "alignprop", "first"]
    sdo = {"section": "sdo", "wall_s": 200.0, "budget_s": 360, "steps": 20, "batch": 4, "target": 7, "threads": 1,
           "methods": methods,
           "fidelity": {"rows": [dict(policy=m, cos_xT=r2(0, 1), cos_lora=r2(0, 1), seconds=r2(0.1, 2))
                                 for m in methods + ["random"]]},
           "cost": {m: {"median_s": r2(0.2, 2), "min_s": 0.1, "rounds": 2} for m in methods},
           "memory": {m: {"base_kib": 1000, "peak_kib": 2000, "delta_mib": r2(5, 80)} for m in ["one_call"] + methods},
           "curves": {"budget_s": 20.0, "optimizer": rng.choice(["normalized", "adam"]), "lr": r2(0.1, 0.3),
                      "before": {"reward": r2(-5, -1), "target_fraction": 0.25},
                      "methods": {m: {"iterations": rng.randrange(5, 40), "reward_final": r2(-1, 0),
                                      "target_fraction": 0.75,
                                      "curve": [{"seconds": 2.0 * i, "reward_mean": r2(-5, 0)} for i in range(8)]}
                                  for m in methods},
                      "samples": {"before": images(4), **{m: images(4) for m in methods}}},
           "finetune": {"runs": [{"method": m, "lr": 0.003, "final": r2(-3, 0), "iterations": 150 - 10 * k,
                                  "eval": [{"seconds": 3.0 * i, "reward_mean": r2(-5, 0)} for i in range(5)]}
                                 for m in methods for k in range(3)],
                        "plateau": {"window": 4, "tol": 0.05, "max_iters": 150},
                        "baseline": "full", "tune_seed": 100, "seeds": [0, 1, 2], "budget_fraction": 0.4,
                        "target": 7, "levels": [-0.1, -0.03, -0.01, "baseline's plateau"],
                        "untuned_samples": {"fd_to_real_digit": r2(1, 9), "spread_over_real": r2(0.5, 1.5)},
                        "summary": {m: {"lr": 0.003, "final": spread(-3, 0),
                                        "fraction_of_baseline_per_level": [spread(0.05, 1) for _ in range(4)],
                                        **{k: spread(0, 1) for k in ("reward_cnn_target_fraction",
                                                                     "judged_target_fraction",
                                                                     "judged_target_fraction_cnn",
                                                                     "fd_to_real_digit", "spread_over_real")}}
                                    for m in methods}}}
    return env, {
        "ops": {"section": "ops", "wall_s": 150.0, "budget_s": 180, "selection": "real sizes", "rows": op_rows()},
        "dipgo": {"section": "dipgo", "wall_s": 80.0, "budget_s": 90, "calls": 12, "rows": eff},
        "dipgo-learn": learn, "sdo": sdo,
        "gpu": {"section": "gpu", "wall_s": 0.0, "budget_s": None, "skipped": "no CUDA device visible in this test"},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_run")
    env, docs = sections()
    (d / "environment.json").write_text(json.dumps(env))
    for name, doc in docs.items():
        (d / f"{name}.json").write_text(json.dumps(doc))
    assert main(["report", str(d)]) == 0  # the `shortcut-kernels report DIR` command
    return d, env, docs, (d / "report.md").read_text()


def test_report_has_machine_and_every_number(built):
    _, env, docs, md = built
    for key in ("date_utc", "cpu", "torch", "diffusers", "python", "commit"):
        assert env[key] in md
    expect = []
    for r in docs["ops"]["rows"]:
        expect.append(f"{r['median_s'] * 1e6:.1f}")
        if r["provider"] == "cpu":
            expect += [f"{r['speedup_vs_eager']:.2f}", f"{r['speedup_vs_compile']:.2f}"]
    for r in docs["dipgo"]["rows"]:
        expect += [f"{r['speedup']:.2f}", f"{r['mac_ideal']:.2f}", f"{100 * r['macs_kept']:.1f}%",
                   f"{r['package_speedup']:.2f}", f"{r['ours_s']:.3f}"]
    learn = docs["dipgo-learn"]
    for r in learn["quality"]:
        expect += [f"{r['digits_fd']:.2f}", f"{100 * r['class_accuracy']:.1f}%"]
        if r["schedule"] != "full":
            expect += [f"{r['psnr_vs_full']:.2f}", f"{100 * r['macs_kept']:.2f}%"]
    for r in learn["timing"]:
        expect += [f"{r['speedup']:.2f}", f"{r['ours_s']:.3f}"]
    expect += [f"{100 * learn['equal_macs']['max_relative_gap']:.2f}%", f"{learn['train']['iterations']} iterations"]
    sdo = docs["sdo"]
    for m in sdo["methods"]:
        expect += [f"{sdo['cost'][m]['median_s']:.3f}", f"{sdo['memory'][m]['delta_mib']:.1f}",
                   f"{sdo['curves']['methods'][m]['reward_final']:.2f}",
                   f"{sdo['cost']['full']['median_s'] / sdo['cost'][m]['median_s']:.2f}"]
    for r in sdo["fidelity"]["rows"]:
        expect += [f"{r['cos_xT']:.3f}", f"{r['cos_lora']:.3f}"]
    step = {"normalized": "normalised steps", "adam": "Adam"}[sdo["curves"]["optimizer"]]
    expect.append(f"({step}, lr {sdo['curves']['lr']:g})")
    for b in sdo["finetune"]["summary"].values():
        expect += [f"{b['final']['median']:.4f}", f"{b['final']['max']:.4f}", f"{b['fd_to_real_digit']['median']:.2f}"]
        expect += [f"{100 * sp['median']:.0f}%" for sp in b["fraction_of_baseline_per_level"]]
        expect += [f"{100 * b['judged_target_fraction']['min']:.0f}%"]
    missing = [e for e in expect if e not in md]
    assert not missing, f"numbers of the JSON missing from report.md: {missing}"
    assert docs["gpu"]["skipped"] in md  # the GPU section says why it did not run


def test_verdict_follows_the_numbers(built):
    _, _, docs, md = built
    learn = docs["dipgo-learn"]
    q = {r["schedule"]: r["psnr_vs_full"] for r in learn["quality"]}
    best = max(q[learn["deepcache"]], q[learn["skip_steps"]])
    for what in ("learned", "searched"):
        word = "ahead of" if q[learn[what]] > best else "behind"
        assert f"the {what} schedule is {abs(q[learn[what]] - best):.2f} dB {word} the best hand-made" in md


def test_every_plot_decodes_and_is_not_blank(built):
    import matplotlib.image

    d, _, _, md = built
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert {"speedup_vs_macs.png", "dipgo_samples.png", "learned_schedule.png", "sdo_reward_vs_time.png",
            "sdo_samples.png", "sdo_finetune.png", "dipgo_training.png"} <= set(linked)
    for name in linked:
        pixels = np.asarray(matplotlib.image.imread(d / name))
        assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50, name
        assert pixels[..., :3].std() > 0, f"{name} is blank"


def test_failed_section_is_reported(tmp_path):
    (tmp_path / "sdo.json").write_text(json.dumps({"section": "sdo", "wall_s": 1.0, "budget_s": 360,
                                                   "error": "Traceback ...\nRuntimeError: out of budget 42"}))
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "RuntimeError: out of budget 42" in md and "FAILED" in md


def test_gpu_op_rows_show_the_roofline(tmp_path):
    """On a GPU the ops section keeps a copy of the same bytes: ours in GB/s beside the copy's."""
    rows = []
    for p in ("eager", "compile", "cuda", "triton", "copy"):
        rows.append(dict(op="gated_blend", mode="fwd", size="(16, 1280, 64, 64)", dtype="bfloat16", provider=p,
                         median_s=r2(10, 90) * 1e-6, p20_s=1e-6, p80_s=2e-6, rounds=100, gb_per_s=r2(500, 4000),
                         device="GPU 1", threads=1, speedup_vs_eager=r2(1, 5), speedup_vs_compile=r2(0.5, 2),
                         pct_of_copy=r2(50, 99)))
    (tmp_path / "ops.json").write_text(json.dumps({"section": "ops", "wall_s": 1.0, "budget_s": None, "rows": rows}))
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    copy = rows[-1]
    for r in rows[2:4]:
        assert f"{r['gb_per_s']:.1f}" in md and f"{r['pct_of_copy']:.0f}" in md
    assert f"{copy['gb_per_s']:.1f}" in md and "GB/s copy" in md


def test_gpu_section_tables(tmp_path):
    """The GPU section: schedule rows (ours and the DeepCache package's), the SDO cost table and
    the parts the deadline left out, every number from the JSON."""
    row = lambda by, sched: dict(model="sd-1.5", schedule=sched, by=by, dtype="float16", calls=50,  # noqa: E731
                                 latent=64, reps=3, macs_kept=r2(0.2, 0.5), mac_ideal=r2(2, 5), full_s=r2(1, 2),
                                 ours_s=r2(0.3, 0.9), speedup=r2(1.5, 3.5), finite=True)
    rows = [row("ours", "deepcache(3,0)"), dict(row("DeepCache package", "deepcache(3,0)"), rel_diff_to_ours=0.0)]
    sdo = {"model": "sd-1.5", "dtype": "bfloat16", "batch": 1, "latent": 64, "calls": 50, "guidance": 7.5,
           "rounds": 2, "rows": [dict(method=m, policy="x", chain_macs_kept=r2(0.2, 1), seconds=r2(0.5, 9),
                                      full_over_this=r2(1, 13), peak_mib_over_weights=r2(400, 500), grad_finite=True)
                                 for m in ("full", "sdo+deepcache(5,0)")]}
    doc = {"section": "gpu", "wall_s": 1.0, "budget_s": None, "device": "GPU 1", "rows": rows, "sdo": sdo,
           "compile": [], "notes": ["compile: not run, 12 s left before SHORTCUT_BENCH_DEADLINE"]}
    (tmp_path / "gpu.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    for r in rows:
        assert f"| {r['by']} |" in md and f"{r['speedup']:.2f}" in md and f"{r['ours_s']:.3f}" in md
    for r in sdo["rows"]:
        assert f"| {r['method']} |" in md and f"{r['seconds']:.3f}" in md and f"{r['full_over_this']:.2f}" in md
    assert "compile: not run" in md


def test_gpu_section_with_compile_parts_only(tmp_path):
    """A lease that ran only the compile parts (SHORTCUT_GPU_PARTS): their rows, no empty
    schedule table."""
    crow = lambda variant: dict(model="sd-1.5", variant=variant, macs_kept=r2(0.2, 1), first_run_s=r2(20, 90),  # noqa: E731
                                seconds=r2(0.3, 2), eager_full_s=r2(1, 2), speedup_over_eager_full=r2(1, 5),
                                speedup_over_compiled_full=r2(1, 4))
    rows = [crow(v) for v in ("compile(full)", "compile(deepcache(5,0))", "compile[reduce-overhead](full)")]
    doc = {"section": "gpu", "wall_s": 1.0, "budget_s": None, "device": "GPU 1", "rows": [], "sdo": None,
           "compile": rows, "notes": []}
    (tmp_path / "gpu.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "measured x" not in md  # no schedule table without schedule rows
    for r in rows:
        assert f"| {r['variant']} |" in md and f"{r['first_run_s']:.1f}" in md and f"{r['seconds']:.3f}" in md


# ----------------------------------------------------------------------------- --headline and --results


def _bench_dir(tmp_path):
    env, docs = sections()
    d = tmp_path / "run"
    d.mkdir()
    (d / "environment.json").write_text(json.dumps(env))
    for name, doc in docs.items():
        (d / f"{name}.json").write_text(json.dumps(doc))
    return d, env, docs


def _row(md: str, start: str) -> str:
    rows = [line for line in md.splitlines() if line.startswith(f"| {start}")]
    assert len(rows) == 1, f"expected one row starting {start!r} in:\n{md}"
    return rows[0]


def test_headline_states_each_claim_beside_its_baseline_and_json(tmp_path, capsys):
    """`report DIR --headline`: one row per main claim, its numbers from the JSON, the baseline of
    the same run beside it, and the JSON file it comes from; report.md is not rebuilt."""
    d, env, docs = _bench_dir(tmp_path)
    assert main(["report", str(d), "--headline"]) == 0
    md = capsys.readouterr().out
    assert not (d / "report.md").exists()
    assert md.startswith("| what | result | against (same run) | measured on | JSON |")

    learn = docs["dipgo-learn"]
    q = {r["schedule"]: r for r in learn["quality"]}
    best = max((q[learn["deepcache"]], q[learn["skip_steps"]]), key=lambda r: r["psnr_vs_full"])
    for what in ("searched", "learned"):
        row = _row(md, f"DiP-GO {what} schedule")
        mine = q[learn[what]]
        assert f"{mine['psnr_vs_full']:.2f} dB" in row and f"{mine['psnr_vs_full'] - best['psnr_vs_full']:+.2f} dB" in row
        assert f"`{best['schedule']}`: {best['psnr_vs_full']:.2f} dB" in row and "`run/dipgo-learn.json`" in row

    eff = docs["dipgo"]["rows"]
    fastest = max(eff, key=lambda r: r["speedup"])
    row = _row(md, "DiP-GO schedule, zoo-unet")
    assert f"`{fastest['schedule']}`: {fastest['speedup']:.2f}x" in row and f"{fastest['mac_ideal']:.2f}x" in row
    assert f"package {fastest['package_speedup']:.2f}x" in row and "`run/dipgo.json`" in row

    sdo = docs["sdo"]
    cost = sdo["cost"]
    row = _row(md, "SDO gradient")
    assert f"`first`: {cost['first']['median_s']:.3f} s" in row  # the one SDO method of the synthetic run
    assert f"{cost['full']['median_s'] / cost['first']['median_s']:.2f}x faster" in row
    assert f"`full`): {cost['full']['median_s']:.3f} s" in row
    ft = {m: r["fraction_of_baseline_per_level"][2] for m, r in sdo["finetune"]["summary"].items() if m != "full"}
    quickest = min(ft, key=lambda m: ft[m]["median"])  # to the tightest fixed level, -0.01
    row = _row(md, "SDO LoRA fine-tuning")
    assert f"`{quickest}` reaches a held-out reward of -0.01 in {100 * ft[quickest]['median']:.0f}% of `full`'s time" in row
    assert f"{100 * ft[quickest]['min']:.0f}%-{100 * ft[quickest]['max']:.0f}%" in row
    assert "`full`'s final reward in 3 of 3 seeds" in row and "(1 of 3 seeds at the cap)" in row

    cpu = [r for r in docs["ops"]["rows"] if r["provider"] == "cpu"]
    row = _row(md, "fused ops, `cpu` kernels")
    faster = sum(r["speedup_vs_eager"] > 1 for r in cpu)
    assert f"faster than eager in {faster} of {len(cpu)} rows" in row and env["cpu"] not in row  # rows name the device
    assert cpu[0]["device"] in row and env["date_utc"][:10] in row
    assert "gpu.json" not in md  # a skipped section has no claim


def test_headline_reads_a_section_file_and_gpu_rows(tmp_path, capsys):
    """A section's JSON file alone is a source too (its `section` field names it); plain
    `report FILE` refuses it, since report.md needs a directory."""
    sdo_rows = [dict(method=m, policy="x", chain_macs_kept=1.0, seconds=s, full_over_this=8.0 / s,
                     peak_mib_over_weights=mib, grad_finite=True)
                for m, s, mib in (("full", 8.0, 474.25), ("sdo", 2.0, 468.5), ("sdo+deepcache(5,0)", 0.64, 468.5))]
    rows = [dict(model="sdxl", schedule=s, by=by, dtype="float16", calls=50, latent=128, reps=2, macs_kept=m,
                 mac_ideal=1 / m, full_s=3.93, ours_s=3.93 / x, speedup=x, finite=True)
            for s, by, m, x in (("deepcache(3,0)", "ours", 0.351, 2.72), ("deepcache(5,0)", "ours", 0.213, 4.42),
                                ("deepcache(5,0)", "DeepCache package", 0.213, 4.05))]
    f = tmp_path / "gpu-somewhere.json"
    f.write_text(json.dumps({"section": "gpu", "wall_s": 1.0, "budget_s": None, "device": "GPU 7", "rows": rows,
                             "sdo": {"model": "sd-1.5", "dtype": "bfloat16", "batch": 1, "latent": 64, "calls": 50,
                                     "guidance": 7.5, "rounds": 2, "rows": sdo_rows}, "compile": [], "notes": []}))
    assert main(["report", str(f), "--headline"]) == 0
    md = capsys.readouterr().out
    row = _row(md, "DiP-GO schedule, sdxl 128x128 float16, 50 calls")
    assert "`deepcache(5,0)`: 4.42x measured" in row and "the DeepCache package 4.05x" in row and "GPU 7" in row
    row = _row(md, "SDO gradient, sd-1.5 bfloat16")
    assert "`sdo+deepcache(5,0)`: 0.640 s, 12.50x faster" in row and "`full` (checkpointed): 8.000 s, 474 MiB" in row
    assert "`gpu-somewhere.json`" in row
    for plain, against in ((dict(seconds=6.4, full_over_this=1.25, peak_mib_over_weights=9000.0, grad_finite=True),
                            "`full, no checkpointing`: 6.400 s, 9000 MiB"),  # the faster exact baseline is quoted
                           (dict(fits_in_memory=False), "`full, no checkpointing` did not fit in memory")):
        doc = json.loads(f.read_text())
        doc["sdo"]["rows"].append(dict(method="full, no checkpointing", policy="full", **plain))
        f.write_text(json.dumps(doc))
        assert main(["report", str(f), "--headline"]) == 0
        row = _row(capsys.readouterr().out, "SDO gradient, sd-1.5 bfloat16")
        assert against in row
        assert ("10.00x faster" if "6.400" in against else "12.50x faster") in row
        doc["sdo"]["rows"].pop()
        f.write_text(json.dumps(doc))
    assert main(["report", str(f)]) == 2
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a section JSON"):
        main(["report", str(tmp_path / "other.json"), "--headline"])


def test_results_replaces_only_its_generated_part(tmp_path):
    """`--results FILE` writes every section's tables between its markers and keeps the text
    around them; run twice it gives the same file."""
    from shortcut_kernels.report.headline import RESULTS_BEGIN, RESULTS_END

    d, env, docs = _bench_dir(tmp_path)
    out = tmp_path / "results.md"
    out.write_text(f"# Results\n\nHand-written context.\n\n{RESULTS_BEGIN}\nstale table 123456\n{RESULTS_END}\n\n"
                   "## Older runs\n\nKept as written.\n")
    assert main(["report", str(d), "--results", str(out)]) == 0
    md = out.read_text()
    assert "stale table 123456" not in md
    assert md.startswith("# Results\n\nHand-written context.\n\n" + RESULTS_BEGIN)
    assert md.endswith(RESULTS_END + "\n\n## Older runs\n\nKept as written.\n")
    assert md.count(RESULTS_BEGIN) == 1 and md.count(RESULTS_END) == 1
    assert f"report {d} --results {out}" in md  # the command that regenerates it
    assert env["commit"] in md and env["cpu"] in md
    for r in docs["dipgo"]["rows"]:
        assert f"{r['speedup']:.2f}" in md and f"{r['ours_s']:.3f}" in md
    for r in docs["sdo"]["fidelity"]["rows"]:
        assert f"{r['cos_xT']:.3f}" in md
    assert docs["gpu"]["skipped"] in md
    assert "![" not in md  # no plots outside a results directory
    assert all(not line.startswith("# ") for line in md.splitlines()[1:])  # one title: the parts are demoted
    assert main(["report", str(d), "--results", str(out)]) == 0
    assert out.read_text() == md


def test_results_appends_to_a_file_without_markers(tmp_path):
    from shortcut_kernels.report.headline import RESULTS_BEGIN

    d, _, docs = _bench_dir(tmp_path)
    out = tmp_path / "notes.md"
    out.write_text("# Notes\n\nMine.\n")
    assert main(["report", str(d), "--results", str(out)]) == 0
    md = out.read_text()
    assert md.startswith("# Notes\n\nMine.\n\n" + RESULTS_BEGIN)
    new = tmp_path / "new.md"
    assert main(["report", str(d), "--results", str(new), "--headline"]) == 0
    assert new.read_text().startswith("# Results\n\n" + RESULTS_BEGIN)
    assert f"{docs['dipgo-learn']['train']['iterations']} iterations" in new.read_text()


def test_sdo_ratios_quote_the_faster_full_backprop(tmp_path, capsys):
    """With `full` both checkpointed and plain in the run, "x faster than full" and the headline
    divide by the faster of the two (the stronger baseline), and the memory ratio by the smaller
    peak; best-of-N rows (curves only) appear in the table."""
    d, env, docs = _bench_dir(tmp_path)
    sdo = docs["sdo"]
    plain = "full, no checkpointing"
    sdo["methods"] = ["full", plain] + [m for m in sdo["methods"] if m != "full"]
    sdo["cost"][plain] = {"median_s": sdo["cost"]["full"]["median_s"] / 1.6, "min_s": 0.1, "rounds": 2}
    sdo["memory"][plain] = {"base_kib": 1000, "peak_kib": 9000, "delta_mib": 3 * sdo["memory"]["full"]["delta_mib"]}
    curve = {"iterations": 12, "reward_final": -0.123, "target_fraction": 0.5,
             "curve": [{"seconds": 1.0, "reward_mean": -0.5}]}
    sdo["curves"]["methods"]["best-of-N"] = curve
    (d / "sdo.json").write_text(json.dumps(sdo))
    md = (d / "report.md").read_text() if main(["report", str(d)]) == 0 else ""
    fast = sdo["cost"][plain]["median_s"]
    row = next(line for line in md.splitlines() if line.startswith("| first |"))  # the method table comes first
    assert f"{fast / sdo['cost']['first']['median_s']:.2f}" in row
    assert f"{sdo['memory']['full']['delta_mib'] / sdo['memory']['first']['delta_mib']:.2f}" in row
    assert "-0.12" in _row(md, "best-of-N |")
    assert main(["report", str(d), "--headline"]) == 0
    head = _row(capsys.readouterr().out, "SDO gradient")
    assert f"{fast / sdo['cost']['first']['median_s']:.2f}x faster" in head and f"(`{plain}`)" in head
