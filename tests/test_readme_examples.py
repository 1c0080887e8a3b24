"""The Python examples of the README and of docs/design.md run as written, from a directory
outside the checkout, with this environment's python: the package must be installed
(`make install`, part of `make test`), not just importable from the repository root."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/design.md")  # every ```python block of these runs
EXAMPLES = [(name, block) for name in DOCUMENTS
            for block in re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), flags=re.S)]
BLOCKS = [block for _, block in EXAMPLES]


def _outside_env():
    env = dict(os.environ)
    env.pop("SHORTCUT_KERNELS_BACKEND", None)
    return env


def test_readme_has_examples():
    """The README's three (accelerate a model, learn a schedule, optimise latents and fine-tune),
    and the design doc's ops and zoo examples."""
    readme = [block for name, block in EXAMPLES if name == "README.md"]
    assert len(readme) >= 3
    assert any("accelerate(" in b for b in readme) and any("learn(" in b for b in readme)
    assert any("optimize_latents(" in b and "finetune(" in b for b in readme)
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(tmp_path, index):
    name, block = EXAMPLES[index]
    script = tmp_path / f"readme_example_{index}.py"
    script.write_text(block)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_outside_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"{name} example {index} failed:\n{block}\n{run.stderr[-3000:]}"


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
