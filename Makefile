# The two commands of a fresh machine:
#   make test    build (CPU + CUDA kernels when nvcc and a CUDA torch are there) and run the tests
#   make bench   build, then measure every claim in one run (ops, DiP-GO, SDO; the GPU suite
#                where a GPU is visible) into bench/results/<UTC timestamp>/: one JSON per
#                section, report.md and PNG plots (python -m bench.run). FULL=1: the long versions;
#                BENCH_OUT=dir: write there; `shortcut-kernels report DIR` rebuilds the report.
# Both create .venv and install what they need; nothing is downloaded at run time. The
# package is installed into .venv in editable mode (`import shortcut_kernels` and the
# `shortcut-kernels` command work from any directory).
#
# A GPU machine with its own python, torch and nvcc and no network:
#   make gpu [GPU_PYTHON=python3] [WHEELS=dir] [GPU_OUT=dir] [LEASE_SECONDS=540]
# (bench/gpu_lease.sh) builds against that torch for that GPU (no venv, no downloads;
# pure-Python wheels carried in WHEELS are installed into build/site first), runs the GPU tests
# (every op on the cuda, triton and torch backends) and records them in
# shortcut_kernels/gpu_validation.json (commit it: `auto` uses the CUDA/Triton kernels only once
# a passing run is recorded), then the op roofline and the GPU section of `make bench`, each
# stage under a time limit so that the whole fits a short GPU lease.

PYTHON ?= python3
VENV ?= .venv
GPU_PYTHON ?= python3
WHEELS ?= wheels
ifeq ($(SYSTEM_PYTHON),)
PY := $(VENV)/bin/python
else
# Nothing is installed into a system python: the checkout and the carried wheels
# (unpacked into build/site) go on its path.
PY := $(SYSTEM_PYTHON)
export PYTHONPATH := $(CURDIR):$(CURDIR)/build/site$(if $(PYTHONPATH),:$(PYTHONPATH))
endif
# A CUDA build of torch: pip takes it from the local package cache where there is one.
TORCH_SPEC ?= torch==2.14.1
DEPS := triton diffusers numpy safetensors scikit-learn tqdm ninja setuptools wheel \
        pytest pytest-benchmark hypothesis expecttest matplotlib peft accelerate transformers DeepCache cache-dit==1.5.3 pytorch-msssim
STAMP := $(VENV)/.deps-installed
BENCH_OUT ?=
FULL ?=
ifeq ($(SYSTEM_PYTHON),)
SETUP := $(STAMP)
endif

.PHONY: test bench build install venv clean info wheel gpu

$(STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(DEPS)
	touch $(STAMP)

venv: $(STAMP)

# Incremental (ninja): only changed kernel files recompile.
build: $(SETUP)
	$(PY) setup.py --quiet build_ext --inplace

# Editable install without build isolation that builds nothing: the extension is the one
# `build` made in place.
install: build
ifeq ($(SYSTEM_PYTHON),)
	SHORTCUT_KERNELS_NO_EXT_BUILD=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps --no-index -e .
endif

# Writes build/junit.xml; on a GPU machine gpu_record turns it into the validation record.
test: install
	mkdir -p build
	$(PY) -m pytest tests -q -p no:cacheprovider --junitxml=build/junit.xml; status=$$?; \
		$(PY) -m shortcut_kernels.gpu_record build/junit.xml; exit $$status

bench: install
	$(PY) -m bench.run $(if $(BENCH_OUT),--out $(BENCH_OUT)) $(if $(FULL),--full) $(if $(BENCH_ARGS),-- $(BENCH_ARGS))

info: install
	$(PY) -m shortcut_kernels info

gpu:
	OUT=$(or $(GPU_OUT),build/gpu) GPU_PYTHON=$(GPU_PYTHON) WHEELS=$(WHEELS) bash bench/gpu_lease.sh

wheel: $(SETUP)
	$(PY) -m pip wheel . --no-build-isolation --no-deps -w dist

clean:
	rm -rf build dist *.egg-info shortcut_kernels/_C*.so
