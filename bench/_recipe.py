"""The one benchmark recipe every bench_<op>.py follows.

A case is (op, size, dtype, mode, provider). Providers:
  eager    the composite a user writes in torch (several kernels)
  compile  torch.compile of that same composite (Inductor's fused kernel)
  cpu      our C++ CPU kernel          (CPU runs)
  cuda     our CUDA C++ kernel         (GPU runs)
  triton   our Triton kernel           (GPU runs)
  copy     a copy of the same number of bytes: the memory floor, measured in the same run
Each row stores in extra_info what the report needs: bytes moved by a fused kernel,
op, mode, size, dtype, provider, device and versions; bench/sections/ops.py turns the JSON
into GB/s, % of copy bandwidth and speedups over eager and compile from the same run.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
import platform
import time
from typing import Callable

import pytest
import torch

import shortcut_kernels as sk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
MODES = ["fwd", "fwd+bwd"]
PROVIDERS = (["eager", "compile", "cuda", "triton", "copy"] if DEVICE == "cuda"
             else ["eager", "compile", "cpu", "copy"])
ROUNDS = int(os.environ.get("SHORTCUT_BENCH_ROUNDS", "20" if DEVICE == "cpu" else "100"))
# Each round times back-to-back calls for at least this long (as in a model's loop), then
# one device sync, and reports the time per call: single calls of a few microseconds time
# the timer (and a sync per call on a GPU), and on the CPU they also time OpenMP threads
# waking from sleep.
ROUND_SECONDS = float(os.environ.get("SHORTCUT_BENCH_ROUND_MS", "5")) / 1e3
if os.environ.get("SHORTCUT_BENCH_THREADS"):  # e.g. 1 on a machine shared with other work
    torch.set_num_threads(int(os.environ["SHORTCUT_BENCH_THREADS"]))


def _steady_malloc() -> str:
    """glibc's malloc hands blocks of a few MB back to the OS at thresholds it tunes at
    run time, and always maps blocks over 32 MB afresh, so whether a temporary costs page
    faults (about 1 us per 4 KB page here) changes from run to run and swamps the large
    rows. With mmap off and no trimming every provider reuses its memory: the fast,
    repeatable case, and the one most favourable to the eager composite (it allocates
    the most temporaries)."""
    if DEVICE != "cpu" or platform.system() != "Linux":
        return "default"
    global _LIBC
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_max = -1, -4
    ok = _LIBC.mallopt(m_trim_threshold, 1 << 30) and _LIBC.mallopt(m_mmap_max, 0)
    return "glibc: no trimming, no mmap" if ok else "default"


_LIBC = None


def _fresh_heap():
    """Hands the memory of earlier cases back to the OS, so that every case starts from
    the same heap state (with no trimming the heap only grows, and how earlier cases left
    it changed the mid-size rows, whose data is about the size of the L3 cache)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


MALLOC = _steady_malloc()


@dataclasses.dataclass
class OpBench:
    """How to benchmark one op.

    make_inputs(shape, dtype, device) -> dict of input tensors and scalars;
    eager(**inputs) -> output (the composite); ours(**inputs) -> output (the public op);
    grad_inputs: names of the inputs that get gradients in fwd+bwd;
    fused_bytes(inputs, mode) -> bytes a fused kernel must move (inputs once, outputs once).
    """
    name: str
    make_inputs: Callable[..., dict]
    eager: Callable[..., torch.Tensor]
    ours: Callable[..., torch.Tensor]
    grad_inputs: tuple[str, ...]
    fused_bytes: Callable[[dict, str], int]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _step(fn, spec: OpBench, inputs: dict, mode: str):
    """The callable timed for one case: forward, or forward + backward."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(**inputs)
        return run
    leaves = {k: v.detach().requires_grad_() if k in spec.grad_inputs else v for k, v in inputs.items()}
    wrt = [leaves[k] for k in spec.grad_inputs]
    probe = fn(**leaves)
    grad = torch.randn_like(probe)

    def run():
        torch.autograd.grad(fn(**leaves), wrt, grad)
    return run


def _copy_step(spec: OpBench, inputs: dict, mode: str):
    """Copies bytes/2 into a preallocated buffer: bytes/2 read + bytes/2 written."""
    total = spec.fused_bytes(inputs, mode)
    src = torch.empty(total // 2, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


_last_case: dict = {}


def _case_inputs(spec: OpBench, shape, dtype) -> dict:
    """The inputs of one (op, size, dtype), shared by all its providers and modes: every
    provider then reads the same memory. Near the L3 size, where a tensor's physical
    pages land decides how much of it stays cached, and separate inputs per provider
    made rows of the same case swing 2x either way."""
    key = (spec.name, tuple(shape), dtype)
    if _last_case.get("key") != key:
        _last_case.clear()
        _fresh_heap()
        _last_case.update(key=key, inputs=spec.make_inputs(shape, dtype, DEVICE))
    return _last_case["inputs"]


def run_case(benchmark, spec: OpBench, shape, dtype, mode, provider):
    if provider not in PROVIDERS:
        pytest.skip(f"{provider} does not run on {DEVICE}")
    inputs = _case_inputs(spec, shape, dtype)
    if provider == "copy":
        step = _copy_step(spec, inputs, mode)
    elif provider == "eager":
        step = _step(spec.eager, spec, inputs, mode)
    elif provider == "compile":
        torch._dynamo.reset()  # one fresh static-shape compile per case: the best case for Inductor
        step = _step(torch.compile(spec.eager, dynamic=False, fullgraph=True), spec, inputs, mode)
    else:
        reasons = sk.backends.unavailable_reasons(provider, DEVICE, dtype)
        if reasons:
            pytest.skip("; ".join(reasons))

        step = _step(spec.ours, spec, inputs, mode)

    benchmark.extra_info.update(
        op=spec.name, mode=mode, size=str(tuple(shape)), dtype=str(dtype).replace("torch.", ""),
        provider=provider, device=device_name(), bytes=spec.fused_bytes(inputs, mode),
        torch=torch.__version__, threads=torch.get_num_threads(), sk=sk.__version__, malloc=MALLOC)
    with _forced_backend(provider if provider in ("cpu", "cuda", "triton") else None):
        step()  # the first call may load the extension or compile a kernel
        _sync()
        calls = _calibrate(step)
        # A round is `calls` back-to-back calls and one device sync; the ops section divides
        # the round times by calls_per_round.
        benchmark.extra_info["calls_per_round"] = calls

        def one_round():
            for _ in range(calls):
                step()
            _sync()
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@contextlib.contextmanager
def _forced_backend(provider):
    """Forces our backend for the whole case through the environment variable, set once
    outside the timing: unlike use_backend() (a context variable of this thread) it also
    reaches the threads on which the autograd engine runs a GPU backward."""
    if provider is None:
        yield
        return
    previous = os.environ.get(sk.backends.ENV_VAR)
    os.environ[sk.backends.ENV_VAR] = provider
    try:
        yield
    finally:
        if previous is None:
            del os.environ[sk.backends.ENV_VAR]
        else:
            os.environ[sk.backends.ENV_VAR] = previous


def _calibrate(step) -> int:
    """Calls per round so that a round lasts about ROUND_SECONDS (doubling, as
    pytest-benchmark's own calibration does)."""
    calls = 1
    while calls < 4096:
        start = time.perf_counter()
        for _ in range(calls):
            step()
        _sync()
        if time.perf_counter() - start >= ROUND_SECONDS:
            break
        calls *= 2
    return calls


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def parametrize(sizes):
    """The standard grid: sizes x dtypes x modes x providers."""
    def wrap(fn):
        # The last decorator applied varies fastest: the providers of one case run back
        # to back, on the same inputs (see _case_inputs).
        fn = pytest.mark.parametrize("shape", sizes, ids=lambda s: "x".join(map(str, s)))(fn)
        fn = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))(fn)
        fn = pytest.mark.parametrize("mode", MODES)(fn)
        fn = pytest.mark.parametrize("provider", ["eager", "compile", "cpu", "cuda", "triton", "copy"])(fn)
        return fn
    return wrap


# 512 elements: the time of a call is all overhead (argument checks, backend choice,
# autograd, the launch), the row that shows what the call paths cost.
TINY = (2, 4, 8, 8)


def unet_dit_sizes(large_gpu, large_cpu):
    """The call-overhead size, real UNet/DiT activation sizes and one large size for the
    bandwidth ceiling."""
    return [TINY, (2, 320, 64, 64), (2, 1280, 16, 16), (2, 4096, 1152),
            large_gpu if DEVICE == "cuda" else large_cpu]
