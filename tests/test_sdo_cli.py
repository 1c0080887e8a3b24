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
