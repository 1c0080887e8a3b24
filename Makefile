# The two commands of a fresh machine:
#   make test    build (CPU + CUDA kernels when nvcc and a CUDA torch are there) and run the tests
#   make bench   build and run the benchmarks on the embedded default models, then the report
# Both create .venv and install what they need; nothing is downloaded at run time.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch: pip takes it from the local package cache where there is one.
TORCH_SPEC ?= torch==2.14.1
DEPS := triton diffusers numpy safetensors scikit-learn tqdm ninja setuptools wheel \
        pytest pytest-benchmark hypothesis expecttest matplotlib peft accelerate transformers DeepCache
STAMP := $(VENV)/.deps-installed
BENCH_OUT ?= bench/results

.PHONY: test bench build venv clean info wheel

$(STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(DEPS)
	touch $(STAMP)

venv: $(STAMP)

# Incremental (ninja): only changed kernel files recompile.
build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: build
	mkdir -p $(BENCH_OUT)
	$(PY) -m pytest bench -q -p no:cacheprovider -o python_files="bench_*.py" --benchmark-json=$(BENCH_OUT)/bench.json \
		--benchmark-columns=median,iqr,rounds --benchmark-sort=name
	$(PY) bench/report.py $(BENCH_OUT)/bench.json --md $(BENCH_OUT)/report.md --json-out $(BENCH_OUT)/summary.json \
		--compact $(BENCH_OUT)/readme_table.md

info: build
	$(PY) -m shortcut_kernels info

wheel: $(STAMP)
	$(PY) -m pip wheel . --no-build-isolation --no-deps -w dist

clean:
	rm -rf build dist *.egg-info shortcut_kernels/_C*.so
