"""How faults become verdicts, for both kinds: what stops a job for good, and what is tried again.

- A child name taken by an object the job does not control (`kube.NotOwned`) -> Failed/ChildConflict.
- An API answer no retry can change (`kube.is_rejection`: 400, 403, 404 on create, 413, 422) ->
  Failed/ApiRejected, with the apiserver's message, truncated.
- A child that would exceed the API's size limits -> Failed/ApiRejected before the call, naming the spec
  field that made it large.
- Anything else the API answers (409, 429, 5xx, timeouts, dropped connections) is transient: the handler
  retries it with capped exponential backoff and jitter (`backoff`), honouring Retry-After.

No kopf here: the handlers turn `Rejected` into kopf.PermanentError and the rest into TemporaryError.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from kubetune.operator import kube
from kubetune.operator.kube import Obj

MESSAGE_LIMIT = 512  # of an apiserver message quoted in a condition
# What the API server stores: a ConfigMap's data at most 1 MiB; any object at most ~1.5 MiB (etcd's limit).
CONFIG_MAP_DATA_LIMIT = 1024 * 1024
OBJECT_LIMIT = 3 * 512 * 1024

BACKOFF_BASE = float(os.environ.get("KUBETUNE_BACKOFF_BASE", "1"))
BACKOFF_CAP = float(os.environ.get("KUBETUNE_BACKOFF_CAP", "60"))


class WaitFor(Exception):
    """The job cannot go on yet; try again after `delay` seconds."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class Rejected(Exception):
    """The job can never run as specified; it has been marked Failed."""


Fail = Callable[[str, str], Awaitable[None]]  # (reason, message): writes Failed, raises Rejected


def truncated(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line, at most `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


@contextlib.asynccontextmanager
async def api_verdicts(fail: Fail) -> AsyncIterator[None]:
    """Turn a foreign child and a permanent API refusal inside the block into the job's Failed verdict."""
    try:
        yield
    except kube.NotOwned as exc:
        await fail("ChildConflict", f"{exc}: kubetune never adopts an object it did not create. Delete or "
                   "rename it, then re-create the job.")
    except kube.KubeError as exc:
        if not kube.is_rejection(exc):
            raise
        await fail("ApiRejected", f"The API server refused {exc.method or 'a request'} ({exc.status} "
                   f"{exc.reason}): {truncated(exc.message)}")


def backoff(retry: int, retry_after: float | None = None) -> float:
    """Seconds before retry number `retry` (0-based): capped exponential with full jitter, never less than
    the server's Retry-After."""
    delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(retry, 20)) * random.uniform(0.5, 1.0)
    return float(max(delay, retry_after or 0.0))


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def largest_field(value: Any, path: str) -> str:
    """The deepest path under `path` that holds most of `value`'s size (more than half at every step)."""
    while True:
        items: list[tuple[str, Any]]
        if isinstance(value, dict):
            items = [(f"{path}.{k}", v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            return path
        if not items:
            return path
        total = _size(value)
        sub_path, sub = max(items, key=lambda item: _size(item[1]))
        if _size(sub) * 2 <= total:
            return path
        path, value = sub_path, sub


def too_large(obj: Obj, spec: Callable[[], Obj], spec_path: str = "spec") -> str | None:
    """Why the API would refuse `obj` for its size (None if it fits), naming the part of `spec()` (the job's
    spec on the wire, where `obj` got its bulk; built only for an object that does not fit) that made it
    large."""
    if obj.get("kind") == "ConfigMap":
        size, limit, what = _size(obj.get("data") or {}), CONFIG_MAP_DATA_LIMIT, "data"
    else:
        size, limit, what = _size(obj), OBJECT_LIMIT, "object"
    if size <= limit:
        return None
    meta = obj.get("metadata") or {}
    return (f"{obj.get('kind')} {meta.get('name')} would be {size:,} bytes of {what}, over the API's "
            f"limit of {limit:,}: {largest_field(spec(), spec_path)} is too large")
