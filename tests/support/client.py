"""A small synchronous Kubernetes JSON client for tests and benchmarks (the user's and KubeRay's role).

The operator itself uses the async `kubetune.operator.kube.Kube`; this client shares its `Ref` paths and
error classes so tests assert on the same exceptions.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from kubetune.operator.kube import AlreadyExists, NotFound, Obj, Ref, error_from_response


class SyncKube:
    """Plain-HTTP client for a test API server (no auth)."""

    def __init__(self, server: str, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout

    def get(self, ref: Ref) -> Obj:
        return self._call("GET", ref.path)

    def list(self, ref: Ref, label_selector: str | None = None) -> list[Obj]:
        query = "?" + urllib.parse.urlencode({"labelSelector": label_selector}) if label_selector else ""
        items: list[Obj] = self._call("GET", ref.path + query).get("items", [])
        return items

    def create(self, obj: Obj) -> Obj:
        ref = Ref.of(obj)
        return self._call("POST", Ref(ref.api_version, ref.kind, ref.namespace).path, obj)

    def ensure(self, obj: Obj) -> bool:
        try:
            self.create(obj)
            return True
        except AlreadyExists:
            return False

    def patch(self, ref: Ref, patch: Obj, subresource: str | None = None) -> Obj:
        path = ref.path + (f"/{subresource}" if subresource else "")
        return self._call("PATCH", path, patch, "application/merge-patch+json")

    def patch_status(self, ref: Ref, status: Obj) -> Obj:
        return self.patch(ref, {"status": status}, subresource="status")

    def delete(self, ref: Ref) -> bool:
        try:
            self._call("DELETE", ref.path, {"propagationPolicy": "Background"})
            return True
        except NotFound:
            return False

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Obj:
        request = urllib.request.Request(
            self.server + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Accept": "application/json", "Content-Type": content_type},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            raise error_from_response(exc.code, str(exc.reason), exc.read()) from None
        result: Obj = json.loads(data) if data else {}
        return result
