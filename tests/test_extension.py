"""The compiled extension: built with CUDA where it can be, every op with CPU and CUDA
kernels, linked against the CUDA libraries; and a package that still imports without it."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import shortcut_kernels as sk
from shortcut_kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["gated_blend", "gated_residual", "cache_residual", "guided_step"]
CUDA_EXPECTED = (torch.version.cuda is not None and shutil.which("nvcc") is not None
                 and os.environ.get("SHORTCUT_KERNELS_SKIP_CUDA_BUILD", "0") != "1")


def test_extension_loads():
    assert _ext.load(), f"shortcut_kernels._C did not load: {_ext.load_error()}"


def test_every_op_has_cpu_and_cuda_kernels():
    names = _ext.ext_op_names()
    for op in OPS:
        assert f"{_ext.EXT_NAMESPACE}::{op}_forward" in names, f"{op}_forward missing from the extension"
    assert len(names) >= len(OPS)
    for qualified in names:
        op = qualified.split("::")[1]
        assert _ext.has_kernel(op, "CPU"), f"{qualified} has no CPU kernel"
        if CUDA_EXPECTED:
            assert _ext.has_kernel(op, "CUDA"), f"{qualified} has no CUDA kernel: was _C built without CUDA?"


@pytest.mark.skipif(not CUDA_EXPECTED, reason="no CUDA toolkit / CUDA build of torch here")
def test_extension_links_cuda_libraries():
    tool = shutil.which("objdump") or shutil.which("readelf")
    if tool is None:
        pytest.skip("neither objdump nor readelf is installed")
    so = sk._ext._module.__file__
    out = subprocess.run([tool, "-p" if tool.endswith("objdump") else "-d", so],
                         capture_output=True, text=True, check=True).stdout
    needed = [line.split()[-1].strip("[]") for line in out.splitlines() if "NEEDED" in line]
    assert any(n.startswith("libcudart") for n in needed), needed
    assert any(n.startswith("libc10_cuda") for n in needed), needed


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("SHORTCUT_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_package_imports_and_works_without_the_extension():
    code = """
import sys
sys.modules["shortcut_kernels._C"] = None  # as if the build had failed or never run
import torch, shortcut_kernels as sk
from shortcut_kernels.ops import gated_blend as gb
f, c, g = torch.randn(2, 5), torch.randn(2, 5), torch.rand(2)
torch.testing.assert_close(sk.gated_blend(f, c, g), gb.reference(f, c, g))
assert sk.available_backends()["cpu"], "cpu backend must report why it is unavailable"
print("REASON", sk.available_backends()["cpu"][0])
try:
    with sk.use_backend("cpu"):
        sk.gated_blend(f, c, g)
except sk.BackendUnavailable as exc:
    print("FORCED", exc)
from shortcut_kernels.cli import info
print(info())
"""
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "REASON the C++ extension shortcut_kernels._C did not load" in result.stdout
    assert "FORCED" in result.stdout and "did not load" in result.stdout
    assert "extension shortcut_kernels._C: NOT loaded" in result.stdout


def test_env_var_forces_backend():
    code = """
import torch, shortcut_kernels as sk
from shortcut_kernels import backends
print("SELECTED", backends.select(torch.device("cpu"), torch.float32))
"""
    env_code = "import os; os.environ['SHORTCUT_KERNELS_BACKEND'] = 'torch'\n" + code
    assert "SELECTED torch" in _run_python(env_code).stdout
    bad = "import os; os.environ['SHORTCUT_KERNELS_BACKEND'] = 'cuda'\n" + code
    result = _run_python(bad)
    assert result.returncode != 0 and "runs CUDA tensors" in result.stderr


def test_cli_info_runs():
    result = subprocess.run([sys.executable, "-m", "shortcut_kernels", "info"], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "extension shortcut_kernels._C: loaded" in result.stdout
    assert "backends for cpu tensors (auto picks cpu)" in result.stdout


CPU_PATH_SWITCHES = ("SHORTCUT_KERNELS_BACKEND", "SHORTCUT_KERNELS_CPU_BF16", "SHORTCUT_KERNELS_STREAM_MIN_BYTES",
                     "SHORTCUT_KERNELS_CPU_NO_AVX512")
HAS_AVX512F = _ext.load() and _ext._module.cpu_info()["avx512f"]


@pytest.mark.parametrize("env", [{"SHORTCUT_KERNELS_CPU_BF16": "generic"},
                                 {"SHORTCUT_KERNELS_STREAM_MIN_BYTES": "1"},
                                 {"SHORTCUT_KERNELS_STREAM_MIN_BYTES": "1", "SHORTCUT_KERNELS_CPU_NO_AVX512": "1"}],
                         ids=["generic-bf16-rounding", "streaming-stores", "streaming-asked-without-avx512f"])
def test_cpu_store_paths_agree_bit_for_bit(tmp_path, env):
    """The CPU kernels store bf16 through fp32 tiles, rounded by VCVTNEPS2BF16 where the
    CPU has it and by integer ops otherwise (SHORTCUT_KERNELS_CPU_BF16=generic); and
    outputs of ops bigger than the cache with non-temporal stores, through the same tiles
    for fp32 (SHORTCUT_KERNELS_STREAM_MIN_BYTES=1 forces that on small tensors, with odd
    sizes so that the tiles start at every alignment). Every output and gradient must be
    bit-identical to the default path, on normal data (the instruction flushes fp32
    denormals to zero and keeps a NaN's sign). On a CPU without the instructions both runs
    take the same path and the test still checks the tiling.
    SHORTCUT_KERNELS_CPU_NO_AVX512=1 makes the kernels' CPU-feature check report no
    AVX-512F: streaming asked for must then not run (it would be SIGILL on such a CPU),
    which `_C.cpu_info()["streamed_calls"]` shows, on any CPU."""
    code = """
import sys, torch, shortcut_kernels as sk
outs = []
for dt in (torch.bfloat16, torch.float32):
    torch.manual_seed(0)
    x, y, z = (torch.randn(3, 1029, 37).to(dt) for _ in range(3))
    gate, ada = torch.rand(3), torch.randn(3, 37)
    leaves = [t.clone().requires_grad_() for t in (x, y, z)]
    g_leaf, ada_leaf = gate.clone().requires_grad_(), ada.clone().requires_grad_()
    outs += [sk.gated_blend(x, y, gate, z), sk.gated_residual(x, y, ada), sk.cache_residual(x, [y, z]),
             sk.cache_residual(x, [y, z, x, y, z]), sk.guided_step(x, y, z, 0.9, -0.2, 4.0)]
    loss = (sk.gated_blend(*leaves[:2], g_leaf).float().sum()
            + sk.gated_residual(leaves[0], leaves[1], ada_leaf).float().sum()
            + sk.guided_step(*leaves, 0.9, -0.2, 4.0).float().square().sum())
    outs += list(torch.autograd.grad(loss, leaves + [g_leaf, ada_leaf]))
    cache = torch.empty_like(x)
    outs += [sk.gated_residual(x, y, ada, cache_out=cache), cache]
torch.save((outs, sk._ext._module.cpu_info()), sys.argv[1])
"""
    results = []
    for extra in ({}, env):
        path = tmp_path / f"out_{len(results)}.pt"
        run_env = dict(os.environ, PYTHONPATH=ROOT, **extra)
        for name in CPU_PATH_SWITCHES:
            if name not in extra:
                run_env.pop(name, None)
        run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                             env=run_env, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr
        results.append(torch.load(path))
    (default, _), (outs, info) = results
    assert len(default) == len(outs) == 24
    for i, (a, b) in enumerate(zip(default, outs)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i} differs with {env}"
    if env.get("SHORTCUT_KERNELS_CPU_NO_AVX512") == "1":
        assert not info["avx512f"] and not info["avx512bf16"], info
        assert info["streamed_calls"] == 0, f"streaming stores ran without AVX-512F: {info}"
    elif "SHORTCUT_KERNELS_STREAM_MIN_BYTES" in env and HAS_AVX512F:
        assert info["streamed_calls"] > 0, f"streaming was asked for on an AVX-512F CPU: {info}"
