"""The OpenAI-compatible server: one checkpoint behind `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions` on Ray Serve, with two engines behind the same wire format:

- **vllm**: `ray.serve.llm` (`LLMConfig` + `build_openai_app`) with the vLLM engine: continuous batching,
  paged attention. What the GPU image runs on a cluster. `ray.serve.llm` needs the regular (CUDA) `vllm`
  package; it does not import without it.
- **transformers**: a Ray Serve deployment (`TransformersServer`) with a FastAPI ingress around
  `kubetune.serving.engine.TransformersEngine`. The fallback where vLLM cannot run (CPU machines, CI):
  concurrent requests are gathered with `@serve.batch` and generated as one batch.

`engine="auto"` picks vllm when it is installed and a GPU is there, else transformers.

Entry points: `build_app(ServeOptions)`; `app_builder(args)` for a RayService's `serveConfigV2`
(`import_path: kubetune.serving.server:app_builder`, camelCase `args`); `serve_locally(opts, name=...)`
for tests, the evaluator and benchmarks on local Ray (several apps side by side under `/<name>`).

No `from __future__ import annotations`: Ray pickles the deployment class by value, and FastAPI could then
not resolve a string annotation such as `request: Request` (it would become a required query parameter).
"""

import asyncio
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from kubetune.serving.engine import GenRequest, GenResult, load_engine
from kubetune.serving.options import ServeOptions, cache_dir, options_from_args, resolve_engine
from kubetune.serving.protocol import DEFAULT_COMPLETION_MAX_TOKENS, OpenAIError, reject_unsupported, usage

if TYPE_CHECKING:
    from ray.serve import Application


# ------------------------------------------------------------------------------------ build the app

def build_app(opts: ServeOptions) -> "Application":
    """The Serve application for `opts` (bind it with `serve.run(app, name=..., route_prefix=...)`)."""
    if resolve_engine(opts) == "vllm":
        from ray.serve.llm import build_openai_app

        serving_args: dict[str, Any] = {"llm_configs": [vllm_llm_config(opts)]}
        if opts.num_cpus is not None:
            # The OpenAI router in front of the engine is light; with a CPU budget (local runs) it
            # takes that, not the default whole CPU.
            serving_args["ingress_deployment_config"] = {"ray_actor_options": {"num_cpus": opts.num_cpus}}
        return build_openai_app(serving_args)
    return _transformers_app(opts)


def app_builder(args: dict[str, Any]) -> "Application":
    """Ray Serve application builder for a RayService (`import_path: kubetune.serving.server:app_builder`)."""
    return build_app(options_from_args(args))


def _deployment_scaling(opts: ServeOptions) -> dict[str, Any]:
    if opts.max_replicas is not None and opts.max_replicas > opts.num_replicas:
        return {"autoscaling_config": {"min_replicas": opts.num_replicas, "max_replicas": opts.max_replicas,
                                       "target_ongoing_requests": opts.max_batch_size}}
    return {"num_replicas": opts.num_replicas}


def vllm_llm_config(opts: ServeOptions) -> dict[str, Any]:
    """The `LLMConfig` (as a dict) of the vLLM path.

    The model source: `s3://`/`gs://`/`abfss://`/`azure://` as a Ray LLM cloud mirror (each replica
    downloads it); another URI (`pvc://`: every pod mounts the claim at the same place, `file://`, ...)
    as the local path `resolve_uri` gives; anything else (a plain path or a Hugging Face id) as it is.
    GGUF files are not offered to vLLM (its GGUF support is partial and needs a separate tokenizer):
    serve a Hugging Face checkpoint converted from it. With no GPU
    (`num_gpus` 0) the engine gets Ray Serve LLM's CPU accelerator config, for vLLM's CPU build.
    """
    uri = opts.model_uri
    if uri.endswith(".gguf"):
        raise ValueError(f"{uri}: the vllm engine does not serve GGUF files here; serve a Hugging Face "
                         "checkpoint converted from it")
    source: str | dict[str, str]
    if re.match(r"^(s3|gs|abfss|azure)://", uri):
        source = {"bucket_uri": uri.rstrip("/")}
    elif "://" in uri:
        from kubetune.contract.storage import resolve_uri

        source = str(resolve_uri(uri, cache_dir()))
    else:
        source = uri
    engine_kwargs: dict[str, Any] = {"dtype": opts.dtype, "max_num_seqs": opts.max_batch_size}
    if opts.max_model_len is not None:
        engine_kwargs["max_model_len"] = opts.max_model_len
    if opts.num_gpus > 1:
        engine_kwargs["tensor_parallel_size"] = int(opts.num_gpus)
    deployment: dict[str, Any] = {**_deployment_scaling(opts), "max_ongoing_requests": 4 * opts.max_batch_size}
    if opts.num_cpus is not None:
        # The LLMServer actor itself (Ray Serve LLM adds the engine's own bundle: 1 CPU, or a GPU).
        deployment["ray_actor_options"] = {"num_cpus": opts.num_cpus}
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": opts.model_name, "model_source": source},
        "engine_kwargs": engine_kwargs,
        "deployment_config": deployment,
    }
    if opts.accelerator_type:
        config["accelerator_type"] = opts.accelerator_type
    if opts.num_gpus == 0:
        # vLLM's CPU build: Ray Serve LLM otherwise reserves a GPU bundle for the engine.
        config["accelerator_config"] = {"kind": "cpu"}
    return config


def _transformers_app(opts: ServeOptions) -> "Application":
    actor: dict[str, Any] = {"num_cpus": 1.0 if opts.num_cpus is None else opts.num_cpus,
                             "num_gpus": opts.num_gpus}
    if opts.accelerator_type:
        # Ray's accelerator resource: schedules the replica onto such a node (as ray.serve.llm does).
        actor["accelerator_type"] = opts.accelerator_type
    deployment = TransformersServer.options(  # type: ignore[attr-defined]
        **_deployment_scaling(opts),
        # @serve.batch only fills a batch from requests the replica already holds.
        max_ongoing_requests=2 * opts.max_batch_size + 8,
        ray_actor_options=actor,
    )
    app: Application = deployment.bind(opts)
    return app


# ----------------------------------------------------------------------------------- the deployment

api = FastAPI(title="kubetune transformers server", docs_url=None, redoc_url=None)


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content=e.body())


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as e:
        raise OpenAIError(f"the request body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    return body


@dataclass
class Stats:
    """What batching did on one replica (`GET /v1/kubetune/stats`)."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)

    def record(self, size: int) -> None:
        self.requests += size
        self.batches += 1
        self.largest_batch = max(self.largest_batch, size)
        self.batch_sizes[size] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest_batch,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


# serve.deployment pickles the class (and the FastAPI routes) by value while this module is still loading:
# every global its methods use must be defined above this point.
@serve.deployment(name="TransformersServer")
@serve.ingress(api)
class TransformersServer:
    """The transformers engine behind the OpenAI API, one replica's worth.

    Concurrent requests are gathered by `@serve.batch` (up to max_batch_size, waiting at most
    batch_wait_timeout_s after the first) and generated together; one batch runs at a time, and requests
    arriving meanwhile queue for the next. Generation runs on one worker thread, so the event loop keeps
    accepting requests while a batch runs. The batch wait (default 0.1 s) is what lets a burst of
    requests, which reaches the replica over tens of milliseconds through the proxy, land in one batch;
    it is also added to a lone request's latency.
    """

    def __init__(self, opts: ServeOptions) -> None:
        if opts.torch_threads:
            import torch

            torch.set_num_threads(opts.torch_threads)
        self.opts = opts
        self.engine = load_engine(opts)
        self.stats = Stats()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.generate_batch.set_max_batch_size(opts.max_batch_size)  # type: ignore[attr-defined]
        self.generate_batch.set_batch_wait_timeout_s(opts.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.created = int(time.time())

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.1)  # replaced by opts' values in __init__
    async def generate_batch(self, requests: list[GenRequest]) -> list[GenResult]:
        with self._lock:
            self.stats.record(len(requests))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.engine.generate, requests)

    def _check_model(self, body: Mapping[str, Any]) -> str:
        model = body.get("model")
        if model is None:  # as Ray Serve LLM: the only model served
            return self.opts.model_name
        if model != self.opts.model_name:
            # As vLLM and Ray Serve LLM answer it (and the OpenAI API: 404 model_not_found).
            raise OpenAIError(f"The model `{model}` does not exist; this server serves "
                              f"`{self.opts.model_name}`.", status=404, type="NotFoundError", param="model",
                              code="model_not_found")
        return self.opts.model_name

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.opts.model_name, "object": "model", "created": self.created, "owned_by": "kubetune",
            "root": self.opts.model_uri, "max_model_len": self.engine.context_length}]}

    @api.get("/v1/kubetune/stats")
    async def kubetune_stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.stats.as_dict(), "max_batch_size": self.opts.max_batch_size, "engine": "transformers"}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        model = self._check_model(body)
        reject_unsupported(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise OpenAIError("'prompt' is required: a string or a non-empty list of strings", param="prompt")
        reqs = [self.engine.request(body, self.engine.encode_prompt(p), DEFAULT_COMPLETION_MAX_TOKENS)
                for p in prompts]
        results = await asyncio.gather(*(self.generate_batch(r) for r in reqs))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                            for i, r in enumerate(results)],
                "usage": usage(results)}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        model = self._check_model(body)
        reject_unsupported(body)
        if "messages" not in body:
            raise OpenAIError("'messages' is required", param="messages")
        req = self.engine.request(body, self.engine.encode_chat(body["messages"]), None)
        result: GenResult = await self.generate_batch(req)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": result.finish_reason}],
                "usage": usage([result])}


# ------------------------------------------------------------------------------------ local serving

LOCAL_NUM_CPUS = 0.5
_local: dict[str, Any] = {"port": None, "started_ray": False}
_APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def serve_locally(opts: ServeOptions, *, name: str = "kubetune", port: int | None = None) -> str:
    """Serve `opts` on local Ray under `/<name>`; returns its base URL `http://127.0.0.1:PORT/<name>/v1`.

    Starts Ray (if not initialized) and Serve (on `port`, or a free one) once; later calls add or replace
    the app `name` on the same Serve instance, so several checkpoints are served side by side with
    different base URLs. Replicas take `LOCAL_NUM_CPUS` (0.5) CPUs unless opts.num_cpus says otherwise,
    so two apps fit on 2 CPUs. Blocks until the app is running (models loaded).
    """
    import ray

    if not _APP_NAME.match(name):
        raise ValueError(f"app name {name!r}: use letters, digits, '.', '_' and '-'")
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
        _local["started_ray"] = True
    if _local["port"] is None:
        _local["port"] = _running_serve_port()
    if _local["port"] is None:
        chosen = port or _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": chosen})
        _local["port"] = chosen
    elif port and port != _local["port"]:
        raise ValueError(f"Serve already listens on port {_local['port']}, not {port}")
    if opts.num_cpus is None:
        opts = opts.model_copy(update={"num_cpus": LOCAL_NUM_CPUS})
    serve.run(build_app(opts), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{_local['port']}/{name}/v1"


def delete_local(name: str) -> None:
    """Stop serving the local app `name` (frees its replicas' CPUs and memory)."""
    serve.delete(name)


def shutdown_local() -> None:
    """Shut Serve down, and Ray too if `serve_locally` started it (never `ray stop`)."""
    import ray

    if ray.is_initialized():
        serve.shutdown()  # type: ignore[no-untyped-call]
        if _local["started_ray"]:
            ray.shutdown()
    _local.update(port=None, started_ray=False)


def _running_serve_port() -> int | None:
    """The HTTP port of a Serve instance already running on this Ray cluster (started by someone else)."""
    try:
        from ray.serve.context import _get_global_client
    except ImportError:  # a private API that may move: then we start our own Serve
        return None
    client = _get_global_client(raise_if_no_controller_running=False)
    return int(client.http_config.port) if client is not None else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
