"""Until a GPU run of the test suite is recorded, `auto` keeps CUDA tensors on the torch
reference (the CUDA and Triton kernels have never run); forcing them stays possible. The
record is written by shortcut_kernels.gpu_record from the JUnit XML of the run. Tested on
CPU with the device check mocked."""
import json

import pytest
import torch

from shortcut_kernels import backends, gpu_record


@pytest.fixture
def gpu_here(monkeypatch, tmp_path):
    """A machine where the CUDA and Triton backends could serve CUDA tensors, with the
    record at a temporary path (absent to start with)."""
    real_reasons = backends._reasons

    def reasons(backend, device_type, dtype, interpret):
        if device_type == "cuda" and backend in ("cuda", "triton", "torch"):
            return ()
        return real_reasons(backend, device_type, dtype, interpret)

    monkeypatch.setattr(backends, "_reasons", reasons)
    monkeypatch.setattr(backends, "GPU_RECORD", tmp_path / "gpu_validation.json")
    monkeypatch.delenv(backends.ENV_VAR, raising=False)

    def reset():
        backends._selected.clear()
        backends.gpu_unvalidated_reason.cache_clear()
    reset()
    yield backends.GPU_RECORD, reset
    reset()


def test_auto_uses_torch_on_cuda_until_a_gpu_run_is_recorded(gpu_here):
    path, _ = gpu_here
    assert not path.exists()
    assert backends.select("cuda", torch.float16) == "torch"
    assert "no GPU run of the test suite is recorded" in backends.gpu_unvalidated_reason()
    assert "not validated" in backends.gpu_status()
    for forced in ("cuda", "triton"):  # forcing the unrun kernels stays possible
        with backends.use_backend(forced):
            assert backends.select("cuda", torch.float16) == forced
    assert backends.select("cpu", torch.float32) in ("cpu", "torch")  # CPU tensors: unaffected


@pytest.mark.parametrize("result,expected", [("passed", "cuda"), ("failed", "torch")])
def test_a_recorded_run_decides(gpu_here, result, expected):
    path, reset = gpu_here
    path.write_text(json.dumps({"date": "2026-11-29T18:00:00+00:00", "gpu": "NVIDIA H200", "torch": "2.11.0",
                                "result": result}))
    reset()
    assert backends.select("cuda", torch.bfloat16) == expected
    assert (backends.gpu_unvalidated_reason() is None) == (result == "passed")
    assert ("NVIDIA H200" in backends.gpu_status()) == (result == "passed")


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_gated_blend" name="test_forward[cuda-gpu-float16]"/>
<testcase classname="tests.test_gated_blend" name="test_forward[cpu-cpu-float16]"/>
<testcase classname="tests.test_gated_blend" name="test_forward[triton-gpu-float32]">{failure}</testcase>
<testcase classname="tests.test_zoo" name="test_train"><skipped message="slow"/></testcase>
</testsuite></testsuites>"""


@pytest.mark.parametrize("failing", [False, True])
def test_record_of_a_gpu_run(gpu_here, monkeypatch, tmp_path, failing):
    path, reset = gpu_here
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT.format(failure='<failure message="off by one ulp"/>' if failing else ""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    entry = gpu_record.record(junit, path)
    saved = json.loads(path.read_text())
    assert saved == entry
    assert saved["tests"] == dict(passed=2 if failing else 3, failed=int(failing), skipped=1,
                                  gpu_passed=1 if failing else 2)
    assert saved["result"] == ("failed" if failing else "passed")
    assert saved["gpu"] == "NVIDIA H200" and saved["torch"] == torch.__version__ and saved["date"]
    reset()
    assert backends.select("cuda", torch.float32) == ("torch" if failing else "cuda")


def test_no_record_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT.format(failure=""))
    assert gpu_record.record(junit, tmp_path / "record.json") is None
    assert not (tmp_path / "record.json").exists()


def test_triton_autotune_switch(monkeypatch):
    """SHORTCUT_KERNELS_TRITON_AUTOTUNE=0 (the GPU test runs of `make gpu`) keeps the first of the
    configs, so nothing is tuned; by default all four are tried. The interpreter always has one."""
    from shortcut_kernels.triton import _common

    monkeypatch.setattr(_common, "triton_interpret", lambda: False)
    monkeypatch.delenv(_common.AUTOTUNE_ENV, raising=False)
    every = _common.elementwise_configs()
    assert len(every) == 4
    monkeypatch.setenv(_common.AUTOTUNE_ENV, "0")
    (only,) = _common.elementwise_configs()
    assert only.kwargs == every[0].kwargs and only.num_warps == every[0].num_warps
    monkeypatch.setattr(_common, "triton_interpret", lambda: True)
    monkeypatch.delenv(_common.AUTOTUNE_ENV)
    assert len(_common.elementwise_configs()) == 1


def test_a_missing_junit_file_fails_the_record(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT.format(failure=""))
    counts = gpu_record.summarise(junit, tmp_path / "killed-stage.xml")
    assert counts["failed"] == 1 and counts["passed"] == 3
    assert counts["unreadable"] == [str(tmp_path / "killed-stage.xml")]


def test_nan_checks_on_cuda_tensors_are_opt_in(monkeypatch):
    """NaN checks sync the device: on CUDA tensors only with SHORTCUT_KERNELS_CHECK_NAN=1, never
    while a CUDA graph is captured, and off by default without asking the stream anything."""
    import types

    from shortcut_kernels import _validate

    cuda_tensor = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"))
    capturing = []

    def is_capturing():
        capturing.append(1)
        return capturing_now

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", is_capturing)
    monkeypatch.delenv("SHORTCUT_KERNELS_CHECK_NAN", raising=False)
    capturing_now = False
    assert not _validate.nan_checks_enabled(cuda_tensor) and capturing == []
    monkeypatch.setenv("SHORTCUT_KERNELS_CHECK_NAN", "1")
    assert _validate.nan_checks_enabled(cuda_tensor)
    capturing_now = True
    assert not _validate.nan_checks_enabled(cuda_tensor)
    assert _validate.nan_checks_enabled(torch.zeros(1))  # CPU tensors: always
