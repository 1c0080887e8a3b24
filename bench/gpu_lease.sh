#!/usr/bin/env bash
# `make gpu`: everything a GPU machine has to check, in one command that fits a short lease.
#
#   OUT=dir [GPU_PYTHON=python3] [WHEELS=dir] [LEASE_SECONDS=560] [SKIP_OPS=1]
#     [SHORTCUT_GPU_PARTS=compile,cuda-graphs,...] bash bench/gpu_lease.sh
#
# Uses the machine's own python, torch and nvcc (no venv, no network): pure-Python wheels in
# WHEELS (diffusers, DeepCache, ...) are installed into build/site first. Then, in order of
# what matters most, each stage under its own time limit so that a slow one cannot eat the
# rest:
#   1. build the extension for this GPU (TORCH_CUDA_ARCH_LIST: its compute capability);
#   2. the GPU tests (`-m gpu`: every op on the cuda, triton and torch backends against the
#      references; Triton with one config, then the backend agreement tests autotuned) and
#      tests/test_extension.py beside them, in parallel when pytest-xdist is there;
#      shortcut_kernels/gpu_validation.json records the run (commit it: `auto` then uses the
#      CUDA/Triton kernels on CUDA tensors);
#   3. `python -m bench.run --sections ops`: the op roofline (no torch.compile rows: one Inductor
#      compile per row does not fit), then `--sections gpu`: its parts until the deadline
#      (the report of build/bench holds both). SKIP_OPS=1 leaves the roofline out and
#      SHORTCUT_GPU_PARTS picks the GPU section's parts and their order
#      (bench/sections/gpu.py), so that a short lease goes to what has not run yet.
# OUT gets the record and lease.tgz (build/lease: logs and JUnit files; build/bench: results).
set -u
START=$(date +%s)
OUT=${OUT:-build/gpu}
PY=${GPU_PYTHON:-python3}
LEASE_SECONDS=${LEASE_SECONDS:-560}
DEADLINE=$((START + LEASE_SECONDS))
LOGS=build/lease
rm -rf "$LOGS" build/bench; mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:$PWD/build/site${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[$(($(date +%s) - START)) s] $*"; }
left() { echo $((DEADLINE - $(date +%s))); }

if [ -n "${SHORTCUT_GPU_PARTS:-}" ]; then  # a typo found now, not after the tests
  $PY -c "from bench.sections.gpu import selected_parts
print('GPU section parts:', ', '.join(selected_parts(False)))" || { log "bad SHORTCUT_GPU_PARTS"; exit 2; }
fi
log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$LOGS/machine.txt"
nproc | tee -a "$LOGS/machine.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                                   'triton', triton.__version__)" \
  | tee -a "$LOGS/machine.txt"

if [ -d "${WHEELS:-wheels}" ]; then
  log "wheels from ${WHEELS:-wheels}"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target build/site \
    "${WHEELS:-wheels}"/*.whl || log "wheel install failed"
fi

log "build"
CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
if TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
   timeout 400 $PY setup.py --quiet build_ext --inplace >"$LOGS/build.log" 2>&1; then
  log "built"
else
  log "BUILD FAILED"; tail -40 "$LOGS/build.log"
fi
$PY -m shortcut_kernels info 2>&1 | tee "$LOGS/info.txt"

log "GPU tests"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n $(($(nproc) < 16 ? $(nproc) : 16))")
TIMEOUT=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 150")
# tests/test_extension.py runs subprocesses on the CPU: beside the GPU tests
timeout 200 $PY -m pytest tests/test_extension.py -q -p no:cacheprovider --junitxml=$LOGS/junit-ext.xml -rf \
  >"$LOGS/tests-ext.log" 2>&1 &
EXT=$!
# Every op x backend x dtype with one Triton config (compiling and tuning four per size took
# 3100 of the 3350 test-seconds of the first GPU run), then the backend agreement tests with
# the autotuned kernels as users run them. SIGINT: pytest still writes the JUnit file.
SHORTCUT_KERNELS_TRITON_AUTOTUNE=0 timeout -s INT -k 15 $(($(left) - 260)) \
  $PY -m pytest tests -m gpu -q -p no:cacheprovider $XDIST $TIMEOUT --junitxml=$LOGS/junit-gpu.xml -rf \
  >"$LOGS/tests-gpu.log" 2>&1
log "GPU tests (one Triton config): exit $?"; tail -6 "$LOGS/tests-gpu.log"
timeout -s INT -k 15 90 $PY -m pytest tests/test_backend_agreement.py -m gpu -q -p no:cacheprovider $XDIST $TIMEOUT \
  --junitxml=$LOGS/junit-tuned.xml -rf >"$LOGS/tests-tuned.log" 2>&1
log "backend agreement (autotuned Triton): exit $?"; tail -4 "$LOGS/tests-tuned.log"
wait $EXT
log "extension tests: exit $?"; tail -3 "$LOGS/tests-ext.log"
$PY -m shortcut_kernels.gpu_record $LOGS/junit-gpu.xml $LOGS/junit-tuned.xml $LOGS/junit-ext.xml \
  --selection "pytest -m gpu (every op on the cuda, triton and torch backends; Triton with one config) \
+ the backend agreement tests with autotuned Triton + tests/test_extension.py"
# only a record written by this run (without a GPU gpu_record writes nothing)
[ shortcut_kernels/gpu_validation.json -nt "$LOGS/machine.txt" ] && cp shortcut_kernels/gpu_validation.json "$OUT/"

log "benchmarks"
# ops first (the roofline, about 80 s on an H200), then the GPU section's parts until the deadline
export SHORTCUT_BENCH_DEADLINE=$((DEADLINE - 15)) SHORTCUT_BENCH_ROUNDS=${SHORTCUT_BENCH_ROUNDS:-30} \
  SHORTCUT_BENCH_ROUND_MS=${SHORTCUT_BENCH_ROUND_MS:-2}
if [ -z "${SKIP_OPS:-}" ]; then
  timeout $(($(left) < 180 ? $(left) : 180)) $PY -m bench.run --sections ops --out build/bench \
    -- -k "not 2x4x8x8 and not 2x16x16 and not compile" >"$LOGS/bench-ops.log" 2>&1
  log "ops: exit $?"; grep -v "it/s\]" "$LOGS/bench-ops.log" | tail -8
fi
timeout $(($(left) - 10)) $PY -m bench.run --sections gpu --out build/bench >"$LOGS/bench-gpu.log" 2>&1
log "gpu section: exit $?"; grep -v "it/s\]" "$LOGS/bench-gpu.log" | tail -20
tar czf "$OUT/lease.tgz" -C build lease bench
log "done"
