"""What every section shares: the machine description and images as small JSON."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    """The CPU's marketing name (platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(full: bool) -> dict:
    import diffusers

    import shortcut_kernels as sk

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": f"{platform.system()} {platform.machine()}", "cpu": cpu_model(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "cuda": torch.version.cuda, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "shortcut_kernels": sk.__version__, "commit": git_commit(),
            "full": full}


def images_to_json(images: torch.Tensor) -> list:
    """[N, 1, H, W] images in [-1, 1] as N nested lists of 0..255 ints: a 16x16 digit is
    256 small numbers, so sample grids travel in the section JSON and the report can
    redraw them."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x[:, 0].tolist()
