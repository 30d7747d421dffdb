"""The OpenAI wire format of the transformers server: request parameters, errors, usage.

What `/v1/completions` and `/v1/chat/completions` accept and how they fail (`{"error": {...}}` with the
status vLLM and the OpenAI API use), kept apart from the engine (which only sees `GenRequest`s) and from
the Ray Serve deployment (`kubetune.serving.server`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, message: str, *, status: int = 400, type: str = "BadRequestError",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code or self.status}}


def param(body: Mapping[str, Any], name: str, types: tuple[type, ...], default: Any = None) -> Any:
    """`body[name]` when it is one of `types` (a bool is not an int here), else `default` when absent."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        raise OpenAIError(f"'{name}' must be {wanted}, got {value!r}", param=name)
    return value


def stops(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise OpenAIError("'stop' must be a non-empty string or a list of them", param="stop")
    return list(items)


def reject_unsupported(body: Mapping[str, Any]) -> None:
    """Parameters the transformers engine does not implement: refused, never silently ignored."""
    unsupported = {"stream": False, "echo": False, "logprobs": None, "top_logprobs": None, "logit_bias": None,
                   "presence_penalty": 0, "frequency_penalty": 0, "suffix": None, "tools": None}
    for name, neutral in unsupported.items():
        if body.get(name) not in (neutral, None, False, {}):
            raise OpenAIError(f"'{name}' is not supported by this server (transformers engine)", param=name)
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise OpenAIError(f"only {name}=1 is supported by this server (transformers engine)", param=name)


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise OpenAIError("message content must be a string or a list of text parts", param="messages")


class Counted(Protocol):
    """A generation result's token counts."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...


def usage(results: Sequence[Counted]) -> dict[str, int]:
    """The `usage` object of a response."""
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
