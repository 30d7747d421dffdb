"""The one module that talks to the Kubernetes API.

Plain dicts in, plain dicts out, asynchronously on the operator's event loop. Credentials come from the
official client's configuration loader (in-cluster service account or kubeconfig). No model classes:
builders produce the exact JSON that is sent.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from kubetune.api import evaljob, finetunejob
from kubetune.api.common import API_VERSION

# A Kubernetes object as JSON: the one alias for it in the operator.
Obj = dict[str, Any]

# kind -> plural for every kind kubetune reads or writes.
_PLURALS: dict[str, str] = {
    "Namespace": "namespaces",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "NetworkPolicy": "networkpolicies",
    "Event": "events",
    "RayJob": "rayjobs",
    "RayCluster": "rayclusters",
    "RayService": "rayservices",
    finetunejob.KIND: finetunejob.PLURAL,
    evaljob.KIND: evaljob.PLURAL,
}

RAY_API_VERSION = "ray.io/v1"


class KubeError(Exception):
    """An error answer of the API server (`method`: the request's HTTP verb, where known)."""

    def __init__(self, status: int, reason: str, message: str, method: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.method = method
        self.retry_after = retry_after


class NotFound(KubeError):
    """404."""


class AlreadyExists(KubeError):
    """409 AlreadyExists (a create of a name that is taken)."""


class Conflict(KubeError):
    """409 Conflict (stale resourceVersion)."""


class Invalid(KubeError):
    """422 Invalid (schema or CEL validation failed)."""


# Answers that no retry can change: the request itself is refused (bad, forbidden, too large, invalid), or a
# create found no collection to create in (the namespace or the CRD is missing). Everything else (409,
# 429, 5xx, timeouts, connection errors) is transient and retried with backoff.
_REJECTED = frozenset({400, 403, 413, 422})


def is_rejection(exc: BaseException) -> bool:
    """Whether `exc` is an API answer that retrying cannot change (see `_REJECTED`; 404 only on create)."""
    if not isinstance(exc, KubeError):
        return False
    return exc.status in _REJECTED or (exc.status == 404 and exc.method == "POST")


class NotOwned(Exception):
    """An object of a child's name exists but is not controlled by the job: never adopted, never touched."""

    def __init__(self, ref: Ref, controller: str | None) -> None:
        owner = f"controlled by uid {controller}" if controller else "not controlled by any object"
        super().__init__(f"{ref.kind} {ref.namespace}/{ref.name} exists and is {owner}, not by this job")
        self.ref = ref
        self.controller = controller


def is_child(obj: Obj, name: str | None, owner_uid: str | None) -> bool:
    """`obj` is the owner's own child `name`: that deterministic name, controlled by `owner_uid`. Labels,
    status and an owner reference without `controller: true` prove nothing."""
    return bool(name and owner_uid) and (obj.get("metadata") or {}).get("name") == name and (
        controller_uid(obj) == owner_uid)


def controller_uid(obj: Obj) -> str | None:
    """The uid of `obj`'s controller owner reference (the one with `controller: true`), if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, dict) and ref.get("controller") is True:
            uid = ref.get("uid")
            return str(uid) if uid else None
    return None


@dataclass(frozen=True)
class Ref:
    """Where an object lives in the API."""

    api_version: str
    kind: str
    namespace: str | None
    name: str | None = None

    @property
    def path(self) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        ns = f"/namespaces/{self.namespace}" if self.namespace and self.kind != "Namespace" else ""
        name = f"/{self.name}" if self.name else ""
        return f"{base}{ns}/{_PLURALS[self.kind]}{name}"

    @classmethod
    def of(cls, obj: Obj) -> Ref:
        meta = obj.get("metadata") or {}
        return cls(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta.get("name"))


def ftj_ref(namespace: str, name: str) -> Ref:
    return Ref(API_VERSION, finetunejob.KIND, namespace, name)


def rayjob_ref(namespace: str, name: str) -> Ref:
    return Ref(RAY_API_VERSION, "RayJob", namespace, name)


def evj_ref(namespace: str, name: str) -> Ref:
    return Ref(API_VERSION, evaljob.KIND, namespace, name)


def rayservice_ref(namespace: str, name: str) -> Ref:
    return Ref(RAY_API_VERSION, "RayService", namespace, name)


def secret_ref(namespace: str, name: str) -> Ref:
    return Ref("v1", "Secret", namespace, name)


ErrorHook = Callable[[str, int], None]
LatencyHook = Callable[[str, float], None]


def load_configuration(pool_size: int = 32) -> k8s_client.Configuration:
    """In-cluster service account if present, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    configuration = k8s_client.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call,unused-ignore]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call,unused-ignore]
    configuration.connection_pool_maxsize = pool_size
    return configuration


def _ssl_context(configuration: k8s_client.Configuration) -> ssl.SSLContext | bool:
    if not configuration.host.startswith("https"):
        return False
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Kube:
    """Async JSON client on the operator's event loop (aiohttp, as kopf itself uses).

    Create one per process and share it; credentials come from the official client's configuration
    loader, so in-cluster tokens, kubeconfig certificates and token refresh all work.
    """

    def __init__(self, configuration: k8s_client.Configuration, on_error: ErrorHook | None = None,
                 on_request: LatencyHook | None = None, pool_size: int = 32) -> None:
        self._configuration = configuration
        self._host = configuration.host.rstrip("/")
        self._on_error = on_error
        self._on_request = on_request
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls, pool_size: int = 32, **hooks: Any) -> Kube:
        return cls(load_configuration(pool_size), pool_size=pool_size, **hooks)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- verbs -------------------------------------------------------------------------------------

    async def get(self, ref: Ref) -> Obj:
        return await self._call("GET", ref.path)

    async def create(self, obj: Obj) -> Obj:
        ref = Ref.of(obj)
        return await self._call("POST", Ref(ref.api_version, ref.kind, ref.namespace).path, body=obj)

    async def ensure(self, obj: Obj) -> bool:
        """Create `obj`; an object of that name already existing counts as success.

        Returns True when this call created it. Deterministic names make this the restart-safe way to
        create children: a second operator run can never make a second copy.
        """
        try:
            await self.create(obj)
            return True
        except AlreadyExists:
            return False

    async def ensure_owned(self, obj: Obj, read_first: bool = False) -> bool:
        """Create `obj`, a child carrying its controller owner reference. True when this call created it;
        False when an object of that name is already controlled by the same owner (a restart, a retry);
        NotOwned when it is anyone else's: it is never adopted, and the caller fails the job.

        `read_first`: the object probably exists (a retry, a restart): read it, and create it only if it is
        not there; one request instead of a refused create and a read."""
        ref = Ref.of(obj)
        if read_first:
            try:
                existing = await self.get(ref)
            except NotFound:
                return await self.ensure_owned(obj)
        else:
            try:
                await self.create(obj)
                return True
            except AlreadyExists:
                pass
            existing = await self.get(ref)
        if controller_uid(existing) != controller_uid(obj):
            raise NotOwned(ref, controller_uid(existing)) from None
        return False

    async def get_owned(self, ref: Ref, owner_uid: str) -> Obj | None:
        """The object if it exists and `owner_uid` controls it; None if it does not exist; NotOwned else."""
        try:
            obj = await self.get(ref)
        except NotFound:
            return None
        if controller_uid(obj) != owner_uid:
            raise NotOwned(ref, controller_uid(obj))
        return obj

    async def patch_owned(self, ref: Ref, owner_uid: str, patch: Obj) -> bool:
        """Merge-patch an object `owner_uid` controls, as read (its resourceVersion: a replacement in between
        is a 409, retried); False when it does not exist, NotOwned when it is not the owner's."""
        obj = await self.get_owned(ref, owner_uid)
        if obj is None:
            return False
        version = (obj.get("metadata") or {}).get("resourceVersion")
        await self.patch(ref, {**patch, "metadata": {**patch.get("metadata", {}), "resourceVersion": version}})
        return True

    async def delete_owned(self, ref: Ref, owner_uid: str) -> bool:
        """Delete an object `owner_uid` controls (a uid precondition: never another object of that name);
        False when it does not exist, NotOwned when it is not the owner's."""
        obj = await self.get_owned(ref, owner_uid)
        if obj is None:
            return False
        uid = (obj.get("metadata") or {}).get("uid")
        try:
            await self._call("DELETE", ref.path, body={"propagationPolicy": "Background",
                                                        "preconditions": {"uid": uid}})
            return True
        except NotFound:
            return False

    async def patch(self, ref: Ref, patch: Obj, subresource: str | None = None) -> Obj:
        """JSON merge patch (RFC 7386) of the object or one of its subresources."""
        path = ref.path + (f"/{subresource}" if subresource else "")
        return await self._call("PATCH", path, body=patch, content_type="application/merge-patch+json")

    async def patch_status(self, ref: Ref, status: Obj, resource_version: str | None = None) -> Obj:
        """Merge-patch the status subresource; with `resource_version`, only if the object is still that
        version (409 Conflict otherwise: someone wrote it since it was read)."""
        body: Obj = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.patch(ref, body, subresource="status")

    async def delete(self, ref: Ref) -> bool:
        """Delete with background propagation (owned objects go too); returns False if already gone."""
        try:
            await self._call("DELETE", ref.path, body={"propagationPolicy": "Background"})
            return True
        except NotFound:
            return False

    # -- transport ---------------------------------------------------------------------------------

    def _headers(self, content_type: str) -> dict[str, str]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        auth = self._configuration.auth_settings().get("BearerToken")  # refreshes expiring tokens
        if auth and auth.get("value"):
            headers["Authorization"] = str(auth["value"])
        return headers

    async def _call(self, method: str, path: str, body: Any = None,
                    content_type: str = "application/json") -> Obj:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, ssl=_ssl_context(self._configuration)),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        started = time.perf_counter()
        try:
            async with self._session.request(
                method, self._host + path, headers=self._headers(content_type),
                data=json.dumps(body) if body is not None else None,
            ) as response:
                data = await response.read()
                status, reason = response.status, response.reason or ""
                retry_after = _seconds(response.headers.get("Retry-After"))
        finally:
            if self._on_request:
                self._on_request(method, time.perf_counter() - started)
        if not 200 <= status < 300:
            if self._on_error:
                self._on_error(method, status)
            raise error_from_response(status, reason, data, method, retry_after)
        result: Obj = json.loads(data) if data else {}
        return result


def _seconds(header: str | None) -> float | None:
    """A Retry-After header in seconds (the apiserver sends delta-seconds), None if absent or a date."""
    try:
        return max(0.0, float(header)) if header else None
    except ValueError:
        return None


def error_from_response(status: int, http_reason: str, body: bytes | str | None, method: str = "",
                        retry_after: float | None = None) -> KubeError:
    """The apiserver's error answer (a Status object, usually) as the matching KubeError."""
    try:
        details = json.loads(body or "{}")
    except (TypeError, ValueError):
        details = {}
    if not isinstance(details, dict):
        details = {}
    reason = details.get("reason") or http_reason or "Unknown"
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    message = details.get("message") or text or reason
    cls: type[KubeError] = KubeError
    if status == 404:
        cls = NotFound
    elif status == 409:
        cls = AlreadyExists if reason == "AlreadyExists" else Conflict
    elif status == 422:
        cls = Invalid
    return cls(status, reason, message, method, retry_after)
