"""`shortcut-kernels sdo`: writes the before/after grid, the reward curve and the history."""
from __future__ import annotations

import json

import pytest

from shortcut_kernels.cli import main


def test_sdo_command(tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["sdo", "--model", "digits-unet", "--target-class", "7", "--iters", "2", "--steps", "3",
               "--batch", "3", "-o", str(out), "--json", str(tmp_path / "h.json"), "--no-progress",
               "--prior-weight", "1"])
    assert rc == 0
    assert out.stat().st_size > 1000 and (tmp_path / "grid_reward.png").stat().st_size > 1000
    record = json.loads((tmp_path / "h.json").read_text())
    assert len(record["history"]) == 2 and 0 <= record["accuracy_after"] <= 1
    assert "target 7" in capsys.readouterr().out


def test_sdo_command_bad_target(tmp_path):
    with pytest.raises(SystemExit, match="target-class"):
        main(["sdo", "--target-class", "12", "--iters", "1", "-o", str(tmp_path / "x.png")])


def test_sdo_command_shifted_reward_and_freeze(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sdo", "--target-class", "3", "--iters", "2", "--steps", "3", "--batch", "2", "-o", str(out),
                 "--json", str(tmp_path / "h.json"), "--no-progress", "--reward-shift", "1",
                 "--freeze-prob", "0.97"]) == 0
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["args"]["reward_shift"] == 1 and "fraction_reached" in record["history"][0]
    with pytest.raises(SystemExit, match="freeze-prob"):
        main(["sdo", "--target-class", "3", "--freeze-prob", "0.9", "--stop-at", "-0.1", "-o", str(out)])
    with pytest.raises(SystemExit, match="freeze-prob"):
        main(["sdo", "--target-class", "3", "--freeze-prob", "1.5", "-o", str(out)])
    with pytest.raises(SystemExit, match="reward-shift"):
        main(["sdo", "--target-class", "3", "--reward-shift", "-1", "-o", str(out)])
