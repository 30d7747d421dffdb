"""What to serve and how: `ServeOptions`, the `args` of a RayService's Serve application.

A pydantic model with the CRDs' conventions (`kubetune.api.common.ApiModel`): camelCase on the wire
(`app_builder`'s `args`, written by the operator's `serve_args`), snake_case in Python, unknown fields
rejected, a description on every field. Strict types: `"2"` is not a replica count, nor `true` one.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from kubetune.api.common import ApiModel

Engine = Literal["auto", "vllm", "transformers"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
CACHE_DIR_ENV = "KUBETUNE_CACHE_DIR"


def cache_dir() -> Path:
    """Where remote checkpoints are copied (`$KUBETUNE_CACHE_DIR`)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "kubetune")


class ServeOptions(ApiModel):
    """What to serve and how. `app_builder` takes the same fields in camelCase."""

    model_config = ApiModel.model_config | {"frozen": True, "strict": True}

    model_uri: str = Field(
        min_length=1,
        description="A local directory, `pvc://claim/path`, `s3://...` (any fsspec URL), or a Hugging "
        "Face model id (anything without `://` that does not exist locally).")
    served_model_name: str | None = Field(
        default=None, description="The `model` clients send (default: the last part of modelUri).")
    engine: Engine = Field(
        default="auto", description="vllm, transformers, or auto: vllm when it is installed and a GPU is "
        "there, else transformers.")
    max_batch_size: int = Field(
        default=32, ge=1, description="Requests generated together (vLLM: max_num_seqs).")
    batch_wait_timeout_s: float = Field(
        default=0.1, ge=0, description="transformers: how long a batch waits for more requests after its "
        "first.")
    num_replicas: int = Field(default=1, ge=1, description="Replicas (the minimum when autoscaling).")
    max_replicas: int | None = Field(
        default=None, ge=1, description="With a value above numReplicas, Serve autoscales between the two.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica.")
    num_cpus: float | None = Field(
        default=None, ge=0,
        description="CPUs per replica (default 1 on a cluster; `serve_locally` uses 0.5 so two "
        "transformers apps fit on 2 CPUs). With vLLM it is what the router and the LLMServer actor take; "
        "Ray Serve LLM adds the engine's own bundle (1 CPU on CPU, else the GPUs).")
    accelerator_type: str | None = Field(
        default=None, description="Ray accelerator type (e.g. A10G) the replicas are scheduled onto.")
    max_model_len: int | None = Field(
        default=None, ge=2, description="Context length: prompt plus generated tokens (default: the model's).")
    dtype: Dtype = Field(
        default="auto", description="auto is the checkpoint's dtype on a GPU and float32 on a CPU (CPU "
        "matmuls in 16 bit are slow).")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads in a transformers replica (default: torch's, "
        "which follows OMP_NUM_THREADS).")

    @model_validator(mode="after")
    def _replicas(self) -> ServeOptions:
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError("maxReplicas must be >= numReplicas")
        return self

    @property
    def model_name(self) -> str:
        """The name clients use in `model`."""
        if self.served_model_name:
            return self.served_model_name
        tail = self.model_uri.rstrip("/").rsplit("/", 1)[-1]
        return tail.removesuffix(".gguf") or self.model_uri


class ServeArgsError(ValueError):
    """RayService `args` that are not ServeOptions; the message names the first bad arg."""


def options_from_args(args: Mapping[str, Any]) -> ServeOptions:
    """ServeOptions from a RayService's camelCase `args` (ServeArgsError names the first bad arg)."""
    if not isinstance(args, Mapping):
        raise ServeArgsError(f"serving args must be a mapping, got {type(args).__name__}")
    try:
        opts: ServeOptions = ServeOptions.from_wire(dict(args))
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            known = ", ".join(sorted(f.alias or n for n, f in ServeOptions.model_fields.items()))
            message = f"unknown serving arg {key!r}; known args: {known}"
        elif first["type"] == "missing":
            message = f"serving arg {key!r} is required"
        elif key:
            message = f"serving arg {key!r}: {first['msg']}, got {first['input']!r}"
        else:
            message = f"serving args: {first['msg']}"
        raise ServeArgsError(message) from None
    return opts


def resolve_engine(opts: ServeOptions) -> Literal["vllm", "transformers"]:
    """`auto` -> vllm when `vllm` is importable and a GPU is there (requested per replica, or visible
    here), else transformers. `find_spec` only: importing vllm takes seconds and a CUDA context."""
    if opts.engine != "auto":
        return opts.engine
    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    return "vllm" if opts.num_gpus > 0 or _cuda_available() else "transformers"


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
