"""A stateful fake Kubernetes API server for tests, served over real HTTP.

``FakeKubeAPI`` runs an aiohttp server in a daemon thread with its own event loop, so kopf, the
``kubernetes`` Python client and the real ``kubectl`` can talk to it exactly as to a cluster::

    with FakeKubeAPI() as api:
        api.install_crds_from_files(["crds/finetunejob.yaml"])
        api.kubeconfig(tmp_path / "kubeconfig")
        ...

It is also runnable as a process: ``python -m support.fakekube --port 8001 --crd FILE``.

Faithful to a real kube-apiserver (1.35):

* Object metadata: ``uid``, ``creationTimestamp``, ``generateName``, one global increasing
  ``resourceVersion`` bumped by every real change (a write that changes nothing is a no-op, as
  on a real server: no new resourceVersion and no watch event); ``generation`` for custom
  resources, CRDs, deployments, jobs and pods, bumped by changes outside metadata (and outside
  status where there is a status subresource) and when deletion starts.
* Errors are ``Status`` objects with the real reasons, codes, details and message wording:
  NotFound, AlreadyExists, Conflict (stale ``resourceVersion``), Invalid (422, naming each field),
  BadRequest, Forbidden (creating in a terminating namespace), Expired (410 in watch streams),
  MethodNotAllowed, UnsupportedMediaType.
* The status subresource: the main endpoint ignores ``.status``, ``/status`` changes only
  ``.status``; status is dropped on create.
* Verbs: get, list (one namespace or all), create, update (PUT; custom resources require
  ``metadata.resourceVersion``), patch (merge, JSON, strategic-merge patches and server-side
  apply), delete and deletecollection, with DeleteOptions preconditions and ``dryRun=All``.
* Finalizers delay deletion (``deletionTimestamp`` set; removal once they are emptied, with a
  single DELETED event); no new finalizers may be added while deleting.
* Garbage collection by ``ownerReferences``: background cascading deletion (recursive), a
  dependent survives while another owner lives, Orphan propagation strips the references, and a
  dependent whose owners do not exist (wrong uid, other namespace) is collected shortly after
  it is written.
* Namespaces terminate: deleting one deletes its content and removes it once empty; creating in
  it meanwhile is forbidden. CRDs carry the ``customresourcecleanup`` finalizer and delete their
  instances first.
* Lists (``<Kind>List``; built-in list items carry no kind/apiVersion, as on a real server) and
  watches with label selectors (``=``, ``==``, ``!=``, exists, ``!``, ``in``, ``notin``, ``<``,
  ``>``) and field selectors (custom resources: ``metadata.name``, ``metadata.namespace`` and the
  CRD's ``selectableFields``); watch from a ``resourceVersion`` (replayed from history; 410
  Expired when it is too old), ``sendInitialEvents``, bookmarks, ``timeoutSeconds`` (which must
  be an integer, as on a real server); objects moving in or out of a watch's selector arrive
  as ADDED or DELETED.
* Discovery (``/version``, ``/api``, ``/apis``, group and group-version resource lists with short
  names, categories, verbs and ``<plural>/status``); CRDs are served as soon as they are
  written, in every served version (conversion strategy None: only apiVersion changes), with
  the versions' deprecation warnings as ``Warning`` headers.
* Server-side printing: ``Accept: ...;as=Table;g=meta.k8s.io;v=v1`` returns a Table with the
  CRD's ``additionalPrinterColumns`` (JSONPath, including ``[?(@.type=="Ready")]`` filters;
  ``date`` columns rendered as ages like kubectl's AGE) or, without any, Name and Age, as the
  real server does; ``includeObject`` is honoured.
* Custom resources are pruned, defaulted and validated against their version's
  ``openAPIV3Schema`` (``nullable``, ``x-kubernetes-int-or-string``,
  ``x-kubernetes-preserve-unknown-fields``, ``x-kubernetes-embedded-resource``, list-type
  uniqueness) and, when the pure-Python ``cel-python`` package is installed, against
  ``x-kubernetes-validations`` CEL rules, transition rules with ``oldSelf`` included (and, as on
  a real server, not after type/required/enum errors); messages read like the real server's.
  ``fieldValidation=Strict`` turns pruned unknown fields into a 400. Metadata is validated too:
  names (RFC 1123), labels, the 256 KiB annotation limit (why client-side ``kubectl apply`` of
  KubeRay CRDs fails), owner references.
* ``/openapi/v3`` serves skeleton documents (operations and their ``fieldValidation`` parameter,
  no schemas): enough for ``kubectl apply``/``create``/``diff`` to validate on the server, so
  ``--validate=false`` is not needed.
* Secrets turn ``stringData`` into ``data``; namespaces get their
  ``kubernetes.io/metadata.name`` label, ``spec.finalizers`` and phase; pods start Pending.
* Pod logs (``GET .../pods/<name>/log``, ``text/plain``): what the test wrote with ``write_pod_log``;
  ``container`` (required when the pod has several; 400 for an unknown one), ``tailLines``,
  ``limitBytes``, ``follow`` (a chunked stream that ends when the container has terminated: the pod
  Succeeded or Failed, or its status says the container terminated; or the pod is deleted). A container
  that has not started (pod Pending, or a ``waiting`` container status) answers 400 "is waiting to start";
  ``previous`` answers 400 (pods never restart here).

Faults, for tests (off unless asked for): ``fail_next`` answers chosen requests with an error;
``ChaosConfig`` answers a seeded random share of some clients' requests with a 409, 500 or 429 (with
``Retry-After``), or breaks their watch streams (a 410 Expired ``ERROR`` event, a cut connection), counting
what it injected; ``hold_next`` stalls chosen requests until the test serves or drops them (e.g. to SIGKILL
a client exactly between two of its requests).

Not faithful (deliberately):

* No authentication or authorization; no admission webhooks; no API priority and fairness.
* No controllers beyond garbage collection and namespace/CRD cleanup: pods never run,
  deployments make no replica sets, jobs never finish, services get no cluster IP.
* Garbage collection runs inside the deleting request (a real one is asynchronous);
  Foreground propagation behaves like Background.
* Namespaces are created on demand when an object is written into a missing one.
* Strategic merge patch is applied as a JSON merge patch after dropping ``$``-directives (lists
  are replaced, never merged by key). Server-side apply (``kubectl apply --server-side``, Helm 4)
  is simplified the same way: it creates, or merges the applied configuration and removes what
  the same field manager applied before and no longer does; no conflicts between managers (as
  if ``force=true``), lists replaced.
* No ``managedFields``, no paging (``limit``/``continue`` are ignored: one page holds all), no
  aggregated discovery (clients fall back to the plain form), no OpenAPI schemas (``kubectl
  explain`` fails; ``/openapi/v2`` is 404), no ``/exec``, ``/attach``, ``/scale``. Pod logs have no
  ``timestamps``, ``sinceSeconds`` or ``sinceTime`` (400 from the fake, saying so).
* Request bodies are JSON or YAML, or protobuf for the few kinds client-go's typed clients
  write here (Secret, ConfigMap, Namespace, ServiceAccount, DeleteOptions: Helm's release
  storage and ``kubectl create secret|configmap|namespace|serviceaccount``); other protobuf
  bodies (e.g. ``kubectl create deployment``) get 415. Responses are always JSON (every client
  accepts it).
* ``fieldValidation=Warn`` (the default) prunes silently, without ``Warning`` headers.
* Built-in kinds are stored as given, with no defaulting or validation of their spec (so no
  strict unknown-field checks either); their tables show only Name and Age. core/v1 and
  events.k8s.io/v1 Events are stored separately.
* Schema ``format`` values are not checked; CEL runs without the Kubernetes CEL libraries
  (rules using them, and ``optionalOldSelf`` rules, are recorded in ``skipped_cel_rules`` and
  not enforced); no validation ratcheting; no CEL cost limits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import builtins
import collections
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import operator
import random
import re
import signal
import threading
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, Self

import yaml
from aiohttp import web

log = logging.getLogger(__name__)

JsonObj = dict[str, Any]
ResourceKey = tuple[str, str]  # (group, plural): the storage identity of a resource
ObjectKey = tuple[ResourceKey, str, str]  # (resource, namespace or "", name)
NameRule = Literal["subdomain", "label", "path"]
# The step of a custom resource's admission that rejected a field (Schema.review).
AdmissionStep = Literal["schema", "list-type", "cel"]


class _Missing:
    """Marker for an absent value (``None`` is a valid JSON value)."""


MISSING: Final = _Missing()

CORE_GROUP: Final = ""
CRD_KEY: Final[ResourceKey] = ("apiextensions.k8s.io", "customresourcedefinitions")
NAMESPACE_KEY: Final[ResourceKey] = (CORE_GROUP, "namespaces")
POD_KEY: Final[ResourceKey] = (CORE_GROUP, "pods")
CRD_CLEANUP_FINALIZER: Final = "customresourcecleanup.apiextensions.k8s.io"
ALL_VERBS: Final = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
STATUS_VERBS: Final = ("get", "patch", "update")
SERVER_VERSION: Final = {
    "major": "1",
    "minor": "35",
    "gitVersion": "v1.35.0-fakekube",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-12-17T00:00:00Z",
    "goVersion": "go1.25.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}
MAX_ANNOTATIONS_BYTES: Final = 256 * 1024
APPLY_PATCH: Final = "application/apply-patch+yaml"  # server-side apply
GENERATE_NAME_CHARS: Final = "bcdfghjklmnpqrstvwxz2456789"
YAML_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml parses KubeRay CRDs 10x faster
# Schema errors after which the apiserver does not evaluate CEL rules.
BLOCKING_REASONS: Final = frozenset(
    {
        "FieldValueNotSupported",
        "FieldValueRequired",
        "FieldValueTooLong",
        "FieldValueTooMany",
        "FieldValueTypeInvalid",
    }
)
# Metadata only the server sets; clients cannot change it through writes.
SYSTEM_METADATA: Final = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
)


# --------------------------------------------------------------------------------------------
# Small helpers


def clone(value: Any) -> Any:
    """Deep-copy a JSON value (several times faster than ``copy.deepcopy``)."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


def dumps(value: Any) -> bytes:
    """Serialise compactly to UTF-8 JSON, as the apiserver does."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def now_rfc3339() -> str:
    """The current time as a Kubernetes ``metav1.Time`` string."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> dt.datetime | None:
    """Parse a ``metav1.Time``; None if it is not one."""
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def human_duration(seconds: float) -> str:
    """Render an age like Kubernetes' ``duration.HumanDuration`` (kubectl's AGE column)."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes = whole // 60
    if minutes < 10:
        return f"{minutes}m{whole % 60}s" if whole % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        years, days = divmod(hours // 24, 365)
        return f"{years}y{days}d" if days else f"{years}y"
    return f"{hours // 24 // 365}y"


def go_repr(value: Any) -> str:
    """Render a value the way apiserver field errors quote it."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return '"null"'
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def json_type_name(value: Any) -> str:
    """The OpenAPI type name of a JSON value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "null" if value is None else "object"


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Sort key for Kubernetes version names: GA > beta > alpha > others, newer first."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, 0, 0, version)
    level = {None: 0, "beta": 1, "alpha": 2}[match.group(2)]
    return (level, -int(match.group(1)), -int(match.group(3) or 0), version)


# --------------------------------------------------------------------------------------------
# Errors


@dataclasses.dataclass(frozen=True)
class FieldError:
    """One field-level validation error, as in ``k8s.io/apimachinery/pkg/util/validation/field``."""

    field: str
    reason: str  # FieldValueInvalid, FieldValueRequired, ...
    detail: str  # the text after "<field>: "

    def __str__(self) -> str:
        return f"{self.field}: {self.detail}"

    @classmethod
    def invalid(cls, field: str, value: Any, message: str) -> FieldError:
        return cls(field, "FieldValueInvalid", f"Invalid value: {go_repr(value)}: {message}")

    @classmethod
    def type_invalid(cls, field: str, value: Any, message: str) -> FieldError:
        return cls(field, "FieldValueTypeInvalid", f"Invalid value: {go_repr(value)}: {message}")

    @classmethod
    def required(cls, field: str, message: str = "") -> FieldError:
        return cls(field, "FieldValueRequired", f"Required value: {message}" if message else "Required value")

    @classmethod
    def forbidden(cls, field: str, message: str) -> FieldError:
        return cls(field, "FieldValueForbidden", f"Forbidden: {message}")

    @classmethod
    def unsupported(cls, field: str, value: Any, supported: Iterable[Any]) -> FieldError:
        choices = ", ".join(go_repr(v) for v in supported)
        return cls(
            field,
            "FieldValueNotSupported",
            f"Unsupported value: {go_repr(value)}: supported values: {choices}",
        )

    @classmethod
    def duplicate(cls, field: str, value: Any) -> FieldError:
        return cls(field, "FieldValueDuplicate", f"Duplicate value: {go_repr(value)}")

    @classmethod
    def too_long(cls, field: str, limit: int) -> FieldError:
        return cls(field, "FieldValueTooLong", f"Too long: may not be more than {limit} bytes")

    @classmethod
    def too_many(cls, field: str, count: int, limit: int) -> FieldError:
        return cls(field, "FieldValueTooMany", f"Too many: {count}: must have at most {limit} items")


class ApiError(Exception):
    """An API failure, answered as a ``Status`` object with the HTTP code."""

    def __init__(self, code: int, reason: str, message: str, details: JsonObj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def to_status(self) -> JsonObj:
        status: JsonObj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            status["details"] = self.details
        status["code"] = self.code
        return status


@dataclasses.dataclass
class Fault:
    """An injected error: answered to the next `times` requests of `method` on a path matching `path`."""

    method: str
    path: re.Pattern[str]
    error: ApiError
    times: int
    retry_after: int | None = None


FaultKind = Literal["conflict", "internal", "throttle", "watch-expired", "watch-drop"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = ("conflict", "internal", "throttle", "watch-expired", "watch-drop")
WRITE_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


@dataclasses.dataclass(frozen=True)
class ChaosConfig:
    """Random faults, as a flaky or overloaded apiserver answers them; off unless given to
    ``FakeKubeAPI(chaos=...)`` or :meth:`FakeKubeAPI.inject_random_faults`.

    Every API resource request (not discovery, health or the fake's own endpoints) of a client whose
    User-Agent matches ``clients`` draws once from a ``random.Random(seed)``: with probability ``rate`` it
    is answered with one of the ``kinds`` that applies to it, chosen uniformly, instead of being served:

    * ``conflict``: 409 Conflict, on writes (POST, PUT, PATCH);
    * ``internal``: 500 InternalError;
    * ``throttle``: 429 TooManyRequests with ``Retry-After: <retry_after>``;
    * ``watch-expired``: on a watch, a 410 Expired ``ERROR`` event, then the end of the stream (what a
      real apiserver sends when the watch cache no longer holds the client's resourceVersion);
    * ``watch-drop``: on a watch, the connection cut mid-stream (no chunked terminator).

    A watch draws when it opens (internal, throttle or watch-expired, before any event) and again before
    every batch of events it is about to send (watch-expired or watch-drop, instead of that batch), also
    when it was opened before the faults were turned on.
    A fault always replaces an answer, never follows one: a write answered 409 wrote nothing, and events
    not sent are the client's to recover (resume from its last resourceVersion, or re-list).
    ``limit`` bounds the faults injected in all (None: unbounded). The default ``clients`` are kopf
    (``kopf/<version>``) and plain aiohttp clients (``Python/3.x aiohttp/<version>``): the operator, not
    the tests' urllib, requests or http.client clients.
    """

    seed: int = 0
    rate: float = 0.05
    kinds: frozenset[FaultKind] = frozenset(FAULT_KINDS)
    clients: str = r"^kopf/|aiohttp/"
    retry_after: int = 1
    limit: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown or not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"ChaosConfig: unknown kinds {sorted(unknown)} or rate {self.rate} outside [0, 1]")


@dataclasses.dataclass(frozen=True)
class ChaosRecord:
    """One request of a client the chaos layer targets, as it arrived: the fault that answered it (None:
    served), and a POST's body (the object a create names, an Event's involvedObject). A watch is one record
    (its fault when it opened); faults later in its stream are counted in :attr:`Chaos.injected` only."""

    time: float  # time.monotonic()
    method: str
    path: str
    query: str
    fault: FaultKind | None
    body: bytes | None = None

    @property
    def watch(self) -> bool:
        return self.method == "GET" and is_watch(self.path, self.query)


class Chaos:
    """The random faults of one :class:`ChaosConfig` at work: its draws, what it injected, what it saw."""

    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self._random = random.Random(config.seed)
        self._clients = re.compile(config.clients)
        self._lock = threading.Lock()
        self.injected: collections.Counter[str] = collections.Counter()  # fault kind -> count
        self.records: list[ChaosRecord] = []

    def targets(self, user_agent: str, path: str) -> bool:
        """Whether a request is subject to faults: an API resource request of a targeted client."""
        split = split_api_path(path)
        return bool(split and split[2]) and self._clients.search(user_agent) is not None

    def draw(self, choices: Sequence[FaultKind]) -> FaultKind | None:
        """One draw: a fault among `choices` (those of the config's kinds) with probability `rate`, else None."""
        with self._lock:
            applicable = [kind for kind in choices if kind in self.config.kinds]
            limit = self.config.limit
            if not applicable or (limit is not None and sum(self.injected.values()) >= limit):
                return None
            if self._random.random() >= self.config.rate:
                return None
            kind = self._random.choice(applicable)
            self.injected[kind] += 1
            return kind

    def record(self, record: ChaosRecord) -> None:
        with self._lock:
            self.records.append(record)

    def stats(self) -> JsonObj:
        """Requests seen, faults injected in all and by kind (every kind listed, zeros included)."""
        with self._lock:
            return {"requests": len(self.records), "faults": sum(self.injected.values()),
                    "by_kind": {kind: self.injected[kind] for kind in FAULT_KINDS}}


@dataclasses.dataclass(frozen=True)
class HeldRequest:
    """A request stalled by a :class:`Hold`: what it asked for."""

    method: str
    path: str
    user_agent: str
    body: bytes

    def object(self) -> JsonObj:
        """The request body as JSON ({} when empty or not JSON)."""
        try:
            value = json.loads(self.body or b"{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class Hold:
    """Requests stalled by :meth:`FakeKubeAPI.hold_next`: neither served nor refused until released.

    The test waits for one to arrive (:meth:`wait`), acts (e.g. SIGKILLs the client, which is then
    stopped exactly before that request took effect), then :meth:`release` s them: served as if never
    stalled, or dropped (the connection cut; nothing was written).
    """

    def __init__(self, method: str, path: str, clients: str | None, times: int,
                 when: Callable[[HeldRequest], bool] | None = None) -> None:
        self.method = method
        self.path = re.compile(path)
        self.clients = re.compile(clients) if clients is not None else None
        self.times = times
        self.when = when
        self.held: list[HeldRequest] = []
        self.released: bool | None = None  # None: not yet; else whether they were served
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]]] = []

    def matches(self, method: str, path: str, user_agent: str) -> bool:
        """Whether a request is of the kind this hold is waiting for (its body not yet considered)."""
        return (self.released is None and self.times > 0 and method == self.method and bool(self.path.search(path))
                and (self.clients is None or self.clients.search(user_agent) is not None))

    def claim(self, request: HeldRequest) -> bool:
        """Whether this hold stalls `request` (`when` agrees, if given); counts it."""
        with self._lock:
            if not self.matches(request.method, request.path, request.user_agent):
                return False
            if self.when is not None and not self.when(request):
                return False
            self.times -= 1
            return True

    async def stall(self, request: HeldRequest) -> bool:
        """Keep a claimed request until released; True: serve it, False: drop it."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.released is not None:
                return self.released
            waiter: asyncio.Future[bool] = loop.create_future()
            self._waiters.append((loop, waiter))
            self.held.append(request)
        self._arrived.set()
        return await waiter

    def wait(self, timeout: float) -> HeldRequest | None:
        """The first stalled request, once one has arrived (None after `timeout` seconds)."""
        if not self._arrived.wait(timeout):
            return None
        with self._lock:
            return self.held[0]

    def release(self, serve: bool) -> None:
        """Serve (True) or drop (False) every stalled request; later matches are no longer stalled."""
        with self._lock:
            if self.released is not None:
                return
            self.released = serve
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_settle, waiter, serve)


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def resource_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


# --------------------------------------------------------------------------------------------
# Resource types


@dataclasses.dataclass(frozen=True, eq=False)
class ResourceType:
    """One served group/version/resource: how it is addressed, stored and shown."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    tracks_generation: bool = False
    returns_deleted_object: bool = False
    name_rule: NameRule = "subdomain"
    custom: bool = False
    singular: str = ""
    storage_version: str = ""
    printer_columns: tuple[JsonObj, ...] = ()
    schema: Schema | None = None
    deprecation_warning: str | None = None
    selectable_fields: tuple[str, ...] = ()

    @property
    def key(self) -> ResourceKey:
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_api_version(self) -> str:
        version = self.storage_version or self.version
        return f"{self.group}/{version}" if self.group else version

    @property
    def singular_name(self) -> str:
        return self.singular or self.kind.lower()

    @property
    def qualified_plural(self) -> str:
        """``configmaps`` or ``finetunejobs.kubetune.io``, as in NotFound messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """``ConfigMap`` or ``FineTuneJob.kubetune.io``, as in Invalid messages."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def details(self, name: str, *, kind: str | None = None) -> JsonObj:
        """``Status.details`` naming an object of this resource."""
        details: JsonObj = {"name": name}
        if self.group:
            details["group"] = self.group
        details["kind"] = kind or self.plural
        return details

    def not_found(self, name: str) -> ApiError:
        return ApiError(404, "NotFound", f'{self.qualified_plural} "{name}" not found', self.details(name))

    def conflict(self, name: str, why: str) -> ApiError:
        message = f'Operation cannot be fulfilled on {self.qualified_plural} "{name}": {why}'
        return ApiError(409, "Conflict", message, self.details(name))

    def invalid(self, name: str, errors: Sequence[FieldError]) -> ApiError:
        text = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(str(e) for e in errors) + "]"
        details = self.details(name, kind=self.kind)
        details["causes"] = [{"reason": e.reason, "message": e.detail, "field": e.field} for e in errors]
        return ApiError(422, "Invalid", f'{self.qualified_kind} "{name}" is invalid: {text}', details)


BUILTIN_TYPES: Final = (
    ResourceType(
        "",
        "v1",
        "namespaces",
        "Namespace",
        namespaced=False,
        short_names=("ns",),
        status_subresource=True,
        returns_deleted_object=True,
        name_rule="label",
    ),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    ResourceType(
        "",
        "v1",
        "services",
        "Service",
        short_names=("svc",),
        categories=("all",),
        status_subresource=True,
        returns_deleted_object=True,
        name_rule="label",
    ),
    ResourceType(
        "",
        "v1",
        "pods",
        "Pod",
        short_names=("po",),
        categories=("all",),
        status_subresource=True,
        tracks_generation=True,
        returns_deleted_object=True,
    ),
    ResourceType(
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        short_names=("pvc",),
        status_subresource=True,
    ),
    ResourceType("", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", name_rule="path"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", name_rule="path"),
    ResourceType(
        "rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False, name_rule="path"
    ),
    ResourceType(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        namespaced=False,
        name_rule="path",
    ),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=("netpol",)),
    ResourceType(
        "batch", "v1", "jobs", "Job", categories=("all",), status_subresource=True, tracks_generation=True
    ),
    ResourceType(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        short_names=("deploy",),
        categories=("all",),
        status_subresource=True,
        tracks_generation=True,
    ),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short_names=("crd", "crds"),
        status_subresource=True,
        tracks_generation=True,
        returns_deleted_object=True,
    ),
)


class Registry:
    """The served resource types, by group/version/plural, and the storage version of each."""

    def __init__(self) -> None:
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._storage: dict[ResourceKey, ResourceType] = {}

    def add(self, rt: ResourceType) -> None:
        self._types[(rt.group, rt.version, rt.plural)] = rt
        if not rt.storage_version or rt.storage_version == rt.version:
            self._storage[rt.key] = rt

    def remove(self, key: ResourceKey) -> None:
        """Stop serving every version of a resource."""
        self._types = {gvr: rt for gvr, rt in self._types.items() if rt.key != key}
        self._storage.pop(key, None)

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def storage_type(self, key: ResourceKey) -> ResourceType | None:
        return self._storage.get(key)

    def storage_keys(self) -> list[ResourceKey]:
        return list(self._storage)

    def group_versions(self) -> dict[str, list[str]]:
        """Every group with its versions, most preferred first."""
        groups: dict[str, set[str]] = collections.defaultdict(set)
        for group, version, _ in self._types:
            groups[group].add(version)
        return {g: sorted(vs, key=version_priority) for g, vs in sorted(groups.items())}

    def resources(self, group: str, version: str) -> list[ResourceType]:
        return [rt for (g, v, _), rt in sorted(self._types.items()) if (g, v) == (group, version)]


# --------------------------------------------------------------------------------------------
# Selectors

_SELECTOR_KEY = r"[^\s!=<>(),]+"
_SET_REQUIREMENT = re.compile(rf"\s*(?P<key>{_SELECTOR_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*")
_CMP_REQUIREMENT = re.compile(
    rf"\s*(?P<key>{_SELECTOR_KEY})\s*(?P<op>==|!=|=|<|>)\s*(?P<value>[^\s!=<>(),]*)\s*"
)
_EXISTS_REQUIREMENT = re.compile(rf"\s*(?P<op>!?)\s*(?P<key>{_SELECTOR_KEY})\s*")


def _split_selector(text: str) -> list[str]:
    """Split at top-level commas (not those inside ``in (a,b)``)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One selector term: ``key op values``."""

    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!", "<", ">"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, Any]) -> bool:
        present = self.key in labels
        value = str(labels.get(self.key, ""))
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        try:
            number = int(value)
        except ValueError:
            return False
        limit = int(self.values[0])
        return present and (number < limit if self.op == "<" else number > limit)


def parse_selector(text: str) -> tuple[Requirement, ...]:
    """Parse a label selector (the same grammar serves field selectors' ``=``, ``==``, ``!=``)."""
    requirements = []
    for part in _split_selector(text):
        if match := _SET_REQUIREMENT.fullmatch(part):
            values = tuple(v.strip() for v in match["values"].split(",") if v.strip())
            requirements.append(Requirement(match["key"], match["op"], values))
        elif match := _CMP_REQUIREMENT.fullmatch(part):
            op = "=" if match["op"] == "==" else match["op"]
            if op in ("<", ">") and not re.fullmatch(r"-?\d+", match["value"]):
                raise bad_request(
                    f"unable to parse requirement: for 'gt', 'lt' operators, exactly one "
                    f"integer value is required: {part.strip()}"
                )
            requirements.append(Requirement(match["key"], op, (match["value"],)))
        elif match := _EXISTS_REQUIREMENT.fullmatch(part):
            requirements.append(Requirement(match["key"], "!" if match["op"] else "exists"))
        else:
            raise bad_request(
                f"unable to parse requirement: found '{part.strip()}', expected a selector term"
            )
    return tuple(requirements)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The value at a dotted path, as a field selector compares it ("" when absent)."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class Filter:
    """What a list or watch request selects: namespace, labels and fields."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        return all(r.matches({r.key: field_value(obj, r.key)}) for r in self.fields)


# --------------------------------------------------------------------------------------------
# Patches


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 JSON merge patch; returns the result (the target may share subtrees)."""
    if not isinstance(patch, dict):
        return clone(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_patch(previous: Any, applied: Any) -> Any:
    """The merge patch of a server-side apply: set what ``applied`` sets, and remove what the
    same field manager's ``previous`` configuration set but ``applied`` no longer does."""
    if not (isinstance(previous, dict) and isinstance(applied, dict)):
        return applied
    patch: JsonObj = {key: None for key in previous if key not in applied}
    for key, value in applied.items():
        patch[key] = apply_patch(previous.get(key), value)
    return patch


def strip_strategic_directives(patch: Any) -> Any:
    """Drop strategic-merge-patch ``$`` directives, leaving a JSON merge patch."""
    if isinstance(patch, dict):
        return {k: strip_strategic_directives(v) for k, v in patch.items() if not k.startswith("$")}
    if isinstance(patch, list):
        return [strip_strategic_directives(v) for v in patch]
    return patch


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _container(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, list):
            doc = doc[int(part)]
        elif isinstance(doc, dict):
            doc = doc[part]
        else:
            raise KeyError(part)
    return doc


def _json_patch_op(doc: Any, op: JsonObj) -> Any:
    """Apply one RFC 6902 operation in place; returns the (possibly replaced) document."""
    kind, parts = op.get("op"), _pointer(op.get("path", ""))
    if kind in ("move", "copy"):
        value = _container(doc, _pointer(op["from"]))
        if kind == "move":
            doc = _json_patch_op(doc, {"op": "remove", "path": op["from"]})
        return _json_patch_op(doc, {"op": "add", "path": op["path"], "value": clone(value)})
    if kind == "test":
        if _container(doc, parts) != op.get("value"):
            raise ValueError(f"testing value {op.get('path')} failed")
        return doc
    if not parts:
        if kind in ("add", "replace"):
            return clone(op["value"])
        raise ValueError("cannot remove the whole document")
    parent, last = _container(doc, parts[:-1]), parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            if not 0 <= index <= len(parent):
                raise IndexError(index)
            parent.insert(index, clone(op["value"]))
        elif kind == "remove":
            del parent[index]
        elif kind == "replace":
            parent[index] = clone(op["value"])
        else:
            raise ValueError(f"unknown operation {kind!r}")
    elif isinstance(parent, dict):
        if kind in ("remove", "replace") and last not in parent:
            raise KeyError(last)
        if kind == "remove":
            del parent[last]
        elif kind in ("add", "replace"):
            parent[last] = clone(op["value"])
        else:
            raise ValueError(f"unknown operation {kind!r}")
    else:
        raise KeyError(last)
    return doc


def json_patch(doc: Any, operations: Any) -> Any:
    """Apply an RFC 6902 JSON patch to a copy of ``doc``."""
    if not isinstance(operations, list):
        raise bad_request("json patch must be a list of operations")
    result = clone(doc)
    try:
        for op in operations:
            result = _json_patch_op(result, op)
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(
            422,
            "Invalid",
            f"the server rejected our request due to an error in our request: json patch failed: {exc}",
        ) from exc
    return result


# --------------------------------------------------------------------------------------------
# JSONPath (the subset used in additionalPrinterColumns)

_JSONPATH_STEP = re.compile(
    r"""\[\?\((?P<filter>.*?)\)\]
      | \[(?P<index>-?\d+)\]
      | \[(?P<star>\*)\]
      | \.?\[\s*(?P<q>['"])(?P<key>.*?)(?P=q)\s*\]
      | \.(?P<name>(?:\\.|[^.\[\\])+)""",
    re.VERBOSE,
)
_JSONPATH_FILTER = re.compile(
    r"@(?P<path>(?:\.[\w\-/]+)+)\s*(?:(?P<op>==|!=|<=|>=|<|>)\s*(?P<literal>.+?))?\s*"
)


@dataclasses.dataclass(frozen=True)
class JsonPath:
    """A parsed JSONPath such as ``.status.conditions[?(@.type=="Ready")].status``."""

    steps: tuple[tuple[str, Any], ...]

    @classmethod
    def parse(cls, text: str) -> JsonPath:
        text = text.strip()
        if text.startswith("{") and text.endswith("}"):
            text = text[1:-1]
        steps: list[tuple[str, Any]] = []
        position = 0
        while position < len(text):
            match = _JSONPATH_STEP.match(text, position)
            if not match:
                raise ValueError(f"unparsable JSONPath {text!r} at {position}")
            steps.append(cls._step(match))
            position = match.end()
        return cls(tuple(steps))

    @staticmethod
    def _step(match: re.Match[str]) -> tuple[str, Any]:
        if match["filter"] is not None:
            condition = _JSONPATH_FILTER.fullmatch(match["filter"])
            if not condition:
                raise ValueError(f"unsupported JSONPath filter {match['filter']!r}")
            literal = condition["literal"]
            value = json.loads(literal.replace("'", '"')) if literal is not None else MISSING
            return ("filter", (JsonPath.parse(condition["path"]), condition["op"], value))
        if match["index"] is not None:
            return ("index", int(match["index"]))
        if match["star"] is not None:
            return ("star", None)
        if match["key"] is not None:
            return ("key", match["key"])
        return ("key", match["name"].replace("\\.", "."))

    def find(self, value: Any) -> list[Any]:
        """Every value the path selects."""
        results = [value]
        for kind, arg in self.steps:
            results = [found for current in results for found in self._apply(kind, arg, current)]
        return results

    @staticmethod
    def _apply(kind: str, arg: Any, current: Any) -> list[Any]:
        if kind == "key":
            return [current[arg]] if isinstance(current, dict) and arg in current else []
        if kind == "index":
            in_range = isinstance(current, list) and -len(current) <= arg < len(current)
            return [current[arg]] if in_range else []
        if kind == "star":
            return list(current.values()) if isinstance(current, dict) else list(current or [])
        path, op, literal = arg
        items = current if isinstance(current, list) else []
        return [item for item in items if _filter_matches(path.find(item), op, literal)]


_COMPARISONS: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _filter_matches(found: list[Any], op: str | None, literal: Any) -> bool:
    if not found:
        return False
    value = found[0]
    if op is None:
        return True
    try:
        return bool(_COMPARISONS[op](value, literal))
    except TypeError:  # ordering a string against a number
        return False


# --------------------------------------------------------------------------------------------
# Structural schemas: pruning, defaulting, OpenAPI validation, CEL


def _child_schema(schema: Mapping[str, Any], key: str) -> tuple[JsonObj | None, bool]:
    """The schema of an object's ``key`` and whether it is a map entry (additionalProperties)."""
    properties = schema.get("properties") or {}
    if key in properties:
        return properties[key], False
    additional = schema.get("additionalProperties")
    return (additional, True) if isinstance(additional, dict) else (None, False)


def _join(path: str, key: str, *, map_key: bool = False) -> str:
    if map_key:
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def prune(
    value: Any,
    schema: Mapping[str, Any],
    path: str = "",
    *,
    unknown: list[str] | None = None,
    keep_type_meta: bool = False,
) -> None:
    """Drop fields the schema does not know (listed in ``unknown``) and disallowed nulls, in place."""
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            prune(item, schema["items"], f"{path}[{index}]", unknown=unknown)
    if not isinstance(value, dict):
        return
    keep_meta = keep_type_meta or bool(schema.get("x-kubernetes-embedded-resource"))
    preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    for key in list(value):
        child, _ = _child_schema(schema, key)
        if keep_meta and key in ("apiVersion", "kind", "metadata"):
            continue
        if child is None:
            if not preserve:
                del value[key]
                if unknown is not None:
                    unknown.append(_join(path, key))
        elif value[key] is None and not child.get("nullable"):
            del value[key]
        else:
            prune(value[key], child, _join(path, key), unknown=unknown)


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> None:
    """Fill absent fields from the schema's ``default`` values, recursively, in place."""
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])
    if not isinstance(value, dict):
        return
    for key, child in (schema.get("properties") or {}).items():
        if key not in value and "default" in child:
            value[key] = clone(child["default"])
    for key, item in value.items():
        child, _ = _child_schema(schema, key)
        if child is not None:
            apply_defaults(item, child)


_JSONSCHEMA_KEYWORDS: Final = frozenset(
    {
        "type",
        "enum",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "required",
        "multipleOf",
        "uniqueItems",
    }
)


def to_json_schema(node: Mapping[str, Any]) -> JsonObj:
    """Translate a Kubernetes OpenAPI v3 schema node to JSON Schema draft 7."""
    out: JsonObj = {k: v for k, v in node.items() if k in _JSONSCHEMA_KEYWORDS}
    for key in ("properties", "patternProperties"):
        if key in node:
            out[key] = {name: to_json_schema(child) for name, child in node[key].items()}
    for key in ("items", "not", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out[key] = to_json_schema(node[key])
        elif key == "additionalProperties" and key in node:
            out[key] = node[key]
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [to_json_schema(child) for child in node[key]]
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True and limit in node:
            out[bound] = out.pop(limit)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def _schema_error_path(path: Iterable[Any]) -> str:
    text = ""
    for part in path:
        text = f"{text}[{part}]" if isinstance(part, int) else _join(text, str(part))
    return text


def _required_name(message: str) -> str:
    match = re.match(r"^'(.*)' is a required property$", message)
    return match.group(1) if match else message


def schema_field_error(error: Any, prefix: str = "") -> FieldError:
    """Translate a ``jsonschema.ValidationError`` into the apiserver's wording."""
    path = _schema_error_path([*([prefix] if prefix else []), *error.absolute_path]) or "<nil>"
    value, limit, validator = error.instance, error.validator_value, error.validator
    where = f"{path} in body"
    if validator == "required":
        return FieldError.required(_join(path if path != "<nil>" else "", _required_name(error.message)))
    if validator == "type":
        expected = limit if isinstance(limit, str) else " or ".join(t for t in limit if t != "null")
        actual = json_type_name(value)
        return FieldError.type_invalid(path, actual, f'{where} must be of type {expected}: "{actual}"')
    if validator == "enum":
        return FieldError.unsupported(path, value, [v for v in limit if v is not None])
    if validator == "maxLength":
        return FieldError.too_long(path, limit)
    if validator == "maxItems":
        return FieldError.too_many(path, len(value), limit)
    messages = {
        "minimum": f"should be greater than or equal to {limit}",
        "exclusiveMinimum": f"should be greater than {limit}",
        "maximum": f"should be less than or equal to {limit}",
        "exclusiveMaximum": f"should be less than {limit}",
        "minLength": f"should be at least {limit} chars long",
        "pattern": f"should match '{limit}'",
        "minItems": f"should have at least {limit} items",
        "multipleOf": f"should be a multiple of {limit}",
        "minProperties": f"should have at least {limit} properties",
        "maxProperties": f"should have at most {limit} properties",
    }
    if validator in messages:
        shown = len(value) if validator == "minItems" else value
        return FieldError.invalid(path, shown, f"{where} {messages[validator]}")
    return FieldError.invalid(path, value, error.message)


def walk(
    value: Any,
    schema: Mapping[str, Any],
    path: str = "",
    old: Any = MISSING,
) -> Iterator[tuple[Any, Mapping[str, Any], str, Any]]:
    """Yield (value, schema, path, correlated old value) for every schema-covered node.

    Old values are correlated through object properties, map entries and ``listType=map``
    items (by their keys), as for CEL transition rules; elsewhere the old value is MISSING.
    """
    yield value, schema, path, old
    if isinstance(value, dict):
        for key, item in value.items():
            child, is_map = _child_schema(schema, key)
            if child is not None:
                item_old = old.get(key, MISSING) if isinstance(old, dict) else MISSING
                yield from walk(item, child, _join(path, key, map_key=is_map), item_old)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        keys = (
            schema.get("x-kubernetes-list-map-keys")
            if schema.get("x-kubernetes-list-type") == "map"
            else None
        )
        old_items = {_map_key(keys, o): o for o in old} if keys and isinstance(old, list) else {}
        for index, item in enumerate(value):
            item_old = old_items.get(_map_key(keys, item), MISSING) if keys else MISSING
            yield from walk(item, schema["items"], f"{path}[{index}]", item_old)


def _map_key(keys: Sequence[str] | None, item: Any) -> str:
    if not keys or not isinstance(item, dict):
        return go_repr(item)
    return go_repr({k: item.get(k) for k in keys})


def list_type_errors(value: Any, schema: Mapping[str, Any], path: str) -> list[FieldError]:
    """Duplicates in ``x-kubernetes-list-type: set`` and ``map`` lists."""
    errors = []
    for node, node_schema, node_path, _ in walk(value, schema, path):
        list_type = node_schema.get("x-kubernetes-list-type")
        if not isinstance(node, list) or list_type not in ("set", "map"):
            continue
        keys = node_schema.get("x-kubernetes-list-map-keys") if list_type == "map" else None
        seen: set[str] = set()
        for index, item in enumerate(node):
            identity = _map_key(keys, item)
            if identity in seen:
                shown = {k: item.get(k) for k in keys} if keys and isinstance(item, dict) else item
                errors.append(FieldError.duplicate(f"{node_path}[{index}]", shown))
            seen.add(identity)
    return errors


@dataclasses.dataclass(frozen=True)
class SkippedRule:
    """A CEL rule this fake could not enforce."""

    where: str
    rule: str
    reason: str


class CelEngine:
    """Compiles and evaluates ``x-kubernetes-validations`` rules with ``cel-python`` (``celpy``)."""

    def __init__(self) -> None:
        self.skipped: list[SkippedRule] = []
        self._programs: dict[str, Any] = {}
        self._environment: Any = None

    def skip(self, where: str, rule: str, reason: str) -> None:
        entry = SkippedRule(where, rule, reason)
        if entry not in self.skipped:
            log.warning("fakekube: not enforcing CEL rule %r at %s: %s", rule, where, reason)
            self.skipped.append(entry)

    def program(self, expression: str, where: str) -> Any:
        """The compiled program for an expression; None (and recorded) if it cannot compile."""
        if expression not in self._programs:
            self._programs[expression] = self._compile(expression, where)
        return self._programs[expression]

    def _compile(self, expression: str, where: str) -> Any:
        try:
            import celpy
            from celpy.celparser import CELParseError
            from celpy.evaluation import CELEvalError, CELSyntaxError, CELUnsupportedError
        except ImportError:
            self.skip(where, expression, "cel-python (celpy) is not installed")
            return None
        if self._environment is None:
            self._environment = celpy.Environment()
        try:
            return self._environment.program(self._environment.compile(expression))
        except (CELParseError, CELSyntaxError, CELUnsupportedError, CELEvalError) as exc:
            self.skip(where, expression, f"does not compile in celpy: {exc}")
            return None

    def compile_schema(self, schema: Mapping[str, Any], where: str) -> bool:
        """Compile every rule in a schema now, so unsupported ones are recorded at install time.

        Returns whether the schema has any rule.
        """
        rules = schema.get("x-kubernetes-validations") or ()
        for rule in rules:
            if rule.get("optionalOldSelf"):
                self.skip(where, rule["rule"], "optionalOldSelf is not supported by celpy")
            else:
                self.program(rule["rule"], where)
        children = [*(schema.get("properties") or {}).values(), *(schema.get("allOf") or ())]
        children += [schema[k] for k in ("items", "additionalProperties") if isinstance(schema.get(k), dict)]
        found = [self.compile_schema(child, where) for child in children]
        return bool(rules) or any(found)

    def validate(
        self, value: Any, schema: Mapping[str, Any], path: str, old: Any, where: str
    ) -> list[FieldError]:
        """Evaluate every rule that applies to ``value`` (and its correlated ``old``)."""
        errors = []
        for node, node_schema, node_path, node_old in walk(value, schema, path, old):
            for rule in node_schema.get("x-kubernetes-validations") or ():
                error = self._check(rule, node, node_schema, node_path, node_old, where)
                if error is not None:
                    errors.append(error)
        return errors

    def _check(
        self, rule: JsonObj, value: Any, schema: Mapping[str, Any], path: str, old: Any, where: str
    ) -> FieldError | None:
        expression = rule["rule"]
        transition = re.search(r"\boldSelf\b", expression) is not None
        if rule.get("optionalOldSelf") or (transition and old is MISSING):
            return None
        program = self.program(expression, where)
        if program is None:
            return None
        activation = {"self": to_cel(value, schema)}
        if transition:
            activation["oldSelf"] = to_cel(old, schema)
        outcome = self._evaluate(program, activation)
        if outcome is True:
            return None
        field = path + rule["fieldPath"] if rule.get("fieldPath") else path
        field = field.lstrip(".") or "<nil>"
        if isinstance(outcome, Exception):
            text = str(outcome.args[0]) if outcome.args else str(outcome)
            if "undeclared reference" in text:
                self.skip(where, expression, f"uses a function celpy lacks: {text}")
                return None
            message = f"{text} evaluating rule: {expression}"
        else:
            message = self._message(rule, activation, where)
        return self._field_error(rule.get("reason", "FieldValueInvalid"), field, schema, message)

    @staticmethod
    def _evaluate(program: Any, activation: JsonObj) -> bool | Exception:
        from celpy.celtypes import BoolType
        from celpy.evaluation import CELEvalError

        try:
            result = program.evaluate(activation)
        except CELEvalError as exc:
            return exc
        if isinstance(result, Exception):
            return result
        return isinstance(result, BoolType) and bool(result)

    def _message(self, rule: JsonObj, activation: JsonObj, where: str) -> str:
        if rule.get("messageExpression"):
            from celpy.evaluation import CELEvalError

            program = self.program(rule["messageExpression"], where)
            try:
                text = program.evaluate(activation) if program is not None else None
            except CELEvalError:  # a failing messageExpression falls back to message
                text = None
            if isinstance(text, str) and text:
                return str(text)
        return str(rule.get("message") or f"failed rule: {rule['rule']}")

    @staticmethod
    def _field_error(reason: str, field: str, schema: Mapping[str, Any], message: str) -> FieldError:
        if reason == "FieldValueForbidden":
            return FieldError.forbidden(field, message)
        if reason == "FieldValueRequired":
            return FieldError.required(field, message)
        if reason == "FieldValueDuplicate":
            return FieldError(field, reason, f"Duplicate value: {message}")
        return FieldError.invalid(field, schema.get("type", "object"), message)


def to_cel(value: Any, schema: Mapping[str, Any]) -> Any:
    """Convert a JSON value to celpy types, typed by its schema (``number`` fields are doubles)."""
    from celpy import celtypes

    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, (int, float)):
        if schema.get("type") == "number" or isinstance(value, float):
            return celtypes.DoubleType(float(value))
        return celtypes.IntType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, list):
        items = schema.get("items")
        return celtypes.ListType([to_cel(v, items if isinstance(items, dict) else {}) for v in value])
    if isinstance(value, dict):
        converted = {}
        for key, item in value.items():
            child, _ = _child_schema(schema, key)
            converted[celtypes.StringType(key)] = to_cel(item, child or {})
        return celtypes.MapType(converted)
    return None


class Schema:
    """The ``openAPIV3Schema`` of one CRD version: admission of objects against it."""

    def __init__(self, raw: JsonObj, cel: CelEngine, where: str) -> None:
        self.raw = raw
        self.where = where
        self._cel = cel
        self._validators: dict[str, Any] = {}
        self.has_rules = cel.compile_schema(raw, where)

    def _validator(self, path: str, schema: JsonObj) -> Any:
        """A JSON Schema validator for the subtree at ``path`` ("" for the whole object), cached."""
        if path not in self._validators:
            import jsonschema

            translated = to_json_schema(schema)
            if not path:
                translated.get("properties", {}).pop("metadata", None)  # ObjectMeta is validated apart
            self._validators[path] = jsonschema.Draft7Validator(translated)
        return self._validators[path]

    def admit(
        self, obj: JsonObj, old: JsonObj | None, *, status_only: bool, unknown: list[str] | None = None
    ) -> list[FieldError]:
        """Prune (listing dropped fields in ``unknown``) and default ``obj`` in place, then validate it.

        As on a real server, a write to ``/status`` checks the schema of ``.status`` only, but CEL
        rules and list types over the whole object.
        """
        return [error for _, error in self.review(obj, old, status_only=status_only, unknown=unknown)]

    def review(
        self, obj: JsonObj, old: JsonObj | None, *, status_only: bool, unknown: list[str] | None = None
    ) -> list[tuple[AdmissionStep, FieldError]]:
        """``admit``, each error with the step that caught it (tests/api insists that a cross-field
        mistake is caught by CEL, not by accident elsewhere)."""
        prune(obj, self.raw, unknown=unknown, keep_type_meta=True)
        apply_defaults(obj, self.raw)
        if status_only:
            status_schema = (self.raw.get("properties") or {}).get("status", {})
            schema_errors = self._schema_errors(obj.get("status", MISSING), status_schema, "status")
        else:
            schema_errors = self._schema_errors(obj, self.raw, "")
        errors: list[tuple[AdmissionStep, FieldError]] = [("schema", e) for e in schema_errors]
        errors += [("list-type", e) for e in list_type_errors(obj, self.raw, "")]
        if not self.has_rules:
            return errors
        if any(e.reason in BLOCKING_REASONS for _, e in errors):  # CEL would see ill-typed values: skipped
            message = (
                "some validation rules were not checked because the object was invalid; "
                "correct the existing errors to complete validation"
            )
            return [*errors, ("schema", FieldError.invalid("<nil>", None, message))]
        old_value = MISSING if old is None else old
        return errors + [("cel", e) for e in self._cel.validate(obj, self.raw, "", old_value, self.where)]

    def _schema_errors(self, value: Any, schema: JsonObj, path: str) -> list[FieldError]:
        if value is MISSING:
            return []
        errors = [schema_field_error(e, path) for e in self._validator(path, schema).iter_errors(value)]
        return sorted(errors, key=lambda e: e.field)


# --------------------------------------------------------------------------------------------
# Metadata validation

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_SUBDOMAIN_MESSAGE: Final = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MESSAGE: Final = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
    "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_QUALIFIED_NAME_MESSAGE: Final = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
    "an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation "
    "is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
_LABEL_VALUE_MESSAGE: Final = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and "
    "must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', "
    "regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)


def name_errors(name: str, rule: NameRule, field: str = "metadata.name") -> list[FieldError]:
    """Validate an object name as the apiserver does for the resource."""
    if rule == "path":
        bad = name in (".", "..") or "/" in name or "%" in name
        return [FieldError.invalid(field, name, "may not contain '/' or '%'")] if bad else []
    pattern, limit, message = (
        (_DNS_LABEL, 63, _LABEL_MESSAGE) if rule == "label" else (_DNS_SUBDOMAIN, 253, _SUBDOMAIN_MESSAGE)
    )
    errors = []
    if len(name) > limit:
        errors.append(FieldError.invalid(field, name, f"must be no more than {limit} characters"))
    if not pattern.fullmatch(name):
        errors.append(FieldError.invalid(field, name, message))
    return errors


def qualified_name_errors(key: str, field: str) -> list[FieldError]:
    """Validate a label or annotation key (``[prefix/]name``)."""
    prefix, _, name = key.rpartition("/")
    errors = []
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        errors.append(FieldError.invalid(field, key, "prefix part " + _SUBDOMAIN_MESSAGE))
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        detail = "name part must be no more than 63 characters" if len(name) > 63 else _QUALIFIED_NAME_MESSAGE
        errors.append(FieldError.invalid(field, key, detail))
    return errors


def metadata_errors(meta: JsonObj, rule: NameRule) -> list[FieldError]:
    """Validate ObjectMeta: name, labels, annotations, owner references."""
    errors = name_errors(str(meta.get("name", "")), rule)
    for key, value in (meta.get("labels") or {}).items():
        errors += qualified_name_errors(key, "metadata.labels")
        if not isinstance(value, str) or len(value) > 63 or (value and not _LABEL_NAME.fullmatch(value)):
            detail = (
                "must be no more than 63 characters"
                if isinstance(value, str) and len(value) > 63
                else (_LABEL_VALUE_MESSAGE)
            )
            errors.append(FieldError.invalid("metadata.labels", value, detail))
    annotations = meta.get("annotations") or {}
    for key in annotations:
        errors += qualified_name_errors(key, "metadata.annotations")
    size = sum(len(k) + len(str(v)) for k, v in annotations.items())
    if size > MAX_ANNOTATIONS_BYTES:
        errors.append(FieldError.too_long("metadata.annotations", MAX_ANNOTATIONS_BYTES))
    return errors + owner_reference_errors(meta.get("ownerReferences") or [])


def owner_reference_errors(refs: list[JsonObj]) -> list[FieldError]:
    errors = []
    for field in ("apiVersion", "kind", "name", "uid"):
        for ref in refs:
            if not ref.get(field):
                errors.append(
                    FieldError.invalid(
                        f"metadata.ownerReferences.{field}", ref.get(field, ""), f"{field} must not be empty"
                    )
                )
    controllers = [r for r in refs if r.get("controller")]
    if len(controllers) > 1:
        errors.append(
            FieldError.invalid(
                "metadata.ownerReferences", refs, "Only one reference can have Controller set to true"
            )
        )
    return errors


# --------------------------------------------------------------------------------------------
# CustomResourceDefinitions


def crd_errors(crd: JsonObj) -> list[FieldError]:
    """The structural checks of a CRD that the fake relies on."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    errors = []
    for field, value in (
        ("spec.group", spec.get("group")),
        ("spec.names.plural", names.get("plural")),
        ("spec.names.kind", names.get("kind")),
    ):
        if not value:
            errors.append(FieldError.required(field))
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        errors.append(FieldError.unsupported("spec.scope", spec.get("scope"), ["Cluster", "Namespaced"]))
    name = crd.get("metadata", {}).get("name")
    if names.get("plural") and spec.get("group") and name != f"{names['plural']}.{spec['group']}":
        errors.append(FieldError.invalid("metadata.name", name, 'must be spec.names.plural+"."+spec.group'))
    versions = spec.get("versions") or []
    if sum(1 for v in versions if v.get("storage")) != 1:
        errors.append(
            FieldError.invalid(
                "spec.versions",
                [v.get("name") for v in versions],
                "must have exactly one version marked as storage version",
            )
        )
    for index, version in enumerate(versions):
        errors += _crd_version_errors(version, f"spec.versions[{index}]")
    return errors


def _crd_version_errors(version: JsonObj, field: str) -> list[FieldError]:
    errors = []
    if not isinstance((version.get("schema") or {}).get("openAPIV3Schema"), dict):
        errors.append(FieldError.required(f"{field}.schema.openAPIV3Schema", "schemas are required"))
    for index, column in enumerate(version.get("additionalPrinterColumns") or []):
        try:
            JsonPath.parse(column.get("jsonPath", ""))
        except ValueError as exc:
            errors.append(
                FieldError.invalid(
                    f"{field}.additionalPrinterColumns[{index}].JSONPath", column.get("jsonPath"), str(exc)
                )
            )
    return errors


def default_crd(crd: JsonObj, old: JsonObj | None) -> None:
    """Apply the CRD defaults and the status its controllers would write (in place)."""
    if crd_errors(crd):
        return  # rejected by validation
    spec = crd["spec"]
    names = spec["names"]
    names.setdefault("singular", names["kind"].lower())
    names.setdefault("listKind", names["kind"] + "List")
    spec.setdefault("conversion", {"strategy": "None"})
    finalizers = crd["metadata"].setdefault("finalizers", [])
    if old is None and CRD_CLEANUP_FINALIZER not in finalizers:
        finalizers.append(CRD_CLEANUP_FINALIZER)
    storage = next(v["name"] for v in spec["versions"] if v.get("storage"))
    old_status = (old or {}).get("status") or {}
    stored = old_status.get("storedVersions") or []
    now = now_rfc3339()
    crd["status"] = {
        "acceptedNames": dict(names),
        "conditions": old_status.get("conditions")
        or [
            {
                "type": "NamesAccepted",
                "status": "True",
                "reason": "NoConflicts",
                "message": "no conflicts found",
                "lastTransitionTime": now,
            },
            {
                "type": "Established",
                "status": "True",
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
                "lastTransitionTime": now,
            },
        ],
        "storedVersions": stored if storage in stored else [*stored, storage],
    }


def crd_resource_types(crd: JsonObj, cel: CelEngine) -> list[ResourceType]:
    """The resource types a CRD serves, one per served version."""
    spec = crd["spec"]
    names = spec["names"]
    storage = next(v["name"] for v in spec["versions"] if v.get("storage"))
    types = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        where = f"{crd['metadata']['name']}/{version['name']}"
        warning = None
        if version.get("deprecated"):
            default_warning = f"{spec['group']}/{version['name']} {names['kind']} is deprecated"
            warning = version.get("deprecationWarning") or default_warning
        types.append(
            ResourceType(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec["scope"] == "Namespaced",
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                singular=names.get("singular", ""),
                status_subresource="status" in (version.get("subresources") or {}),
                tracks_generation=True,
                returns_deleted_object=True,
                custom=True,
                storage_version=storage,
                printer_columns=tuple(version.get("additionalPrinterColumns") or ()),
                schema=Schema(version["schema"]["openAPIV3Schema"], cel, where),
                deprecation_warning=warning,
                selectable_fields=tuple(
                    f["jsonPath"].lstrip(".") for f in version.get("selectableFields") or ()
                ),
            )
        )
    return types


# --------------------------------------------------------------------------------------------
# Kind-specific defaulting (what built-in registries do on write)


def _default_namespace(obj: JsonObj, old: JsonObj | None) -> None:
    obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    if old is None:
        obj["status"] = {"phase": "Active"}


def _default_secret(obj: JsonObj, old: JsonObj | None) -> None:
    string_data = obj.pop("stringData", None) or {}
    if string_data:
        encoded = {k: base64.b64encode(str(v).encode()).decode() for k, v in string_data.items()}
        obj["data"] = {**(obj.get("data") or {}), **encoded}
    obj.setdefault("type", "Opaque")


def _default_pod(obj: JsonObj, old: JsonObj | None) -> None:
    if old is None:
        obj["status"] = {"phase": "Pending"}


def _container_names(pod: JsonObj) -> builtins.list[str]:
    return [str(c.get("name")) for c in (pod.get("spec") or {}).get("containers") or [] if isinstance(c, dict)]


def _container_status(pod: JsonObj, container: str) -> JsonObj:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if isinstance(s, dict) and s.get("name") == container), {})


def _container_waiting(pod: JsonObj, container: str) -> str | None:
    """Why `container` has not started (a real kubelet's reason), or None once it has."""
    waiting = (_container_status(pod, container).get("state") or {}).get("waiting")
    if isinstance(waiting, dict):
        return str(waiting.get("reason") or "ContainerCreating")
    phase = (pod.get("status") or {}).get("phase")
    return "ContainerCreating" if phase in (None, "Pending") and not _container_status(pod, container) else None


def _container_ended(pod: JsonObj, container: str) -> bool:
    state = _container_status(pod, container).get("state") or {}
    return "terminated" in state or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


DEFAULTERS: Final[dict[ResourceKey, Callable[[JsonObj, JsonObj | None], None]]] = {
    NAMESPACE_KEY: _default_namespace,
    (CORE_GROUP, "secrets"): _default_secret,
    (CORE_GROUP, "pods"): _default_pod,
    CRD_KEY: default_crd,
}


# --------------------------------------------------------------------------------------------
# Storage, history and watchers


@dataclasses.dataclass(eq=False)
class WatchEvent:
    """A change of one object; ``old`` is the previous state of a MODIFIED object."""

    rv: int
    type: str
    obj: JsonObj
    old: JsonObj | None = None
    lines: dict[tuple[str, str], bytes] = dataclasses.field(default_factory=dict)


QueueItem = tuple[str, WatchEvent] | None  # None ends the stream
Renderer = Callable[[str, WatchEvent], bytes]  # (event type, event) -> one watch-stream line


@dataclasses.dataclass(eq=False)
class Watcher:
    """One open watch stream: what it selects and where its events go."""

    key: ResourceKey
    filter: Filter
    queue: asyncio.Queue[QueueItem]

    def event_type(self, event: WatchEvent) -> str | None:
        """The type this watcher sees: objects moving across its selector are ADDED/DELETED."""
        now = self.filter.matches(event.obj)
        if event.type != "MODIFIED":
            return event.type if now else None
        before = event.old is not None and self.filter.matches(event.old)
        if now:
            return "MODIFIED" if before else "ADDED"
        return "DELETED" if before else None

    def offer(self, event: WatchEvent) -> None:
        event_type = self.event_type(event)
        if event_type is not None:
            self.queue.put_nowait((event_type, event))


class Store:
    """All objects, indexed by resource, namespace and name; their history; open watches.

    Stored objects are immutable snapshots: every write stores a new dict. Tests read through
    :meth:`get` and :meth:`list` (deep copies, safe from any thread); the server writes through
    :meth:`write` and :meth:`delete` from its event-loop thread only.
    """

    def __init__(self, history_limit: int) -> None:
        self._objects: dict[ResourceKey, dict[str, dict[str, JsonObj]]] = {}
        self._by_uid: dict[str, ObjectKey] = {}
        self._dependents: dict[str, set[ObjectKey]] = collections.defaultdict(set)
        self._history: dict[ResourceKey, collections.deque[WatchEvent]] = {}
        self._compacted: dict[ResourceKey, int] = {}
        self._watchers: dict[ResourceKey, builtins.list[Watcher]] = collections.defaultdict(list)
        self._history_limit = history_limit
        self._rv = 0

    # -- reading (tests)

    def get(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> JsonObj | None:
        """A deep copy of one object as ``group/version`` serves it, or None."""
        obj = self.lookup((group, plural), namespace or "", name)
        return None if obj is None else with_api_version(clone(obj), group, version)

    def list(
        self, group: str, version: str, plural: str, namespace: str | None = None
    ) -> builtins.list[JsonObj]:
        """Deep copies of the objects of a resource (in one namespace, or all), sorted."""
        return [with_api_version(clone(o), group, version) for o in self.objects((group, plural), namespace)]

    @property
    def resource_version(self) -> int:
        """The latest resourceVersion handed out."""
        return self._rv

    # -- reading (server)

    def lookup(self, key: ResourceKey, namespace: str, name: str) -> JsonObj | None:
        """The stored snapshot (never mutate it)."""
        return self._objects.get(key, {}).get(namespace, {}).get(name)

    def objects(self, key: ResourceKey, namespace: str | None = None) -> builtins.list[JsonObj]:
        """Stored snapshots of a resource, by namespace then name."""
        spaces = self._objects.get(key, {})
        chosen = [namespace] if namespace is not None else sorted(spaces)
        return [obj for ns in chosen for _, obj in sorted(spaces.get(ns, {}).items())]

    def has_objects_in(self, namespace: str) -> bool:
        return any(spaces.get(namespace) for spaces in list(self._objects.values()))

    def locate(self, uid: str) -> ObjectKey | None:
        return self._by_uid.get(uid)

    def dependents(self, owner_uid: str) -> builtins.list[ObjectKey]:
        return sorted(self._dependents.get(owner_uid, ()))

    # -- writing (server)

    def next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def write(self, key: ResourceKey, obj: JsonObj, event_type: str, old: JsonObj | None) -> JsonObj:
        """Store a new snapshot with a new resourceVersion and announce it."""
        rv = self.next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        meta = obj["metadata"]
        namespace, name = meta.get("namespace", ""), meta["name"]
        self._objects.setdefault(key, {}).setdefault(namespace, {})[name] = obj
        self._index(old, None)
        self._index(obj, (key, namespace, name))
        self._announce(key, WatchEvent(rv, event_type, obj, old))
        return obj

    def delete(self, key: ResourceKey, obj: JsonObj) -> JsonObj:
        """Remove an object; returns its final state (with the deletion's resourceVersion)."""
        meta = obj["metadata"]
        namespace = meta.get("namespace", "")
        spaces = self._objects[key]
        del spaces[namespace][meta["name"]]
        if not spaces[namespace]:
            del spaces[namespace]
        rv = self.next_rv()
        final = {**obj, "metadata": {**meta, "resourceVersion": str(rv)}}
        self._index(obj, None)
        self._announce(key, WatchEvent(rv, "DELETED", final))
        return final

    def drop(self, key: ResourceKey) -> None:
        """Forget a resource's objects and history silently (its CRD is gone)."""
        for obj in self.objects(key):
            self._index(obj, None)
        self._objects.pop(key, None)
        self._history.pop(key, None)

    def _index(self, obj: JsonObj | None, where: ObjectKey | None) -> None:
        """Add (``where`` given) or remove ``obj`` from the uid and owner indexes."""
        if obj is None:
            return
        meta = obj["metadata"]
        owners = [ref.get("uid", "") for ref in meta.get("ownerReferences") or ()]
        if where is not None:
            self._by_uid[meta["uid"]] = where
            for owner in owners:
                self._dependents[owner].add(where)
            return
        here = self._by_uid.pop(meta["uid"], None)
        for owner in owners:
            dependents = self._dependents.get(owner)
            if dependents is not None and here is not None:
                dependents.discard(here)
                if not dependents:
                    del self._dependents[owner]

    def _announce(self, key: ResourceKey, event: WatchEvent) -> None:
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = collections.deque()
        if len(history) >= self._history_limit:
            self._compacted[key] = history.popleft().rv
        history.append(event)
        for watcher in self._watchers.get(key, ()):
            watcher.offer(event)

    # -- watching (server)

    def subscribe(self, watcher: Watcher, since: int | None) -> None:
        """Register a watcher and queue its initial events, atomically.

        ``since`` None: ADDED for every current object; otherwise every change after ``since``.
        """
        if since is None:
            for obj in self.objects(watcher.key, watcher.filter.namespace):
                watcher.offer(WatchEvent(int(obj["metadata"]["resourceVersion"]), "ADDED", obj))
        else:
            compacted = self._compacted.get(watcher.key, 0)
            if since < compacted:
                raise ApiError(410, "Expired", f"too old resource version: {since} ({compacted})")
            for event in self._history.get(watcher.key, ()):
                if event.rv > since:
                    watcher.offer(event)
        self._watchers[watcher.key].append(watcher)

    def unsubscribe(self, watcher: Watcher) -> None:
        watchers = self._watchers.get(watcher.key, [])
        if watcher in watchers:
            watchers.remove(watcher)

    def close_watchers(self) -> None:
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.queue.put_nowait(None)


def with_api_version(obj: JsonObj, group: str, version: str) -> JsonObj:
    """The object as served in ``group/version`` (conversion strategy None). May share ``obj``."""
    api_version = f"{group}/{version}" if group else version
    return obj if obj.get("apiVersion") == api_version else {**obj, "apiVersion": api_version}


# --------------------------------------------------------------------------------------------
# Protobuf request bodies (the few kinds that client-go's typed clients write: helm's release
# Secrets, ``kubectl create configmap|secret|namespace|serviceaccount``, typed deletes)

PROTOBUF: Final = "application/vnd.kubernetes.protobuf"
PROTOBUF_KINDS: Final = ("Secret", "ConfigMap", "Namespace", "ServiceAccount", "DeleteOptions")
PROTOBUF_MAGIC: Final = b"k8s\x00"
# message -> field number -> (JSON name, type, repeated); a type is a scalar ("string", "bytes",
# "int", "bool"), a map ("map" of strings, "map-bytes" of base64 data) or another message.
PROTO_MESSAGES: Final[dict[str, dict[int, tuple[str, str, bool]]]] = {
    "Unknown": {1: ("typeMeta", "TypeMeta", False), 2: ("raw", "bytes", False)},
    "TypeMeta": {1: ("apiVersion", "string", False), 2: ("kind", "string", False)},
    "ObjectMeta": {
        1: ("name", "string", False),
        2: ("generateName", "string", False),
        3: ("namespace", "string", False),
        5: ("uid", "string", False),
        6: ("resourceVersion", "string", False),
        7: ("generation", "int", False),
        11: ("labels", "map", False),
        12: ("annotations", "map", False),
        13: ("ownerReferences", "OwnerReference", True),
        14: ("finalizers", "string", True),
    },
    "OwnerReference": {
        1: ("kind", "string", False),
        3: ("name", "string", False),
        4: ("uid", "string", False),
        5: ("apiVersion", "string", False),
        6: ("controller", "bool", False),
        7: ("blockOwnerDeletion", "bool", False),
    },
    "Secret": {
        1: ("metadata", "ObjectMeta", False),
        2: ("data", "map-bytes", False),
        3: ("type", "string", False),
        4: ("stringData", "map", False),
        5: ("immutable", "bool", False),
    },
    "ConfigMap": {
        1: ("metadata", "ObjectMeta", False),
        2: ("data", "map", False),
        3: ("binaryData", "map-bytes", False),
        4: ("immutable", "bool", False),
    },
    "Namespace": {
        1: ("metadata", "ObjectMeta", False),
        2: ("spec", "NamespaceSpec", False),
        3: ("status", "NamespaceStatus", False),
    },
    "NamespaceStatus": {1: ("phase", "string", False)},
    "NamespaceSpec": {1: ("finalizers", "string", True)},
    "ServiceAccount": {
        1: ("metadata", "ObjectMeta", False),
        3: ("imagePullSecrets", "LocalObjectReference", True),
        4: ("automountServiceAccountToken", "bool", False),
    },
    "LocalObjectReference": {1: ("name", "string", False)},
    "DeleteOptions": {
        1: ("gracePeriodSeconds", "int", False),
        2: ("preconditions", "Preconditions", False),
        3: ("orphanDependents", "bool", False),
        4: ("propagationPolicy", "string", False),
        5: ("dryRun", "string", True),
    },
    "Preconditions": {1: ("uid", "string", False), 2: ("resourceVersion", "string", False)},
}


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, position


def _proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message: varints as int, length-delimited as bytes."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        wire_type = key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
            yield key >> 3, value
        elif wire_type == 2:
            length, position = _varint(data, position)
            yield key >> 3, data[position : position + length]
            position += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")


def _proto_value(kind: str, raw: int | bytes) -> Any:
    if kind in ("int", "bool"):
        assert isinstance(raw, int)
        return bool(raw) if kind == "bool" else raw
    assert isinstance(raw, bytes)
    if kind == "string":
        return raw.decode()
    if kind == "bytes":
        return raw
    if kind in ("map", "map-bytes"):
        entry = dict(_proto_fields(raw))
        key, value = entry.get(1, b""), entry.get(2, b"")
        assert isinstance(key, bytes) and isinstance(value, bytes)
        shown = base64.b64encode(value).decode() if kind == "map-bytes" else value.decode()
        return key.decode(), shown
    return decode_proto_message(kind, raw)


def decode_proto_message(message: str, data: bytes) -> JsonObj:
    """Decode one message of ``PROTO_MESSAGES`` to its JSON form (empty scalars omitted, as in JSON)."""
    fields = PROTO_MESSAGES[message]
    result: JsonObj = {}
    for number, raw in _proto_fields(data):
        if number not in fields:
            if raw in (0, b""):
                continue  # an unset field that Go's generated code still writes
            raise ValueError(f"field {number} of {message} is not supported")
        name, kind, repeated = fields[number]
        value = _proto_value(kind, raw)
        if kind in ("map", "map-bytes"):
            result.setdefault(name, {})[value[0]] = value[1]
        elif repeated:
            result.setdefault(name, []).append(value)
        elif value not in ("", 0, False):
            result[name] = value
    return result


def decode_protobuf(data: bytes) -> JsonObj:
    """A ``application/vnd.kubernetes.protobuf`` body as the JSON object it stands for."""
    if not data.startswith(PROTOBUF_MAGIC):
        raise ValueError("missing the k8s protobuf envelope")
    envelope = decode_proto_message("Unknown", data[len(PROTOBUF_MAGIC) :])
    type_meta = envelope.get("typeMeta", {})
    kind = type_meta.get("kind", "")
    if kind not in PROTOBUF_KINDS:
        raise LookupError(kind)
    return {**type_meta, **decode_proto_message(kind, envelope.get("raw", b""))}


# --------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass(frozen=True)
class Target:
    """What a resource URL addresses."""

    rt: ResourceType
    namespace: str | None  # None: cluster-scoped resource, or all namespaces
    name: str | None
    subresource: str | None


def split_api_path(path: str) -> tuple[str, str, list[str]] | None:
    """``/api/v1/...`` or ``/apis/g/v/...`` into (group, version, rest); None otherwise."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        return CORE_GROUP, parts[1], parts[2:]
    if len(parts) >= 3 and parts[0] == "apis":
        return parts[1], parts[2], parts[3:]
    return None


def split_resource_path(group: str, rest: list[str]) -> tuple[str | None, str, str | None, str | None]:
    """(namespace, plural, name, subresource) of the part after the version."""
    if rest and rest[0] == "watch":
        rest = rest[1:]
    namespaced = (
        len(rest) >= 3 and rest[0] == "namespaces" and (group or rest[2] not in ("status", "finalize"))
    )
    namespace = rest[1] if namespaced else None
    rest = rest[2:] if namespaced else rest
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) if len(rest) > 2 else None
    return namespace, rest[0] if rest else "", name, subresource


def resource_of_path(path: str) -> str | None:
    """The resource plural a request path addresses (for statistics)."""
    split = split_api_path(path)
    if split is None or not split[2]:
        return None
    return split_resource_path(split[0], split[2])[1]


def is_watch(path: str, query: str | Mapping[str, str]) -> bool:
    """Whether a GET of `path` with `query` (a query string or mapping) is a watch."""
    split = split_api_path(path)
    if split is not None and split[2] and split[2][0] == "watch":
        return True
    params = dict(urllib.parse.parse_qsl(query)) if isinstance(query, str) else query
    return query_flag(params.get("watch"))


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One served request, as kept in :attr:`FakeKubeAPI.request_log` (who asked for what)."""

    time: float  # time.monotonic() when the response started
    method: str
    path: str
    query: str
    status: int
    user_agent: str  # tells clients apart: kopf, aiohttp, urllib, kubectl, ...
    content_type: str
    # The request body of a PUT or PATCH of an object itself (not of a subresource such as /status):
    # what a client wrote there, e.g. to check that a controller never writes a spec. None otherwise.
    body: bytes | None = None


def addresses_an_object(path: str) -> bool:
    """Whether a path names one object itself (``.../<plural>/<name>``, no subresource)."""
    split = split_api_path(path)
    if split is None or not split[2] or split[2][0] == "watch":
        return False
    _, _, name, subresource = split_resource_path(split[0], split[2])
    return name is not None and subresource is None


def wants_table(accept: str) -> bool:
    """Whether the Accept header asks for a server-side printed ``meta.k8s.io`` Table."""
    for media in accept.split(","):
        params = dict(p.strip().partition("=")[::2] for p in media.split(";")[1:])
        if params.get("as") == "Table" and params.get("g") == "meta.k8s.io":
            return True
    return False


@dataclasses.dataclass(frozen=True)
class WriteOptions:
    """Query options of create, update and patch requests."""

    dry_run: bool = False  # dryRun=All: admit, but do not store
    strict: bool = False  # fieldValidation=Strict: unknown fields are an error, not pruned silently

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> WriteOptions:
        return cls(dry_run=query.get("dryRun") == "All", strict=query.get("fieldValidation") == "Strict")


DEFAULT_WRITE: Final = WriteOptions()


def query_flag(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


def query_int(query: Mapping[str, str], name: str) -> int | None:
    text = query.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise bad_request(
            f'{name}: Invalid value: "{text}": strconv.ParseInt: parsing "{text}": invalid syntax'
        ) from None


# --------------------------------------------------------------------------------------------
# The server


class FakeKubeAPI:
    """A stateful fake kube-apiserver on real HTTP; see the module docstring for its fidelity.

    Args:
        host, port: where to listen (port 0 picks a free one; see :attr:`url`).
        validate_schemas: prune, default and validate custom resources against their CRD schemas.
        history_limit: watch events kept per resource for resuming watches (older: 410 Expired).
        bookmark_interval: seconds between BOOKMARK events on watches that allow them.
        chaos: random faults for some clients' requests (:class:`ChaosConfig`); None (the default): none.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        validate_schemas: bool = True,
        history_limit: int = 100_000,
        bookmark_interval: float = 5.0,
        write_latency: float = 0.0,
        chaos: ChaosConfig | None = None,
    ) -> None:
        self.host = host
        # Seconds each write (POST/PUT/PATCH/DELETE) waits before it is served, concurrently with other
        # requests: what an apiserver with etcd charges (≈ 7.5–16 ms on one 2-core box), where this fake
        # answers in ≈ 0.5 ms. Benchmarks set it; tests leave it at 0.
        self.write_latency = write_latency
        self.port = port
        self.validate_schemas = validate_schemas
        self.bookmark_interval = bookmark_interval
        self.store = Store(history_limit)
        self.registry = Registry()
        self.requests: collections.deque[tuple[float, str, str, str, int]] = collections.deque(
            maxlen=1_000_000
        )
        # The same requests with more detail: the client's User-Agent and object write bodies.
        self.request_log: collections.deque[RequestRecord] = collections.deque(maxlen=1_000_000)
        self._cel = CelEngine()
        self._faults: list[Fault] = []  # `fail_next`: errors to answer instead of serving
        self._faults_lock = threading.Lock()
        self._chaos: Chaos | None = Chaos(chaos) if chaos is not None else None  # random faults
        self._holds: list[Hold] = []  # `hold_next`: requests stalled until the test releases them
        self._applied: dict[str, dict[str, JsonObj]] = {}  # uid -> field manager -> applied configuration
        self._pod_logs: dict[tuple[str, str], bytearray] = {}  # (pod uid, container) -> its log so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        for rt in BUILTIN_TYPES:
            self.registry.add(rt)
        for namespace in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self._ensure_namespace(namespace)

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        """Serve in a daemon thread with its own event loop; returns once listening."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[OSError] = []
        self._thread = threading.Thread(target=self._run, args=(ready, errors), name="fakekube", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        """End every watch stream, close the server and join its thread."""
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event, errors: list[OSError]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except OSError as exc:  # cannot listen: reported to start(), which re-raises it
            errors.append(exc)
            ready.set()
        finally:
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_response_prepare.append(self._record)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        ready.set()
        await self._stopping.wait()
        self.store.close_watchers()
        await asyncio.sleep(0)
        await runner.cleanup()

    def _call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` in the server's loop thread (or here, when the server is not running)."""
        loop = self._loop
        if self._thread is None or loop is None or threading.current_thread() is self._thread:
            return function()

        async def call() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    def _schedule(self, function: Callable[[], None]) -> None:
        """Run ``function`` soon in the loop (after the current request), or now outside it."""
        try:
            asyncio.get_running_loop().call_soon(function)
        except RuntimeError:
            function()

    # ---------------------------------------------------------------- public helpers

    def kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """Write a kubeconfig for kubectl, the kubernetes client and kopf; returns its path."""
        path = Path(path)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fakekube", "cluster": {"server": self.url}}],
            "users": [{"name": "fakekube", "user": {}}],
            "contexts": [
                {
                    "name": "fakekube",
                    "context": {"cluster": "fakekube", "user": "fakekube", "namespace": namespace},
                }
            ],
            "current-context": "fakekube",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    def write_pod_log(self, namespace: str, name: str, text: str | bytes, container: str | None = None) -> None:
        """Append ``text`` to the log of a container of an existing pod (default: its first container), as
        the kubelet collects a container's output; a pod created again under the same name starts empty."""

        def write() -> None:
            pod = self.store.lookup(POD_KEY, namespace, name)
            if pod is None:
                raise LookupError(f"pod {namespace}/{name} does not exist")
            names = _container_names(pod)
            chosen = container or (names[0] if names else None)
            if chosen not in names:
                raise LookupError(f"pod {namespace}/{name} has no container {chosen!r}")
            data = text.encode() if isinstance(text, str) else text
            self._pod_logs.setdefault((pod["metadata"]["uid"], chosen), bytearray()).extend(data)

        self._call(write)

    def install_crd(self, crd: JsonObj) -> JsonObj:
        """Create a CRD (or replace the spec of an existing one), as ``kubectl apply`` would."""
        rt = self._builtin(CRD_KEY)

        def install() -> JsonObj:
            name = crd.get("metadata", {}).get("name", "")
            current = self.store.lookup(CRD_KEY, "", name)
            if current is None:
                return self._create(rt, None, crd)
            replacement = {**clone(crd), "metadata": {**clone(current["metadata"]), **clone(crd["metadata"])}}
            replacement["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self._update(rt, current, self._checked_body(rt, None, replacement, name), None)

        installed: JsonObj = clone(self._call(install))
        return installed

    def install_crds_from_files(self, paths: Iterable[str | Path]) -> list[JsonObj]:
        """Install every CustomResourceDefinition found in (multi-document) YAML files."""
        installed = []
        for path in paths:
            for document in yaml.load_all(Path(path).read_text(), Loader=YAML_LOADER):
                if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
                    installed.append(self.install_crd(document))
        return installed

    @property
    def skipped_cel_rules(self) -> list[SkippedRule]:
        """CEL rules that were not enforced (compile failures, missing functions, optionalOldSelf)."""
        return list(self._cel.skipped)

    def writes(self, kind: str | None = None) -> int:
        """Count POST/PUT/PATCH/DELETE requests, optionally for one resource (plural or Kind)."""
        wanted = self._resource_names(kind) if kind else None
        count = 0
        for _, method, path, _, _ in list(self.requests):
            if method in ("POST", "PUT", "PATCH", "DELETE") and (
                wanted is None or resource_of_path(path) in wanted
            ):
                count += 1
        return count

    def stats(self) -> JsonObj:
        """Request counts: total, writes, by method and by resource plural."""
        requests = list(self.requests)
        return {
            "requests": len(requests),
            "writes": sum(1 for r in requests if r[1] in ("POST", "PUT", "PATCH", "DELETE")),
            "by_method": dict(collections.Counter(r[1] for r in requests)),
            "by_resource": dict(collections.Counter(resource_of_path(r[2]) or "" for r in requests)),
        }

    def reset_stats(self) -> None:
        self.requests.clear()
        self.request_log.clear()

    def _resource_names(self, kind: str) -> set[str]:
        names = {kind}
        for key in self.registry.storage_keys():
            rt = self.registry.storage_type(key)
            if rt is not None and rt.kind.lower() == kind.lower():
                names.add(rt.plural)
        return names

    async def _record(self, request: web.Request, response: web.StreamResponse) -> None:
        if not request.path.startswith("/_fake/"):
            now = time.monotonic()
            self.requests.append((now, request.method, request.path, request.query_string, response.status))
            body = None
            if request.method in ("PUT", "PATCH") and addresses_an_object(request.path):
                body = await request.read()  # already read by the handler: aiohttp keeps it
            self.request_log.append(
                RequestRecord(
                    now,
                    request.method,
                    request.path,
                    request.query_string,
                    response.status,
                    request.headers.get("User-Agent", ""),
                    request.content_type,
                    body,
                )
            )

    # ---------------------------------------------------------------- HTTP

    def fail_next(self, method: str, path: str, code: int, reason: str, message: str, *, times: int = 1,
                  retry_after: int | None = None) -> None:
        """Answer the next `times` requests of `method` whose path matches the regular expression `path`
        with this error (a Status object; `Retry-After` when given), as a faulty or refusing server would."""
        with self._faults_lock:
            self._faults.append(Fault(method, re.compile(path), ApiError(code, reason, message), times,
                                      retry_after))

    def _injected(self, request: web.Request) -> web.Response | None:
        with self._faults_lock:
            for fault in self._faults:
                if fault.method == request.method and fault.path.search(request.path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    response = self._respond(fault.error.to_status(), fault.error.code)
                    if fault.retry_after is not None:
                        response.headers["Retry-After"] = str(fault.retry_after)
                    return response
        return None

    # ---------------------------------------------------------------- random faults, stalls

    def inject_random_faults(self, config: ChaosConfig) -> Chaos:
        """From now on, answer targeted requests with random faults (:class:`ChaosConfig`); returns the
        running :class:`Chaos` (its counts and records)."""
        self._chaos = Chaos(config)
        return self._chaos

    def stop_random_faults(self) -> Chaos | None:
        """Serve every request faithfully again; returns the :class:`Chaos` that ran (None if none)."""
        chaos, self._chaos = self._chaos, None
        return chaos

    @property
    def chaos(self) -> Chaos | None:
        """The random faults at work, if any."""
        return self._chaos

    def hold_next(self, method: str, path: str, *, clients: str | None = None, times: int = 1,
                  when: Callable[[HeldRequest], bool] | None = None) -> Hold:
        """Stall the next `times` requests of `method` whose path matches the regular expression `path` (and
        whose User-Agent matches `clients`, and for which `when` is true, when given: it runs in the server's
        loop, before the request is served, and may read :attr:`store`) until the returned :class:`Hold` is
        released."""
        hold = Hold(method, path, clients, times, when)
        with self._faults_lock:
            self._holds.append(hold)
        return hold

    async def _held(self, request: web.Request) -> tuple[Hold, HeldRequest] | None:
        """The hold that claims this request, if any (and the request as it holds it)."""
        user_agent = request.headers.get("User-Agent", "")
        with self._faults_lock:
            self._holds = [h for h in self._holds if h.released is None]
            candidates = [h for h in self._holds if h.matches(request.method, request.path, user_agent)]
        if not candidates:
            return None
        held = HeldRequest(request.method, request.path, user_agent, await request.read())
        hold = next((h for h in candidates if h.claim(held)), None)
        return (hold, held) if hold is not None else None

    async def _chaos_answer(self, chaos: Chaos, request: web.Request) -> web.StreamResponse | None:
        """A random fault instead of the answer (None: serve it); records the request either way."""
        method, path = request.method, request.path
        watch = method == "GET" and is_watch(path, request.query)
        choices: tuple[FaultKind, ...]
        if watch:
            choices = ("internal", "throttle", "watch-expired")
        elif method in WRITE_METHODS:
            choices = ("conflict", "internal", "throttle")
        else:
            choices = ("internal", "throttle")
        body = await request.read() if method == "POST" else None
        fault = chaos.draw(choices)
        chaos.record(ChaosRecord(time.monotonic(), method, path, request.query_string, fault, body))
        if fault is None:
            return None
        if fault == "watch-expired":
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(self._expired_event())
            return response
        error = self._random_fault(fault, path, body)
        response = self._respond(error.to_status(), error.code)
        if fault == "throttle":
            response.headers["Retry-After"] = str(chaos.config.retry_after)
        return response

    def _random_fault(self, fault: FaultKind, path: str, body: bytes | None) -> ApiError:
        """The Status a real apiserver answers for that kind of fault, worded as it words it."""
        if fault == "internal":
            return ApiError(500, "InternalError", "Internal error occurred: etcdserver: request timed out",
                            {"causes": [{"message": "etcdserver: request timed out"}]})
        if fault == "throttle":
            chaos = self._chaos
            seconds = chaos.config.retry_after if chaos is not None else 1
            return ApiError(429, "TooManyRequests", "Too many requests, please try again later.",
                            {"retryAfterSeconds": seconds})
        split = split_api_path(path)
        name = ""
        qualified = resource_of_path(path) or ""
        if split is not None and split[2]:
            _, plural, path_name, _ = split_resource_path(split[0], split[2])
            rt = self.registry.lookup(split[0], split[1], plural)
            qualified = rt.qualified_plural if rt is not None else plural
            name = path_name or ""
        if not name and body:
            try:
                name = str((json.loads(body).get("metadata") or {}).get("name") or "")
            except (ValueError, AttributeError):
                name = ""
        return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {qualified} "{name}": the object has '
                        "been modified; please apply your changes to the latest version and try again",
                        {"name": name, "kind": qualified.split(".", 1)[0]})

    def _expired_event(self) -> bytes:
        """The watch-stream ERROR line of a real apiserver whose watch cache lost the client's place."""
        current = self.store.resource_version
        error = ApiError(410, "Expired", f"too old resource version: {max(current - 1, 1)} ({current})")
        return dumps({"type": "ERROR", "object": error.to_status()}) + b"\n"

    def _stream_interruption(self, request: web.Request,
                             response: web.StreamResponse) -> Callable[[], Awaitable[bool]]:
        """Before each batch of events of a watch: while random faults are on and its client is targeted,
        maybe break the stream instead (True: broken)."""
        user_agent = request.headers.get("User-Agent", "")

        async def interrupt() -> bool:
            chaos = self._chaos
            if chaos is None or not chaos.targets(user_agent, request.path):
                return False
            fault = chaos.draw(("watch-expired", "watch-drop"))
            if fault == "watch-expired":
                await response.write(self._expired_event())
                return True
            if fault == "watch-drop":
                if request.transport is not None:
                    request.transport.abort()  # no terminating chunk: the client sees a cut connection
                return True
            return False

        return interrupt

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.write_latency and request.method in ("POST", "PUT", "PATCH", "DELETE"):
            await asyncio.sleep(self.write_latency)
        held = await self._held(request) if self._holds else None
        if held is not None and not await held[0].stall(held[1]):
            if request.transport is not None:
                request.transport.abort()  # dropped: never served, the connection cut
            return web.Response(status=503)
        injected = self._injected(request)
        if injected is not None:
            return injected
        chaos = self._chaos
        if chaos is not None and chaos.targets(request.headers.get("User-Agent", ""), request.path):
            answer = await self._chaos_answer(chaos, request)
            if answer is not None:
                return answer
        try:
            return await self._route(request)
        except ApiError as error:
            return self._respond(error.to_status(), error.code)

    @staticmethod
    def _respond(body: Any, status: int = 200, rt: ResourceType | None = None) -> web.Response:
        headers = {}
        if rt is not None and rt.deprecation_warning:
            headers["Warning"] = f'299 - "{rt.deprecation_warning}"'
        return web.Response(body=dumps(body), status=status, content_type="application/json", headers=headers)

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        fixed = self._fixed_endpoint(request.method, path)
        if fixed is not None:
            return self._respond(fixed)
        split = split_api_path(path)
        if split is None or request.method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise resource_not_found()
        group, version, rest = split
        if not rest:
            return self._respond(self._resource_list(group, version))
        if group == CORE_GROUP and len(rest) == 5 and rest[0] == "namespaces" and rest[2:5:2] == ["pods", "log"]:
            if request.method != "GET":
                raise ApiError(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            return await self._pod_log(request, rest[1], rest[3])
        target = self._target(group, version, rest)
        return await self._serve_resource(request, target, watch=rest[0] == "watch")

    def _fixed_endpoint(self, method: str, path: str) -> Any:
        """Discovery, health and the fake's own endpoints; None for resource paths."""
        if method == "POST" and path == "/_fake/reset":
            self.reset_stats()
            return {"reset": True}
        if method != "GET":
            return None
        groups = self.registry.group_versions()
        if path == "/version":
            return SERVER_VERSION
        if path == "/_fake/stats":
            return self.stats()
        if path == "/api":
            address = f"{self.host}:{self.port}"
            return {
                "kind": "APIVersions",
                "versions": groups.get(CORE_GROUP, []),
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
            }
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [self._api_group(g, vs) for g, vs in groups.items() if g],
            }
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in groups:
            return {"kind": "APIGroup", "apiVersion": "v1", **self._api_group(parts[1], groups[parts[1]])}
        if path == "/openapi/v3":
            return self._openapi_index(groups)
        if path.startswith("/openapi/v3/"):
            return self._openapi_group_version(path.removeprefix("/openapi/v3"))
        if path.startswith("/openapi"):
            raise resource_not_found()
        return None

    def _openapi_index(self, groups: Mapping[str, list[str]]) -> JsonObj:
        """``/openapi/v3``: one document per group/version."""
        paths = {}
        for group, versions in groups.items():
            for version in versions:
                prefix = f"apis/{group}/{version}" if group else f"api/{version}"
                digest = hashlib.sha256(dumps(self._openapi_group_version(f"/{prefix}"))).hexdigest()[:16]
                paths[prefix] = {"serverRelativeURL": f"/openapi/v3/{prefix}?hash={digest}"}
        return {"paths": paths}

    def _openapi_group_version(self, prefix: str) -> JsonObj:
        """A skeleton OpenAPI v3 document: no schemas, only the PATCH operations and their
        ``fieldValidation`` parameter, so kubectl relies on server-side field validation
        (``fieldValidation=Strict``) instead of downloading schemas to validate client-side."""
        split = split_api_path(prefix)
        types = self.registry.resources(split[0], split[1]) if split and not split[2] else []
        if not types:
            raise resource_not_found()
        paths = {}
        for rt in types:
            scope = "/namespaces/{namespace}" if rt.namespaced else ""
            operation = {
                "x-kubernetes-group-version-kind": {
                    "group": rt.group,
                    "version": rt.version,
                    "kind": rt.kind,
                },
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {},
            }
            paths[f"{prefix}{scope}/{rt.plural}/{{name}}"] = {"patch": operation}
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths,
            "components": {"schemas": {}},
        }

    @staticmethod
    def _api_group(group: str, versions: list[str]) -> JsonObj:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def _resource_list(self, group: str, version: str) -> JsonObj:
        types = self.registry.resources(group, version)
        if not types:
            raise resource_not_found()
        resources: list[JsonObj] = []
        for rt in types:
            entry: JsonObj = {
                "name": rt.plural,
                "singularName": rt.singular_name,
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": list(ALL_VERBS),
            }
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            resources.append(entry)
            if rt.status_subresource:
                resources.append(
                    {
                        "name": f"{rt.plural}/status",
                        "singularName": "",
                        "namespaced": rt.namespaced,
                        "kind": rt.kind,
                        "verbs": list(STATUS_VERBS),
                    }
                )
        group_version = f"{group}/{version}" if group else version
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }

    def _target(self, group: str, version: str, rest: list[str]) -> Target:
        namespace, plural, name, subresource = split_resource_path(group, rest)
        rt = self.registry.lookup(group, version, plural or "")
        if rt is None or (namespace is not None and not rt.namespaced):
            raise resource_not_found()
        if rt.namespaced and namespace is None and name is not None:
            raise resource_not_found()
        if subresource not in (None, "status") or (subresource == "status" and not rt.status_subresource):
            raise resource_not_found()
        return Target(rt, namespace, name, subresource)

    async def _serve_resource(
        self, request: web.Request, target: Target, *, watch: bool
    ) -> web.StreamResponse:
        rt, query, method = target.rt, request.query, request.method
        if method == "GET" and (watch or query_flag(query.get("watch"))):
            return await self._watch(request, target)
        if method == "GET":
            body = self._read(target, query, request.headers.get("Accept", ""))
            return self._respond(body, 200, rt)
        options = WriteOptions.from_query(query)
        if target.subresource is not None and method not in ("PUT", "PATCH"):
            raise ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        if method == "POST" and target.name is None and target.namespace is None and rt.namespaced:
            raise ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        if method == "DELETE":
            delete_options = await self._body(request, optional=True) or {}
            return self._respond(self._call_delete(target, query, delete_options, options.dry_run), 200, rt)
        if method == "POST" and target.name is None:
            return self._respond(
                self._create(rt, target.namespace, await self._body(request), options), 201, rt
            )
        if target.name is None or method == "POST":
            raise ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        if method == "PATCH" and request.content_type == APPLY_PATCH:
            body, status = self._apply(target, await request.read(), query, options)
            return self._respond(body, status, rt)
        current = self._require(target)
        if method == "PUT":
            obj = self._checked_body(rt, target.namespace, await self._body(request), target.name)
            self._check_update_precondition(rt, current, obj["metadata"].get("resourceVersion"))
        else:
            obj = self._patched(target, current, request.content_type, await request.read())
        return self._respond(self._update(rt, current, obj, target.subresource, options), 200, rt)

    async def _body(self, request: web.Request, *, optional: bool = False) -> Any:
        raw = await request.read()
        if not raw.strip():
            if optional:
                return None
            raise bad_request("the request body is empty")
        return self._decode(raw, request.content_type)

    @staticmethod
    def _decode(raw: bytes, content_type: str) -> Any:
        if content_type == PROTOBUF:
            return FakeKubeAPI._decode_protobuf(raw)
        if "protobuf" in content_type or "cbor" in content_type:
            raise ApiError(415, "UnsupportedMediaType", f"fakekube cannot decode {content_type}")
        try:
            if "yaml" in content_type:
                return yaml.load(raw, Loader=YAML_LOADER)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"the object provided is unrecognized: {exc}") from exc

    @staticmethod
    def _decode_protobuf(raw: bytes) -> JsonObj:
        try:
            return decode_protobuf(raw)
        except LookupError as exc:
            message = (
                f"fakekube decodes protobuf bodies of {', '.join(PROTOBUF_KINDS)} only, not {exc}: "
                "send JSON (kubectl apply -f / create -f do)"
            )
            raise ApiError(415, "UnsupportedMediaType", message) from exc
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise bad_request(f"the object provided is unrecognized: {exc}") from exc

    # ---------------------------------------------------------------- reads

    def _require(self, target: Target) -> JsonObj:
        assert target.name is not None
        obj = self.store.lookup(target.rt.key, target.namespace or "", target.name)
        if obj is None:
            raise target.rt.not_found(target.name)
        return obj

    def _filter(self, target: Target, query: Mapping[str, str]) -> Filter:
        fields = parse_selector(query.get("fieldSelector", ""))
        rt = target.rt
        if rt.custom:
            allowed = {"metadata.name", "metadata.namespace", *rt.selectable_fields}
            for requirement in fields:
                if requirement.key not in allowed:
                    raise bad_request(
                        f'"{requirement.key}" is not a known field selector: only '
                        f'"metadata.name", "metadata.namespace"'
                    )
        for requirement in fields:
            if requirement.op not in ("=", "!="):
                raise bad_request(f"invalid field selector operator in {requirement.key}")
        if target.name is not None:
            fields += (Requirement("metadata.name", "=", (target.name,)),)
        return Filter(target.namespace, parse_selector(query.get("labelSelector", "")), fields)

    def _read(self, target: Target, query: Mapping[str, str], accept: str) -> JsonObj:
        rt = target.rt
        if target.name is not None:
            obj = self._present(rt, self._require(target))
            return self._table(rt, [obj], query) if wants_table(accept) else obj
        selection = self._filter(target, query)
        items = [
            self._present(rt, o) for o in self.store.objects(rt.key, target.namespace) if selection.matches(o)
        ]
        if wants_table(accept):
            return self._table(rt, items, query)
        if not rt.custom:
            items = [{k: v for k, v in o.items() if k not in ("apiVersion", "kind")} for o in items]
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self.store.resource_version)},
            "items": items,
        }

    @staticmethod
    def _present(rt: ResourceType, obj: JsonObj) -> JsonObj:
        return with_api_version(obj, rt.group, rt.version)

    # ---------------------------------------------------------------- tables

    @staticmethod
    def _columns(rt: ResourceType) -> list[JsonObj]:
        name = {
            "name": "Name",
            "type": "string",
            "format": "name",
            "priority": 0,
            "description": "Name must be unique within a namespace.",
        }
        age = {
            "name": "Age",
            "type": "date",
            "jsonPath": ".metadata.creationTimestamp",
            "priority": 0,
            "description": "CreationTimestamp is a timestamp representing the server time when this "
            "object was created.",
        }
        return [name, *(rt.printer_columns or [age])]

    def _table(self, rt: ResourceType, objs: list[JsonObj], query: Mapping[str, str]) -> JsonObj:
        columns = self._columns(rt)
        paths = [JsonPath.parse(c["jsonPath"]) if "jsonPath" in c else None for c in columns]
        include = query.get("includeObject", "Metadata")
        now = time.time()
        rows = []
        for obj in objs:
            cells = [
                table_cell(c.get("type", "string"), p.find(obj) if p else [obj["metadata"]["name"]], now)
                for c, p in zip(columns, paths, strict=True)
            ]
            row: JsonObj = {"cells": cells}
            if include == "Object":
                row["object"] = obj
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                }
            rows.append(row)
        definitions = [
            {
                "name": c["name"],
                "type": c.get("type", "string"),
                "format": c.get("format", ""),
                "description": c.get("description", ""),
                "priority": c.get("priority", 0),
            }
            for c in columns
        ]
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(self.store.resource_version)},
            "columnDefinitions": definitions,
            "rows": rows,
        }

    # ---------------------------------------------------------------- pod logs

    async def _pod_log(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        """``GET /api/v1/namespaces/<ns>/pods/<name>/log``: the log ``write_pod_log`` wrote."""
        query = request.query
        for unsupported in ("timestamps", "sinceSeconds", "sinceTime"):
            if unsupported in query:
                raise bad_request(f"{unsupported}: not supported by the fake API server")
        pod = self.store.lookup(POD_KEY, namespace, name)
        if pod is None:
            raise self._builtin(POD_KEY).not_found(name)
        names = _container_names(pod)
        container = query.get("container")
        if not container:
            if len(names) != 1:
                raise bad_request(f"a container name must be specified for pod {name}, "
                                  f"choose one of: [{' '.join(names)}]")
            container = names[0]
        if container not in names:
            raise bad_request(f"container {container} is not valid for pod {name}")
        if query_flag(query.get("previous")):
            raise bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
        waiting = _container_waiting(pod, container)
        if waiting is not None:
            raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: {waiting}')
        tail, limit = query_int(query, "tailLines"), query_int(query, "limitBytes")
        uid = pod["metadata"]["uid"]
        key = (uid, container)
        log = bytes(self._pod_logs.get(key, b""))
        offset = len(log)  # a follow stream continues from here
        if tail is not None:
            lines = log.splitlines(keepends=True)
            log = b"".join(lines[max(len(lines) - tail, 0):])
        sent = 0

        def bounded(data: bytes) -> bytes:
            return data if limit is None else data[: max(limit - sent, 0)]

        if not query_flag(query.get("follow")):
            return web.Response(body=bounded(log), status=200, content_type="text/plain")
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            chunk = bounded(log)
            while True:
                if chunk:
                    await response.write(chunk)
                    sent += len(chunk)
                if limit is not None and sent >= limit:
                    break
                current = self.store.lookup(POD_KEY, namespace, name)
                ended = current is None or current["metadata"]["uid"] != uid or _container_ended(current, container)
                data = self._pod_logs.get(key, b"")
                chunk = bounded(bytes(data[offset:]))
                offset = len(data)
                if ended and not chunk:
                    break
                if not chunk:
                    await asyncio.sleep(0.02)
        except ConnectionError:
            pass  # the client went away
        return response

    # ---------------------------------------------------------------- watches

    async def _watch(self, request: web.Request, target: Target) -> web.StreamResponse:
        query = request.query
        rt = target.rt
        timeout = query_int(query, "timeoutSeconds")
        since = query_int(query, "resourceVersion")
        initial = query_flag(query.get("sendInitialEvents"))
        watcher = Watcher(rt.key, self._filter(target, query), asyncio.Queue())
        table = wants_table(request.headers.get("Accept", ""))
        render = functools.partial(self._event_line, rt=rt, query=query if table else None)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            self.store.subscribe(watcher, None if initial or not since else since)
        except ApiError as error:
            await response.prepare(request)
            await response.write(dumps({"type": "ERROR", "object": error.to_status()}) + b"\n")
            return response
        await response.prepare(request)
        interrupt = self._stream_interruption(request, response)
        try:
            if initial:
                await response.write(b"".join(self._initial_events(watcher, rt, render)))
            bookmarks = query_flag(query.get("allowWatchBookmarks"))
            await self._stream(response, watcher, rt, render, timeout, bookmarks, interrupt)
        except ConnectionError:
            pass  # the client went away
        finally:
            self.store.unsubscribe(watcher)
        return response

    def _initial_events(self, watcher: Watcher, rt: ResourceType, render: Renderer) -> list[bytes]:
        """``sendInitialEvents``: the current objects, then a bookmark marking their end."""
        lines = []
        while not watcher.queue.empty():
            item = watcher.queue.get_nowait()
            if item is not None:
                lines.append(render(*item))
        bookmark = self._bookmark(rt)
        bookmark["metadata"]["annotations"] = {"k8s.io/initial-events-end": "true"}
        return [*lines, dumps({"type": "BOOKMARK", "object": bookmark}) + b"\n"]

    async def _stream(
        self,
        response: web.StreamResponse,
        watcher: Watcher,
        rt: ResourceType,
        render: Renderer,
        timeout: int | None,
        bookmarks: bool,
        interrupt: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """Write events as they come, bookmarks when idle, until the timeout or the server stops (or
        `interrupt`, asked before each batch of events, breaks the stream: random faults)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        while True:
            waits = [deadline - loop.time()] if deadline is not None else []
            if bookmarks:
                waits.append(self.bookmark_interval)
            try:
                item = await asyncio.wait_for(watcher.queue.get(), min(waits) if waits else None)
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    return
                await response.write(dumps({"type": "BOOKMARK", "object": self._bookmark(rt)}) + b"\n")
                continue
            items = [item]
            while not watcher.queue.empty():
                items.append(watcher.queue.get_nowait())
            lines = [render(*i) for i in items if i is not None]
            if lines and interrupt is not None and await interrupt():
                return
            if lines:
                await response.write(b"".join(lines))
            if None in items:
                return

    def _bookmark(self, rt: ResourceType) -> JsonObj:
        return {
            "kind": rt.kind,
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self.store.resource_version)},
        }

    def _event_line(
        self, event_type: str, event: WatchEvent, *, rt: ResourceType, query: Mapping[str, str] | None
    ) -> bytes:
        """One watch-stream line; ``query`` given: the object as a Table with those options."""
        if query is not None:
            shown = self._table(rt, [self._present(rt, event.obj)], query)
            return dumps({"type": event_type, "object": shown}) + b"\n"
        cache_key = (event_type, rt.api_version)
        line = event.lines.get(cache_key)
        if line is None:
            line = dumps({"type": event_type, "object": self._present(rt, event.obj)}) + b"\n"
            event.lines[cache_key] = line
        return line

    # ---------------------------------------------------------------- writes

    def _checked_body(self, rt: ResourceType, namespace: str | None, body: Any, name: str | None) -> JsonObj:
        """A mutable copy of a request body, its type and namespace checked against the URL."""
        if not isinstance(body, dict):
            raise bad_request("the object provided is unrecognized: expected a JSON object")
        obj: JsonObj = clone(body)
        if not rt.custom:  # built-in kinds take their type from the URL when the body omits it
            obj.setdefault("apiVersion", rt.api_version)
            obj.setdefault("kind", rt.kind)
        if not obj.get("kind"):
            raise bad_request(f"Object 'Kind' is missing in '{json.dumps(body)[:200]}'")
        if obj.get("apiVersion") != rt.api_version:
            raise bad_request(
                f"the API version in the data ({obj.get('apiVersion')}) does not match the expected "
                f"API version ({rt.api_version})"
            )
        if obj["kind"] != rt.kind:
            raise bad_request(
                f"the kind in the data ({obj['kind']}) does not match the expected kind ({rt.kind})"
            )
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        meta.pop("managedFields", None)
        if not rt.namespaced:
            meta.pop("namespace", None)
        elif namespace is not None:
            if meta.get("namespace", namespace) != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        if name is not None and meta.get("name") != name:
            raise bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        return obj

    def _admission_errors(
        self, rt: ResourceType, obj: JsonObj, old: JsonObj | None, *, status_only: bool, strict: bool
    ) -> list[FieldError]:
        """Prune, default and validate ``obj`` in place; the field errors found."""
        errors = [] if status_only else metadata_errors(obj["metadata"], rt.name_rule)
        if rt.schema is not None and self.validate_schemas:
            unknown: list[str] = []
            errors += rt.schema.admit(obj, old, status_only=status_only, unknown=unknown)
            if strict and unknown:
                fields = ", ".join(f'unknown field "{field}"' for field in unknown)
                raise bad_request(
                    f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                    f"strict decoding error: {fields}"
                )
        if rt.key == CRD_KEY:
            errors += crd_errors(obj)
        return errors

    def _create(
        self, rt: ResourceType, namespace: str | None, body: Any, options: WriteOptions = DEFAULT_WRITE
    ) -> JsonObj:
        obj = self._checked_body(rt, namespace, body, None)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        name = self._choose_name(rt, meta)
        self._check_namespace_open(rt, meta.get("namespace"), name)
        for field in SYSTEM_METADATA:
            meta.pop(field, None)
        if rt.status_subresource:
            obj.pop("status", None)
        if rt.key in DEFAULTERS:
            DEFAULTERS[rt.key](obj, None)
        errors = self._admission_errors(rt, obj, None, status_only=False, strict=options.strict)
        if errors:
            raise rt.invalid(name, errors)
        if self.store.lookup(rt.key, meta.get("namespace", ""), name) is not None:
            raise ApiError(
                409, "AlreadyExists", f'{rt.qualified_plural} "{name}" already exists', rt.details(name)
            )
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
        if rt.tracks_generation:
            meta["generation"] = 1
        obj["apiVersion"] = rt.storage_api_version
        if options.dry_run:
            return self._present(rt, obj)
        if meta.get("namespace"):
            self._ensure_namespace(meta["namespace"])
        stored = self.store.write(rt.key, obj, "ADDED", None)
        self._after_write(rt, stored, None)
        return self._present(rt, stored)

    def _choose_name(self, rt: ResourceType, meta: JsonObj) -> str:
        if meta.get("name"):
            return str(meta["name"])
        prefix = meta.get("generateName")
        if not prefix:
            raise rt.invalid("", [FieldError.required("metadata.name", "name or generateName is required")])
        while True:
            name = str(prefix)[:58] + "".join(random.choices(GENERATE_NAME_CHARS, k=5))
            if self.store.lookup(rt.key, meta.get("namespace", ""), name) is None:
                meta["name"] = name
                return name

    def _check_namespace_open(self, rt: ResourceType, namespace: str | None, name: str) -> None:
        ns = self.store.lookup(NAMESPACE_KEY, "", namespace) if namespace else None
        if ns is not None and ns["metadata"].get("deletionTimestamp"):
            message = (
                f'{rt.qualified_plural} "{name}" is forbidden: unable to create new content in namespace '
                f"{namespace} because it is being terminated"
            )
            raise ApiError(403, "Forbidden", message, rt.details(name))

    def _ensure_namespace(self, namespace: str) -> None:
        if self.store.lookup(NAMESPACE_KEY, "", namespace) is None:
            self._create(self._builtin(NAMESPACE_KEY), None, {"metadata": {"name": namespace}})

    def _builtin(self, key: ResourceKey) -> ResourceType:
        rt = self.registry.storage_type(key)
        assert rt is not None
        return rt

    @staticmethod
    def _check_update_precondition(rt: ResourceType, current: JsonObj, resource_version: Any) -> None:
        name = current["metadata"]["name"]
        if resource_version:
            if str(resource_version) != current["metadata"]["resourceVersion"]:
                raise rt.conflict(
                    name,
                    "the object has been modified; please apply your changes to the latest "
                    "version and try again",
                )
        elif rt.custom:
            error = FieldError.invalid("metadata.resourceVersion", 0, "must be specified for an update")
            raise rt.invalid(name, [error])

    def _apply(
        self, target: Target, raw: bytes, query: Mapping[str, str], options: WriteOptions
    ) -> tuple[JsonObj, int]:
        """Server-side apply, simplified: create the object, or merge the applied configuration into
        it, removing what this field manager applied before and no longer does (no conflicts)."""
        manager = query.get("fieldManager")
        if not manager:
            raise bad_request("PATCH requests with apply content type require fieldManager")
        assert target.name is not None
        rt, name = target.rt, target.name
        applied = self._checked_body(rt, target.namespace, self._decode(raw, "application/yaml"), name)
        current = self.store.lookup(rt.key, target.namespace or "", name)
        if current is None:
            if target.subresource is not None:
                raise rt.not_found(name)
            result, status = self._create(rt, target.namespace, applied, options), 201
        else:
            previous = self._applied.get(current["metadata"]["uid"], {}).get(manager, {})
            patched = merge_patch(clone(self._present(rt, current)), apply_patch(previous, applied))
            obj = self._checked_body(rt, target.namespace, patched, name)
            self._check_update_precondition(rt, current, obj["metadata"].get("resourceVersion"))
            result, status = self._update(rt, current, obj, target.subresource, options), 200
        if not options.dry_run and self.store.lookup(rt.key, target.namespace or "", name) is not None:
            self._applied.setdefault(result["metadata"]["uid"], {})[manager] = applied
        return result, status

    def _patched(self, target: Target, current: JsonObj, content_type: str, raw: bytes) -> JsonObj:
        """The object that a PATCH request makes of ``current``."""
        rt = target.rt
        if content_type not in (
            "application/merge-patch+json",
            "application/json-patch+json",
            "application/strategic-merge-patch+json",
        ):
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f"application/json-patch+json, application/merge-patch+json, "
                f"application/apply-patch+yaml, application/strategic-merge-patch+json ({content_type})",
            )
        patch = self._decode(raw, content_type)
        document = self._present(rt, current)
        if content_type == "application/json-patch+json":
            patched = json_patch(document, patch)
        else:
            if not isinstance(patch, dict):
                raise bad_request("the patch must be a JSON object")
            if content_type == "application/strategic-merge-patch+json":
                patch = strip_strategic_directives(patch)
            patched = merge_patch(clone(document), patch)
        obj = self._checked_body(rt, target.namespace, patched, target.name)
        self._check_update_precondition(rt, current, obj["metadata"].get("resourceVersion"))
        return obj

    def _update(
        self,
        rt: ResourceType,
        current: JsonObj,
        obj: JsonObj,
        subresource: str | None,
        options: WriteOptions = DEFAULT_WRITE,
    ) -> JsonObj:
        """Write ``obj`` (a checked, mutable body) over ``current``; the shared core of PUT and PATCH."""
        status_only = subresource == "status"
        new = self._merged_update(rt, current, obj, status_only)
        name = new["metadata"]["name"]
        errors = self._admission_errors(rt, new, current, status_only=status_only, strict=options.strict)
        errors += self._finalizer_errors(current, new)
        if errors:
            raise rt.invalid(name, errors)
        if rt.tracks_generation and self._spec_changed(rt, current, new):
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if new == current or options.dry_run:
            return self._present(rt, new)
        if new["metadata"].get("deletionTimestamp") and self._ready_to_remove(rt, new):
            return self._present(rt, self._remove(rt, current))
        stored = self.store.write(rt.key, new, "MODIFIED", current)
        self._after_write(rt, stored, current)
        return self._present(rt, stored)

    @staticmethod
    def _merged_update(rt: ResourceType, current: JsonObj, obj: JsonObj, status_only: bool) -> JsonObj:
        """What an update would store: system metadata and the other endpoint's part kept."""
        if status_only:
            new: JsonObj = clone(current)
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
            return new
        meta, old_meta = obj["metadata"], current["metadata"]
        for field in SYSTEM_METADATA:
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        if rt.status_subresource:
            if "status" in current:
                obj["status"] = clone(current["status"])
            else:
                obj.pop("status", None)
        if rt.key in DEFAULTERS:
            DEFAULTERS[rt.key](obj, current)
        obj["apiVersion"] = rt.storage_api_version
        return obj

    @staticmethod
    def _finalizer_errors(current: JsonObj, new: JsonObj) -> list[FieldError]:
        if not current["metadata"].get("deletionTimestamp"):
            return []
        added = set(new["metadata"].get("finalizers") or ()) - set(
            current["metadata"].get("finalizers") or ()
        )
        if not added:
            return []
        return [
            FieldError.forbidden(
                "metadata.finalizers",
                f"no new finalizers can be added if the object is being "
                f"deleted, found new finalizers {sorted(added)}",
            )
        ]

    @staticmethod
    def _spec_changed(rt: ResourceType, old: JsonObj, new: JsonObj) -> bool:
        ignored = ("metadata", "status") if rt.status_subresource else ("metadata",)
        return {k: v for k, v in old.items() if k not in ignored} != {
            k: v for k, v in new.items() if k not in ignored
        }

    def _after_write(self, rt: ResourceType, stored: JsonObj, old: JsonObj | None) -> None:
        if rt.key == CRD_KEY:
            self._register_crd(stored)
        refs = stored["metadata"].get("ownerReferences")
        if refs and refs != (old or {}).get("metadata", {}).get("ownerReferences"):
            meta = stored["metadata"]
            self._schedule(
                functools.partial(self._garbage_collect, rt.key, meta.get("namespace", ""), meta["name"])
            )

    # ---------------------------------------------------------------- deletion and garbage collection

    def _call_delete(self, target: Target, query: Mapping[str, str], options: Any, dry_run: bool) -> JsonObj:
        if not isinstance(options, dict):
            raise bad_request("DeleteOptions must be an object")
        policy = query.get("propagationPolicy") or options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is True:
            policy = "Orphan"
        rt = target.rt
        if target.name is not None:
            return self._delete(rt, self._require(target), options, policy, dry_run)
        selection = self._filter(target, query)
        chosen = [o["metadata"] for o in self.store.objects(rt.key, target.namespace) if selection.matches(o)]
        deleted = [
            self._delete_if_present(rt, m.get("namespace", ""), m["name"], options, policy, dry_run)
            for m in chosen
        ]
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self.store.resource_version)},
            "items": [d for d in deleted if d is not None],
        }

    def _delete_if_present(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        options: JsonObj,
        policy: str | None,
        dry_run: bool = False,
    ) -> JsonObj | None:
        """Delete an object unless an earlier cascade already removed it."""
        current = self.store.lookup(rt.key, namespace, name)
        return None if current is None else self._delete(rt, current, options, policy, dry_run)

    def _delete(
        self, rt: ResourceType, current: JsonObj, options: JsonObj, policy: str | None, dry_run: bool
    ) -> JsonObj:
        """Delete one object (DELETE semantics); returns the response body."""
        meta = current["metadata"]
        self._check_delete_preconditions(rt, current, options.get("preconditions") or {})
        if dry_run or meta.get("deletionTimestamp"):
            return self._present(rt, current)
        if policy == "Orphan":
            self._orphan_dependents(meta["uid"])
        if meta.get("finalizers") or rt.key in (NAMESPACE_KEY, CRD_KEY):
            return self._present(rt, self._mark_deleted(rt, current))
        final = self._remove(rt, current)
        if rt.returns_deleted_object:
            return self._present(rt, final)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {**rt.details(meta["name"]), "uid": meta["uid"]},
        }

    @staticmethod
    def _check_delete_preconditions(rt: ResourceType, current: JsonObj, preconditions: JsonObj) -> None:
        meta = current["metadata"]
        for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted = preconditions.get(field)
            if wanted and wanted != meta.get(field):
                raise rt.conflict(
                    meta["name"],
                    f"Precondition failed: {label} in precondition: {wanted}, "
                    f"{label} in object meta: {meta.get(field)}",
                )

    def _mark_deleted(self, rt: ResourceType, current: JsonObj) -> JsonObj:
        """Start a deletion that finalizers (or namespace/CRD cleanup) must finish."""
        marked: JsonObj = clone(current)
        meta = marked["metadata"]
        meta.update(deletionTimestamp=now_rfc3339(), deletionGracePeriodSeconds=0)
        if rt.tracks_generation:
            meta["generation"] = meta.get("generation", 1) + 1
        if rt.key == NAMESPACE_KEY:
            marked["status"] = {**marked.get("status", {}), "phase": "Terminating"}
        stored = self.store.write(rt.key, marked, "MODIFIED", current)
        if rt.key == NAMESPACE_KEY:
            self._terminate_namespace(meta["name"])
        elif rt.key == CRD_KEY:
            self._terminate_crd(stored)
        return self.store.lookup(rt.key, meta.get("namespace", ""), meta["name"]) or stored

    def _ready_to_remove(self, rt: ResourceType, obj: JsonObj) -> bool:
        meta = obj["metadata"]
        if meta.get("finalizers"):
            return False
        return not (rt.key == NAMESPACE_KEY and self.store.has_objects_in(meta["name"]))

    def _remove(self, rt: ResourceType, current: JsonObj) -> JsonObj:
        """Remove an object for good: DELETED event, garbage collection, cleanup of its container."""
        final = self.store.delete(rt.key, current)
        meta = final["metadata"]
        self._applied.pop(meta["uid"], None)
        if rt.key == CRD_KEY:
            self._unregister_crd(final)
        for dependent in self.store.dependents(meta["uid"]):
            self._garbage_collect(*dependent)
        namespace = meta.get("namespace")
        if namespace:
            self._finish_namespace(namespace)
        if rt.custom:
            self._finish_crd(f"{rt.plural}.{rt.group}")
        return final

    def _owner_alive(self, ref: JsonObj, namespace: str) -> bool:
        located = self.store.locate(ref.get("uid", ""))
        if located is None:
            return False
        owner_namespace = located[1]
        return owner_namespace in ("", namespace)

    def _garbage_collect(self, key: ResourceKey, namespace: str, name: str) -> None:
        """Garbage-collect a dependent: drop dangling owner references, delete it if no owner lives.

        Like the real garbage collector, a failure is logged and never fails the request at hand.
        """
        try:
            self._collect_if_orphaned(key, namespace, name)
        except ApiError as error:
            log.warning("fakekube: garbage collection of %s %s/%s failed: %s", key, namespace, name, error)

    def _collect_if_orphaned(self, key: ResourceKey, namespace: str, name: str) -> None:
        dependent = self.store.lookup(key, namespace, name)
        rt = self.registry.storage_type(key)
        if dependent is None or rt is None:
            return
        refs = dependent["metadata"].get("ownerReferences") or []
        alive = [ref for ref in refs if self._owner_alive(ref, namespace)]
        if len(alive) == len(refs):
            return
        if alive:
            self._rewrite_owner_references(rt, dependent, alive)
        elif not dependent["metadata"].get("deletionTimestamp"):
            self._delete(rt, dependent, {}, "Background", False)

    def _rewrite_owner_references(self, rt: ResourceType, obj: JsonObj, refs: list[JsonObj]) -> None:
        updated: JsonObj = clone(obj)
        if refs:
            updated["metadata"]["ownerReferences"] = refs
        else:
            updated["metadata"].pop("ownerReferences", None)
        self._update(rt, obj, updated, None)

    def _orphan_dependents(self, owner_uid: str) -> None:
        for key, namespace, name in self.store.dependents(owner_uid):
            dependent = self.store.lookup(key, namespace, name)
            rt = self.registry.storage_type(key)
            if dependent is not None and rt is not None:
                refs = [
                    r for r in dependent["metadata"].get("ownerReferences") or () if r.get("uid") != owner_uid
                ]
                self._rewrite_owner_references(rt, dependent, refs)

    def _terminate_namespace(self, namespace: str) -> None:
        """The namespace controller: delete everything in a terminating namespace."""
        for key in self.registry.storage_keys():
            rt = self.registry.storage_type(key)
            if rt is None or not rt.namespaced:
                continue
            for name in [o["metadata"]["name"] for o in self.store.objects(key, namespace)]:
                self._delete_if_present(rt, namespace, name, {}, "Background")
        self._finish_namespace(namespace)

    def _finish_namespace(self, namespace: str) -> None:
        ns = self.store.lookup(NAMESPACE_KEY, "", namespace)
        rt = self._builtin(NAMESPACE_KEY)
        if ns is not None and ns["metadata"].get("deletionTimestamp") and self._ready_to_remove(rt, ns):
            self._remove(rt, ns)

    def _terminate_crd(self, crd: JsonObj) -> None:
        """The CRD cleanup controller: delete every instance, then release the CRD."""
        key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
        rt = self.registry.storage_type(key)
        if rt is not None:
            for obj in self.store.objects(key):
                self._delete_if_present(
                    rt, obj["metadata"].get("namespace", ""), obj["metadata"]["name"], {}, "Background"
                )
        self._finish_crd(crd["metadata"]["name"])

    def _finish_crd(self, name: str) -> None:
        crd = self.store.lookup(CRD_KEY, "", name)
        if crd is None or not crd["metadata"].get("deletionTimestamp"):
            return
        if self.store.objects((crd["spec"]["group"], crd["spec"]["names"]["plural"])):
            return
        finalizers = [f for f in crd["metadata"].get("finalizers") or () if f != CRD_CLEANUP_FINALIZER]
        released: JsonObj = clone(crd)
        released["metadata"]["finalizers"] = finalizers
        self._update(self._builtin(CRD_KEY), crd, released, None)

    def _register_crd(self, crd: JsonObj) -> None:
        spec = crd["spec"]
        key = (spec["group"], spec["names"]["plural"])
        self.registry.remove(key)
        for rt in crd_resource_types(crd, self._cel):
            self.registry.add(rt)

    def _unregister_crd(self, crd: JsonObj) -> None:
        key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
        self.registry.remove(key)
        self.store.drop(key)


def table_cell(column_type: str, found: list[Any], now: float) -> Any:
    """One Table cell, typed like the apiserver's CRD table convertor renders it."""
    if not found or found[0] is None:
        return None
    value = found[0]
    if column_type == "string":
        if isinstance(value, str):
            return value
        return go_repr(value)
    if column_type == "integer":
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if column_type == "number":
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if column_type == "boolean":
        return value if isinstance(value, bool) else None
    if column_type == "date":
        stamp = parse_rfc3339(value) if isinstance(value, str) else None
        return human_duration(now - stamp.timestamp()) if stamp else "<invalid>"
    return None


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m support.fakekube``: serve until interrupted."""
    parser = argparse.ArgumentParser(description="Serve a fake Kubernetes API over HTTP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--crd", action="append", default=[], type=Path, help="CRD YAML file (repeatable)")
    parser.add_argument("--kubeconfig", type=Path, help="also write a kubeconfig here")
    parser.add_argument("--no-validate", action="store_true", help="do not validate custom resources")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    api = FakeKubeAPI(args.host, args.port, validate_schemas=not args.no_validate)
    api.install_crds_from_files(args.crd)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with api:
        if args.kubeconfig:
            api.kubeconfig(args.kubeconfig)
        print(api.url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
