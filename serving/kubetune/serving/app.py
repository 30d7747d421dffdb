"""A Ray Serve application that serves one checkpoint through an OpenAI-compatible API.

Two engines behind the same wire format (`GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`):

- **vllm**: `ray.serve.llm` (`LLMConfig` + `build_openai_app`) with the vLLM engine: continuous batching,
  paged attention. What the GPU image runs on a cluster. `ray.serve.llm` needs the regular (CUDA) `vllm`
  package; it does not import without it.
- **transformers**: a Ray Serve deployment with a FastAPI ingress around a transformers model. The
  fallback where vLLM cannot run (CPU machines, CI): concurrent requests are gathered with `@serve.batch`,
  left-padded, prefilled together and decoded step by step, each row leaving the batch when it is done
  (see `TransformersEngine.generate`). A lone greedy request gets exactly `model.generate`'s answer.

`engine="auto"` picks vllm when it is installed and a GPU is there, else transformers.

Entry points: `build_app(ServeOptions)`; `app_builder(args)` for a RayService's `serveConfigV2`
(`import_path: kubetune.serving.app:app_builder`, camelCase `args`); `serve_locally(opts, name=...)`
for tests, the evaluator and benchmarks on local Ray (several apps side by side under `/<name>`).

Models come through `kubetune.trainer.model` (local directory, `pvc://`, `s3://`..., a `.gguf` file, or a
Hugging Face id), so a checkpoint the trainer wrote is served as it is. No kopf here.

No `from __future__ import annotations`: Ray pickles the deployment class by value, and FastAPI could then
not resolve a string annotation such as `request: Request` (it would become a required query parameter).
"""

import asyncio
import dataclasses
import importlib.util
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

if TYPE_CHECKING:
    import torch
    from ray.serve import Application
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Engine = Literal["auto", "vllm", "transformers"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
CACHE_DIR_ENV = "KUBETUNE_CACHE_DIR"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
PREFILL_GROUP = 8  # prompts prefilled together (sorted by length, so a group pads little)


def cache_dir() -> Path:
    """Where remote checkpoints are copied and GGUF files converted (`$KUBETUNE_CACHE_DIR`)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "kubetune")


# ------------------------------------------------------------------------------------------ options

@dataclass(frozen=True)
class ServeOptions:
    """What to serve and how. `app_builder` takes the same fields in camelCase.

    model_uri: a local directory, `pvc://claim/path`, `s3://...` (any fsspec URL), a `.gguf` file, or a
      Hugging Face model id (anything without `://` that does not exist locally).
    served_model_name: the `model` clients send (default: the last part of model_uri).
    num_cpus: CPUs per replica (None: 1 on a cluster; `serve_locally` uses 0.5 so two transformers apps
      fit on 2 CPUs). With vLLM it is what the router and the LLMServer actor take; Ray Serve LLM adds the
      engine's own bundle (1 CPU on CPU, else the GPUs), so one vLLM app fills a 2-CPU machine.
    max_replicas: with a value above num_replicas, Serve autoscales between the two.
    torch_threads: torch intra-op threads in a transformers replica (None: torch's default, which follows
      OMP_NUM_THREADS).
    dtype: "auto" is the checkpoint's dtype on a GPU and float32 on a CPU (CPU matmuls in 16 bit are slow).
    """

    model_uri: str
    served_model_name: str | None = None
    engine: Engine = "auto"
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.1
    num_replicas: int = 1
    max_replicas: int | None = None
    num_gpus: float = 0.0
    num_cpus: float | None = None
    accelerator_type: str | None = None
    max_model_len: int | None = None
    dtype: Dtype = "auto"
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if not self.model_uri:
            raise ValueError("model_uri must not be empty")
        if self.engine not in get_args(Engine):
            raise ValueError(f"engine must be one of {get_args(Engine)}, not {self.engine!r}")
        if self.dtype not in get_args(Dtype):
            raise ValueError(f"dtype must be one of {get_args(Dtype)}, not {self.dtype!r}")
        for name in ("max_batch_size", "num_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError("max_replicas must be >= num_replicas")
        if self.batch_wait_timeout_s < 0 or self.num_gpus < 0 or (self.num_cpus or 0) < 0:
            raise ValueError("batch_wait_timeout_s, num_gpus and num_cpus must be >= 0")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")

    @property
    def model_name(self) -> str:
        """The name clients use in `model`."""
        if self.served_model_name:
            return self.served_model_name
        tail = self.model_uri.rstrip("/").rsplit("/", 1)[-1]
        return tail.removesuffix(".gguf") or self.model_uri


# camelCase key of a RayService `args` -> ServeOptions field.
_ARG_FIELDS = {re.sub(r"_(\w)", lambda m: m.group(1).upper(), f.name): f.name
               for f in dataclasses.fields(ServeOptions)}
_ARG_TYPES: dict[str, tuple[type, ...]] = {
    "model_uri": (str,), "served_model_name": (str,), "engine": (str,), "max_batch_size": (int,),
    "batch_wait_timeout_s": (int, float), "num_replicas": (int,), "max_replicas": (int,),
    "num_gpus": (int, float), "num_cpus": (int, float), "accelerator_type": (str,), "max_model_len": (int,),
    "dtype": (str,), "torch_threads": (int,),
}


def options_from_args(args: Mapping[str, Any]) -> ServeOptions:
    """ServeOptions from a RayService's camelCase `args`: TypeError (wrong type) or ValueError (unknown
    key, missing modelUri, bad value) naming the first bad key."""
    if not isinstance(args, Mapping):
        raise TypeError(f"args must be a mapping of {sorted(_ARG_FIELDS)}, got {type(args).__name__}")
    unknown = sorted(set(args) - set(_ARG_FIELDS))
    if unknown:
        raise ValueError(f"unknown serving arg {unknown[0]!r}; known args: {', '.join(sorted(_ARG_FIELDS))}")
    if "modelUri" not in args:
        raise ValueError("serving arg 'modelUri' is required")
    values: dict[str, Any] = {}
    for key, value in args.items():
        name = _ARG_FIELDS[key]
        if value is None and name != "model_uri":
            continue
        types = _ARG_TYPES[name]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            raise TypeError(f"serving arg {key!r} must be {wanted}, got {value!r}")
        values[name] = value
    try:
        return ServeOptions(**values)
    except ValueError as e:
        # ServeOptions names the snake_case field: say which arg that is.
        bad = next((k for k, n in _ARG_FIELDS.items() if n in str(e)), None)
        raise ValueError(f"serving arg {bad!r}: {e}" if bad else f"serving args: {e}") from e


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
    """Ray Serve application builder for a RayService (`import_path: kubetune.serving.app:app_builder`)."""
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
    serve them with the transformers engine, or serve the checkpoint `convert_gguf` writes. With no GPU
    (`num_gpus` 0) the engine gets Ray Serve LLM's CPU accelerator config, for vLLM's CPU build.
    """
    uri = opts.model_uri
    if uri.endswith(".gguf"):
        raise ValueError(f"{uri}: the vllm engine does not serve GGUF files here; use engine='transformers' "
                         "or the checkpoint kubetune.trainer.model.convert_gguf writes")
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


# --------------------------------------------------------------------------------- OpenAI wire format

class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, message: str, *, status: int = 400, type: str = "BadRequestError",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code or self.status}}


@dataclass(frozen=True)
class GenRequest:
    """One sequence to generate. `stop_ids` end it like EOS (the tokenizer's EOS ids are always added);
    `stop` strings are searched in the decoded text, which is cut before them."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


def _param(body: Mapping[str, Any], name: str, types: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        raise OpenAIError(f"'{name}' must be {wanted}, got {value!r}", param=name)
    return value


def _stops(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise OpenAIError("'stop' must be a non-empty string or a list of them", param="stop")
    return list(items)


def _reject_unsupported(body: Mapping[str, Any]) -> None:
    """Parameters the transformers engine does not implement: refused, never silently ignored."""
    unsupported = {"stream": False, "echo": False, "logprobs": None, "top_logprobs": None, "logit_bias": None,
                   "presence_penalty": 0, "frequency_penalty": 0, "suffix": None, "tools": None}
    for name, neutral in unsupported.items():
        if body.get(name) not in (neutral, None, False, {}):
            raise OpenAIError(f"'{name}' is not supported by this server (transformers engine)", param=name)
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise OpenAIError(f"only {name}=1 is supported by this server (transformers engine)", param=name)


# ------------------------------------------------------------------------------------------ engine

class TransformersEngine:
    """Tokenizing, request validation against the context, and batched generation.

    Plain Python (no Ray), so it is tested directly; `TransformersServer` puts it behind HTTP.
    """

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                 max_model_len: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        eos: set[int] = set()
        for ids in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            eos.update([ids] if isinstance(ids, int) else (ids or []))
        if not eos:
            raise ValueError("the tokenizer and the model's generation config name no EOS token")
        self.eos_ids = frozenset(eos)
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
        limits = [n for n in (max_model_len, getattr(model.config, "max_position_embeddings", None)) if n]
        self.context_length: int = min(limits) if limits else 2048
        # Special tokens that are one token: a `stop` string equal to one ends generation on its id (the
        # token never shows in text decoded without special tokens, e.g. a template's <END_A>).
        self.special_ids: dict[str, int] = {}
        for token in tokenizer.all_special_tokens:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                self.special_ids[token] = token_id

    # -- requests

    def encode_prompt(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer(prompt)["input_ids"]
        return ids

    def encode_chat(self, messages: Any) -> list[int]:
        """The prompt of a chat: the tokenizer's chat template with the assistant's turn opened."""
        if not self.tokenizer.chat_template:
            raise OpenAIError("this model's tokenizer has no chat template: use /v1/completions",
                              param="messages")
        if not isinstance(messages, list) or not messages:
            raise OpenAIError("'messages' must be a non-empty list", param="messages")
        plain = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise OpenAIError("each message needs a 'role' and 'content'", param="messages")
            plain.append({"role": m["role"], "content": _message_text(m.get("content"))})
        text = self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        ids: list[int] = self.tokenizer(cast(str, text), add_special_tokens=False)["input_ids"]
        return ids

    def request(self, body: Mapping[str, Any], prompt_ids: list[int], default_max_tokens: int | None) -> GenRequest:
        """A GenRequest from an OpenAI request body (sampling params, stop) and the encoded prompt."""
        n_prompt = len(prompt_ids)
        room = self.context_length - n_prompt
        if room < 1:
            raise OpenAIError(f"This model's maximum context length is {self.context_length} tokens; the "
                              f"prompt has {n_prompt} tokens.", param="prompt")
        max_tokens = _param(body, "max_tokens", (int,), None)
        max_tokens = _param(body, "max_completion_tokens", (int,), max_tokens)
        if max_tokens is None:
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        if max_tokens < 1:
            raise OpenAIError("'max_tokens' must be >= 1", param="max_tokens")
        if n_prompt + max_tokens > self.context_length:
            raise OpenAIError(f"This model's maximum context length is {self.context_length} tokens; "
                              f"{n_prompt} prompt tokens + max_tokens {max_tokens} exceed it.", param="max_tokens")
        temperature = float(_param(body, "temperature", (int, float), 1.0))
        top_p = float(_param(body, "top_p", (int, float), 1.0))
        if temperature < 0 or not 0 < top_p <= 1:
            raise OpenAIError("'temperature' must be >= 0 and 'top_p' in (0, 1]",
                              param="temperature" if temperature < 0 else "top_p")
        extra_ids = _param(body, "stop_token_ids", (list,), [])  # vLLM's extension
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in extra_ids):
            raise OpenAIError("'stop_token_ids' must be a list of integers", param="stop_token_ids")
        stops, stop_ids = [], set(extra_ids)
        for s in _stops(body):
            if s in self.special_ids:
                stop_ids.add(self.special_ids[s])
            else:
                stops.append(s)
        return GenRequest(prompt_ids=tuple(prompt_ids), max_tokens=max_tokens, temperature=temperature,
                          top_p=top_p, seed=_param(body, "seed", (int,), None), stop=tuple(stops),
                          stop_ids=frozenset(stop_ids))

    # -- generation

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Results in the order of `requests`, all generated as one batch.

        Prompts are prefilled in groups of similar length (see `_prefill`) and their KV caches joined,
        left-padded; then one decoding step at a time, every row with its own limits: a row leaves the batch (its KV-cache rows are dropped) as soon as it hits EOS or one
        of its stop ids, its max_tokens, or a stop string, so finished rows cost nothing while long ones go
        on. Sampling is per row too (temperature, top_p, and a `seed` gives the row its own random
        generator), so requests with different parameters share a batch and a seeded request's answer
        does not depend on what it was batched with. Greedy rows take the argmax, as `generate` does.
        """
        import torch

        if not requests:
            return []
        device = self.model.device
        generators = [_generator(r.seed, device) for r in requests]
        generated: list[list[int]] = [[] for _ in requests]
        active = list(range(len(requests)))  # the requests still in the batch, in batch order
        with torch.inference_mode():
            logits, cache, attention_mask, position_ids = self._prefill(requests)
            while True:
                tokens = self._choose(logits, [requests[i] for i in active], [generators[i] for i in active])
                keep = []
                for row, (i, token) in enumerate(zip(active, tokens, strict=True)):
                    generated[i].append(token)
                    if not self._finished(requests[i], generated[i]):
                        keep.append(row)
                if not keep:
                    break
                next_positions = position_ids[:, -1:] + 1
                step_tokens = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
                if len(keep) < len(active):
                    index = torch.tensor(keep, dtype=torch.long, device=device)
                    cache.batch_select_indices(index)
                    attention_mask, next_positions, step_tokens = (
                        attention_mask[index], next_positions[index], step_tokens[index])
                    active = [active[row] for row in keep]
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
                position_ids = next_positions
                logits = self._forward(step_tokens, attention_mask, position_ids, cache)
        return [self._result(r, g) for r, g in zip(requests, generated, strict=True)]

    def _prefill(self, requests: Sequence[GenRequest]) -> tuple["torch.Tensor", Any, "torch.Tensor", "torch.Tensor"]:
        """Next-token logits, the KV cache, attention mask and position ids of every prompt, in order.

        Prompts of one batch differ in length (ViGGO sentences: 20 to 75 tokens), and a left-padded
        prefill spends its compute on the padding too (40-50% of it on such a batch). So the prompts are
        sorted by length and prefilled in groups of PREFILL_GROUP, each padded only to its own longest;
        the groups' caches are then left-padded (zeros, masked) to the batch's longest and joined. Models
        with sliding-window layers get one padded prefill (their caches do not join this way).
        """
        import torch
        from transformers import DynamicCache

        device = self.model.device
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long, device=device)
        # As `generate` does for left padding: positions count real tokens only.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        order = sorted(range(len(requests)), key=lambda i: lengths[i])
        groups = [order[k:k + PREFILL_GROUP] for k in range(0, len(order), PREFILL_GROUP)]
        caches, logits = [], []
        for group in groups:
            cache = DynamicCache(config=self.model.config)
            if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
                return self._forward(self._padded(requests), mask, positions, cache), cache, mask, positions
            g_width = max(lengths[i] for i in group)
            rows = torch.tensor(group, dtype=torch.long, device=device)
            logits.append(self._forward(self._padded([requests[i] for i in group]), mask[rows, -g_width:],
                                        positions[rows, -g_width:], cache))
            caches.append(cache)
        back = torch.tensor(sorted(range(len(order)), key=order.__getitem__), dtype=torch.long, device=device)

        def joined(tensors: list["torch.Tensor"]) -> "torch.Tensor":  # [rows, heads, seq, dim] each
            padded = [torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0)) for t in tensors]
            return torch.cat(padded)[back]

        merged = DynamicCache(ddp_cache_data=[
            (joined([c.layers[k].keys for c in caches]), joined([c.layers[k].values for c in caches]))
            for k in range(len(caches[0].layers))], config=self.model.config)
        return torch.cat(logits)[back], merged, mask, positions

    def _padded(self, requests: Sequence[GenRequest]) -> "torch.Tensor":
        """The prompts as one left-padded batch of input ids."""
        import torch

        width = max(len(r.prompt_ids) for r in requests)
        return torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + list(r.prompt_ids) for r in requests],
                            dtype=torch.long, device=self.model.device)

    def _forward(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor", position_ids: "torch.Tensor",
                 cache: Any) -> "torch.Tensor":
        """The next-token logits (float32) of each row."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def _choose(self, logits: "torch.Tensor", requests: Sequence[GenRequest],
                generators: Sequence["torch.Generator | None"]) -> list[int]:
        """The next token of each row: argmax when greedy, else a top-p sample at the row's temperature."""
        import torch

        tokens: list[int] = logits.argmax(dim=-1).tolist()
        for row, (r, gen) in enumerate(zip(requests, generators, strict=True)):
            if r.temperature == 0:
                continue
            probs = torch.softmax(logits[row] / r.temperature, dim=-1)
            if r.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= r.top_p  # never the most likely token
                probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
            tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
        return tokens

    def _finished(self, request: GenRequest, generated: list[int]) -> bool:
        return (len(generated) >= request.max_tokens or generated[-1] in self.eos_ids
                or generated[-1] in request.stop_ids
                or bool(request.stop) and _first_stop(self._decode(generated), request.stop) is not None)

    def _result(self, request: GenRequest, generated: list[int]) -> GenResult:
        """Cut one row at its first stop id (counted, as vLLM counts EOS), its length limit or the first
        stop string (the tokens up to the one that completed it are counted; the text ends before it)."""
        tokens = generated[:request.max_tokens]
        finish: Literal["stop", "length"] = "length"
        stop_ids = self.eos_ids | request.stop_ids
        for k, token in enumerate(tokens):
            if token in stop_ids:
                tokens, finish = tokens[:k + 1], "stop"
                break
        text_tokens = tokens[:-1] if finish == "stop" else tokens
        text = self._decode(text_tokens)
        cut = _first_stop(text, request.stop)
        if cut is None:
            return GenResult(text, len(request.prompt_ids), len(tokens), finish)
        count = next(k for k in range(1, len(text_tokens) + 1)
                     if _first_stop(self._decode(text_tokens[:k]), request.stop) is not None)
        return GenResult(text[:cut], len(request.prompt_ids), count, "stop")

    def _decode(self, tokens: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        return cast(str, text)


def _generator(seed: int | None, device: "torch.device") -> "torch.Generator | None":
    """A row's own random generator when it has a seed (else the global one)."""
    if seed is None:
        return None
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise OpenAIError("message content must be a string or a list of text parts", param="messages")


def load_engine(opts: ServeOptions) -> TransformersEngine:
    """Model and tokenizer of `opts.model_uri` through kubetune.trainer.model (s3/pvc/GGUF/hub id)."""
    import torch

    from kubetune.trainer.model import ModelSource, load_model, load_tokenizer

    uri = opts.model_uri
    is_path = "://" in uri or uri.startswith((".", "/", "~")) or Path(uri).exists()
    source = (ModelSource.resolve(uri=str(Path(uri).expanduser()) if "://" not in uri else uri,
                                  cache_dir=cache_dir())
              if is_path else ModelSource.resolve(name=uri, cache_dir=cache_dir()))
    use_gpu = opts.num_gpus > 0 and torch.cuda.is_available()  # from_pretrained returns it in eval mode
    dtype: Any = opts.dtype if opts.dtype != "auto" else ("auto" if use_gpu else torch.float32)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    tokenizer = load_tokenizer(source, cache_dir())
    model = load_model(source, cache_dir(), dtype=dtype)
    if use_gpu:
        model.cuda()  # type: ignore[call-arg]  # transformers wraps nn.Module.cuda
    return TransformersEngine(model, tokenizer, max_model_len=opts.max_model_len)


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


def _usage(results: Sequence[GenResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
        _reject_unsupported(body)
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
                "usage": _usage(results)}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        model = self._check_model(body)
        _reject_unsupported(body)
        if "messages" not in body:
            raise OpenAIError("'messages' is required", param="messages")
        req = self.engine.request(body, self.engine.encode_chat(body["messages"]), None)
        result: GenResult = await self.generate_batch(req)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": result.finish_reason}],
                "usage": _usage([result])}


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
        opts = dataclasses.replace(opts, num_cpus=LOCAL_NUM_CPUS)
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
