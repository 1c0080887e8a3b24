"""The README's Python examples run as written, from a directory outside the checkout,
with this environment's python: the package must be installed (`make install`, part of
`make test`), not just importable from the repository root."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _outside_env():
    env = dict(os.environ)
    env.pop("SHORTCUT_KERNELS_BACKEND", None)
    return env


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(tmp_path, index):
    script = tmp_path / f"readme_example_{index}.py"
    script.write_text(BLOCKS[index])
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_outside_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"README example {index} failed:\n{BLOCKS[index]}\n{run.stderr[-3000:]}"


def test_console_script():
    """`shortcut-kernels` is installed next to the interpreter (in a venv)."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtual environment (e.g. `make gpu` with a system python)")
    command = shutil.which("shortcut-kernels", path=str(Path(sys.executable).parent))
    assert command is not None, "the shortcut-kernels command is not installed: run `make install`"
    run = subprocess.run([command, "info"], cwd=Path(sys.executable).parent, env=_outside_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "backends for cpu tensors" in run.stdout
