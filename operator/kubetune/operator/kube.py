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
    "Event": "events",
    "RayJob": "rayjobs",
    "RayCluster": "rayclusters",
    "RayService": "rayservices",
    finetunejob.KIND: finetunejob.PLURAL,
    evaljob.KIND: evaljob.PLURAL,
}

RAY_API_VERSION = "ray.io/v1"


class KubeError(Exception):
    """An error answer of the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(KubeError):
    """404."""


class AlreadyExists(KubeError):
    """409 AlreadyExists (a create of a name that is taken)."""


class Conflict(KubeError):
    """409 Conflict (stale resourceVersion)."""


class Invalid(KubeError):
    """422 Invalid (schema or CEL validation failed)."""


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

    async def patch(self, ref: Ref, patch: Obj, subresource: str | None = None) -> Obj:
        """JSON merge patch (RFC 7386) of the object or one of its subresources."""
        path = ref.path + (f"/{subresource}" if subresource else "")
        return await self._call("PATCH", path, body=patch, content_type="application/merge-patch+json")

    async def patch_status(self, ref: Ref, status: Obj) -> Obj:
        return await self.patch(ref, {"status": status}, subresource="status")

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
        finally:
            if self._on_request:
                self._on_request(method, time.perf_counter() - started)
        if not 200 <= status < 300:
            if self._on_error:
                self._on_error(method, status)
            raise error_from_response(status, reason, data)
        result: Obj = json.loads(data) if data else {}
        return result


def error_from_response(status: int, http_reason: str, body: bytes | str | None) -> KubeError:
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
    if status == 404:
        return NotFound(status, reason, message)
    if status == 409:
        return AlreadyExists(status, reason, message) if reason == "AlreadyExists" else Conflict(
            status, reason, message)
    if status == 422:
        return Invalid(status, reason, message)
    return KubeError(status, reason, message)
