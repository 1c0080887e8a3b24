"""`shortcut-kernels schedule ...` and `shortcut-kernels sample ...`."""
import json

import pytest
import torch

from shortcut_kernels.cli import main
from shortcut_kernels.dipgo import Schedule


pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread (see conftest)


def test_schedule_commands(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["schedule", "deepcache", "--model", "digits-unet", "--interval", "3", "-o", str(out)]) == 0
    s = Schedule.load(out)
    assert s.calls == 50 and s.name == "deepcache" and s.params["interval"] == 3
    assert "ideal speedup" in capsys.readouterr().out
    assert main(["schedule", "skip-steps", "--model", "digits-unet", "--calls", "20", "--count", "5",
                 "--placement", "power", "-o", str(out), "--plot", str(tmp_path / "m.png")]) == 0
    assert Schedule.load(out).computed_calls() == [int(20 * (i / 5) ** 1.5) for i in range(5)] == [0, 1, 5, 9, 14]
    assert (tmp_path / "m.png").stat().st_size > 0
    assert main(["schedule", "fora", "--model", "dit-xl-2", "--calls", "12", "--interval", "3", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["model_class"] == "DiTTransformer2DModel"
    assert main(["schedule", "show", str(out)]) == 0
    assert main(["schedule", "fora", "--model", "digits-unet", "--calls", "12"]) == 2  # a UNet: clear error
    assert "UNet" in capsys.readouterr().err


def test_sample_command_with_schedule(tmp_path, capsys):
    s = tmp_path / "s.json"
    assert main(["schedule", "deepcache", "--model", "digits-unet", "--calls", "8", "--interval", "2", "-o",
                 str(s)]) == 0
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", "digits-unet", "--schedule", str(s), "--steps", "8", "--per-class", "1",
                 "-o", str(grid), "--quiet", "--compare"]) == 0
    text = capsys.readouterr().out
    assert grid.read_bytes()[:4] == b"\x89PNG" and "class accuracy" in text and "PSNR" in text
    # a schedule for 8 calls on a 10-step run is refused unless --resize
    assert main(["sample", "--model", "digits-unet", "--schedule", str(s), "--steps", "10", "--per-class", "1",
                 "-o", str(grid), "--quiet"]) == 2
    assert "resize" in capsys.readouterr().err
    # a UNet schedule on the DiT is refused
    assert main(["sample", "--model", "digits-dit", "--schedule", str(s), "--steps", "8", "-o", str(grid)]) == 2


def test_prune_command_learns_a_schedule_that_sample_uses(tmp_path, capsys):
    out = tmp_path / "learned.json"
    assert main(["prune", "--model", "digits-unet", "--steps", "6", "--target", "0.5", "--mode", "shortcut",
                 "--iters", "2", "--batch-size", "2", "--granularity", "coarse", "--quiet", "-o", str(out)]) == 0
    s = Schedule.load(out)
    # the schedule is read at the budget the pruner trained at, by the rank the training used
    assert s.calls == 6 and s.name == "from_ranking" and 0.5 - 1 / 6 < s.macs_kept <= 0.5 + 1e-9
    assert out.with_suffix(".pruner.pt").is_file() and len(out.with_suffix(".log.jsonl").read_text().splitlines()) == 2
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", "digits-unet", "--schedule", str(out), "--steps", "6", "--per-class", "1",
                 "-o", str(grid), "--quiet"]) == 0
    assert main(["prune", "--model", "digits-unet", "--target", "1.5", "-o", str(out)]) == 2
    assert "--target" in capsys.readouterr().err


def test_prune_learns_with_the_estimate_by_default_within_the_budget(tmp_path, capsys):
    """`prune` without --mode runs dipgo.learn: from the best hand-made schedule, never over the
    MAC budget, never worse on its bank than the start."""
    out = tmp_path / "learned.json"
    assert main(["prune", "--model", "digits-unet", "--steps", "6", "--target", "0.5", "--bank", "2",
                 "--time-budget", "5", "--quiet", "-o", str(out)]) == 0
    s = Schedule.load(out)
    assert s.calls == 6 and s.macs_kept <= 0.5 + 1e-9
    line = [ln for ln in capsys.readouterr().out.splitlines() if "training-bank PSNR" in ln][0]
    start, end = (float(v.split(" dB")[0]) for v in line.split("PSNR ")[1].split(" -> "))
    assert end >= start - 1e-9


def test_prune_search_mode_starts_from_the_best_handmade_and_keeps_the_budget(tmp_path, capsys):
    out = tmp_path / "searched.json"
    assert main(["prune", "--model", "digits-unet", "--steps", "8", "--target", "0.5", "--mode", "search",
                 "--bank", "4", "--time-budget", "5", "--quiet", "-o", str(out)]) == 0
    s = Schedule.load(out)
    assert s.calls == 8 and s.macs_kept <= 0.5 + 1e-9
    assert "best hand-made start" in capsys.readouterr().out


def test_sample_with_a_schedule_of_other_calls_points_to_the_resize_flag(tmp_path, capsys):
    s = tmp_path / "s.json"
    assert main(["schedule", "deepcache", "--model", "digits-unet", "--calls", "5", "--interval", "2", "-o",
                 str(s)]) == 0
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", "digits-unet", "--schedule", str(s), "--steps", "3", "--per-class", "1",
                 "-o", str(grid), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resize" in err and "schedule.resize(" not in err and "Traceback" not in err, err
    assert "5" in err and "3" in err and not grid.exists()
    assert main(["sample", "--model", "digits-unet", "--schedule", str(s), "--steps", "3", "--per-class", "1",
                 "-o", str(grid), "--quiet", "--resize"]) == 0  # the flag it names does the job
    assert grid.is_file()


@pytest.mark.parametrize("command", ["sample", "prune"])
def test_unknown_scheduler_is_one_line_naming_the_choices(command, capsys):
    assert main([command, "--model", "digits-unet", "--scheduler", "Foo", "--steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "--scheduler" in err and "'Foo'" in err and "DDIMScheduler" in err and "EulerDiscreteScheduler" in err


def test_sample_help_describes_each_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["sample", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    from shortcut_kernels.cli import build_parser

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    described = {opt: a.help for a in sample._actions for opt in a.option_strings}
    for opt in ("--steps", "--scheduler", "--guidance", "--seed", "-o", "--per-class", "--threads", "--quiet"):
        assert described[opt], f"{opt} has no help text"
        assert " ".join(described[opt].split()).split("%")[0][:30] in text  # shown by --help


@pytest.mark.parametrize("builder,args", [("fora", ["--model", "digits-dit", "--interval", "3"]),
                                          ("skip-steps", ["--model", "digits-dit", "--count", "4"]),
                                          ("deepcache", ["--model", "digits-unet", "--interval", "3"])])
def test_schedule_commands_forecast(tmp_path, builder, args):
    """--forecast reaches the builder and the saved file: the reused cells forecast at that order,
    the computed ones at 0, and the file rebuilds with the order."""
    out = tmp_path / "s.json"
    assert main(["schedule", builder, *args, "--calls", "12", "--forecast", "2", "-o", str(out)]) == 0
    s = Schedule.load(out)
    assert s.params["forecast"] == 2
    assert torch.equal(s.forecast, torch.where(s.keep, 0, 2).to(s.forecast.dtype))
    assert s.resize(24).forecast[~s.resize(24).keep].eq(2).all()
    assert main(["schedule", builder, *args, "--calls", "12", "-o", str(out)]) == 0
    assert "forecast" not in Schedule.load(out).params and not Schedule.load(out).forecast.any()
    with pytest.raises(SystemExit):  # argparse: an order that does not exist
        main(["schedule", builder, *args, "--forecast", "3"])


def test_schedule_skip_steps_lead_placement(tmp_path):
    """--placement lead --lead J: the first J calls compute, the rest spread; the file keeps it."""
    out = tmp_path / "s.json"
    assert main(["schedule", "skip-steps", "--model", "digits-dit", "--calls", "20", "--count", "6", "--placement",
                 "lead", "--lead", "3", "--forecast", "1", "-o", str(out)]) == 0
    s = Schedule.load(out)
    assert s.computed_calls()[:3] == [0, 1, 2] and len(s.computed_calls()) == 6
    assert s.params["placement"] == "lead" and s.params["lead"] == 3 and s.params["forecast"] == 1
    assert s.resize(40).computed_calls()[:3] == [0, 1, 2]  # rebuilt by the builder: the lead stays
