"""Many completions against an OpenAI-compatible server (the kubetune Serve app, vLLM, or any other).

Used by the evaluator and the benchmarks. Plain `openai` client: no Ray, no torch. Requests run
concurrently (up to `concurrency` in flight, which is what lets the server batch them); results come back
in input order. The openai client retries transient failures itself (connection errors, timeouts, 408,
409, 429, 5xx, with backoff); a request that still fails, or fails permanently (400, 404, ...), is
recorded on its item and never raises, so one bad prompt does not lose a whole evaluation.

A failed request's `error` (it goes into results.json and the report) is the HTTP status and a bounded,
escaped excerpt of the server's message, with the API key and any echo of the prompt blanked out: a server
may quote what it was sent, or the key it refused.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import openai

from kubetune.contract.redact import excerpt


@dataclass(frozen=True)
class Completion:
    """One prompt's answer. `error` is set (and text empty) when the request failed."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    finish_reason: str | None
    error: str | None = None


def _api_key(api_key: str | None) -> str:
    # The openai client insists on a key; servers without auth ignore it.
    return api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "EMPTY")


def _describe(e: openai.OpenAIError, api_key: str | None = None, sent: Sequence[str] = ()) -> str:
    """`HTTP 400: <excerpt of the server's message>` or `APIConnectionError: Connection error.`, with
    `api_key` and echoes of the `sent` text (the prompt) blanked out."""
    if isinstance(e, openai.APIStatusError):
        body = e.body
        message = body.get("message") if isinstance(body, dict) else None
        return f"HTTP {e.status_code}: {excerpt(str(message or e.message), secrets=[api_key], echoes=sent)}"
    return f"{type(e).__name__}: {excerpt(str(e), secrets=[api_key], echoes=sent)}"


async def complete_all(base_url: str, model: str, prompts: Sequence[str], *, max_tokens: int,
                       temperature: float = 0.0, stop: Sequence[str] | None = None, concurrency: int = 32,
                       api_key: str | None = None, chat: bool = False, timeout_s: float = 600,
                       retries: int = 2, extra_body: Mapping[str, Any] | None = None) -> list[Completion]:
    """Complete every prompt (`/v1/completions`, or `/v1/chat/completions` with the prompt as one user
    message when `chat`), at most `concurrency` at a time; results in the order of `prompts`.

    `extra_body` is sent as is (server extensions, e.g. vLLM's `stop_token_ids` or `skip_special_tokens`).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    semaphore = asyncio.Semaphore(concurrency)
    stops = list(stop) if stop else None
    extra = dict(extra_body) if extra_body else None
    key = _api_key(api_key)
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=timeout_s,
                                  max_retries=retries) as client:

        async def one(prompt: str) -> Completion:
            async with semaphore:
                started = time.perf_counter()
                try:
                    if chat:
                        response = await client.chat.completions.create(
                            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                            temperature=temperature, stop=stops, extra_body=extra)
                        choice = response.choices[0]
                        text, finish, usage = choice.message.content or "", choice.finish_reason, response.usage
                    else:
                        completion = await client.completions.create(
                            model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                            stop=stops, extra_body=extra)
                        first = completion.choices[0]
                        text, finish, usage = first.text, first.finish_reason, completion.usage
                except openai.OpenAIError as e:
                    return Completion("", 0, 0, time.perf_counter() - started, None, _describe(e, key, [prompt]))
                return Completion(text, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                                  time.perf_counter() - started, finish)

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def complete_all_sync(base_url: str, model: str, prompts: Sequence[str], **kwargs: Any) -> list[Completion]:
    """`complete_all` from synchronous code (not from inside a running event loop)."""
    return asyncio.run(complete_all(base_url, model, prompts, **kwargs))


def wait_ready(base_url: str, model: str, timeout_s: float = 600, *, api_key: str | None = None,
               poll_s: float = 1.0) -> None:
    """Block until `GET /v1/models` at `base_url` lists `model`; TimeoutError (with the last answer or
    error) after `timeout_s`. For servers still loading a checkpoint, or a RayService rolling out."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    key = _api_key(api_key)
    with openai.OpenAI(base_url=base_url, api_key=key, timeout=max(poll_s, 5.0),
                       max_retries=0) as client:
        while True:
            try:
                served = [m.id for m in client.models.list()]
                if model in served:
                    return
                last = f"serving {excerpt(str(served), secrets=[key])}, not {model!r}"
            except openai.OpenAIError as e:
                last = _describe(e, key)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{base_url} did not serve {model!r} within {timeout_s:.0f}s ({last})")
            time.sleep(poll_s)
