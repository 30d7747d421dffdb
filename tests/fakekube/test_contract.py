"""The contract of the fake Kubernetes API: what a real kube-apiserver does, over real HTTP.

Every operator test stands on ``support.fakekube``; these tests pin down the behaviour it
shares with a real apiserver, one behaviour per test, using plain HTTP, the ``kubernetes`` Python
client, kopf and (when fetched by ``scripts/fetch_k8s_tools.py``) the real ``kubectl``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import requests
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from support import shared
from support.fakekube import FakeKubeAPI

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBECTL = REPO_ROOT / ".tools" / "bin" / "kubectl"
HELM = REPO_ROOT / ".tools" / "bin" / "helm"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
TABLE = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}

WIDGET_CRD: dict[str, Any] = yaml.safe_load("""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg], categories: [all]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Epoch, type: integer, jsonPath: .status.progress.epoch}
    - {name: Ready, type: string, jsonPath: '.status.conditions[?(@.type=="Ready")].status'}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-validations:
        - rule: "!has(self.status) || !has(self.status.progress) || self.status.progress.epoch <= 100"
          message: "epoch is beyond 100"
          fieldPath: .status.progress.epoch
        properties:
          spec:
            type: object
            required: [model]
            x-kubernetes-validations:
            - {rule: "self.minReplicas <= self.replicas", message: "minReplicas must not exceed replicas"}
            properties:
              model:
                type: string
                x-kubernetes-validations:
                - {rule: "self == oldSelf", message: "model is immutable"}
              replicas: {type: integer, minimum: 1, default: 1}
              minReplicas: {type: integer, minimum: 0, default: 0}
              hyperparameters:
                type: object
                properties:
                  epochs: {type: integer, minimum: 1, default: 3}
                  learningRate: {type: number}
          status:
            type: object
            properties:
              phase: {type: string}
              progress:
                type: object
                properties:
                  epoch: {type: integer}
              conditions:
                type: array
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [type]
                items:
                  type: object
                  required: [type, status]
                  properties:
                    type: {type: string}
                    status: {type: string}
                    reason: {type: string}
                    message: {type: string}
                    lastTransitionTime: {type: string}
""")
WIDGETS = "/apis/example.com/v1/namespaces/default/widgets"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as server:
        server.install_crd(WIDGET_CRD)
        yield server


class Client:
    """A thin HTTP client for the fake API."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        data = json.dumps(body) if body is not None else None
        return self.session.request(method, self.base + path, data=data, timeout=10, **kwargs)

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        response = self.request(method, path, body, **kwargs)
        assert response.status_code < 300, response.text
        result: dict[str, Any] = response.json()
        return result


@pytest.fixture
def http(api: FakeKubeAPI) -> Client:
    return Client(api.url)


def widget(name: str = "w1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"model": "llama", **spec},
    }


def configmap(name: str, labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels or {}, **meta},
        "data": {"k": "v"},
    }


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def read_watch(
    api: FakeKubeAPI, path: str, params: dict[str, str], count: int | None = None, timeout: float = 5
) -> list[dict[str, Any]]:
    """Watch events until ``count`` arrive or the server ends the stream."""
    events = []
    with requests.get(
        api.url + path, params={"watch": "true", **params}, stream=True, timeout=timeout
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        for line in response.iter_lines():
            if line:
                events.append(json.loads(line))
            if count is not None and len(events) >= count:
                break
    return events


def status_error(response: requests.Response, code: int, reason: str) -> dict[str, Any]:
    assert response.status_code == code, response.text
    status: dict[str, Any] = response.json()
    assert (status["kind"], status["status"], status["reason"], status["code"]) == (
        "Status",
        "Failure",
        reason,
        code,
    )
    return status


# ------------------------------------------------------------------------------------------------
# Object metadata


def test_create_assigns_uid_resource_version_generation_and_timestamp(http: Client) -> None:
    created = http.ok("POST", WIDGETS, widget())
    meta = created["metadata"]
    assert len(meta["uid"]) == 36
    assert int(meta["resourceVersion"]) > 0
    assert meta["generation"] == 1
    assert time.strptime(meta["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    assert meta["namespace"] == "default"


def test_create_answers_201_with_the_stored_object(http: Client) -> None:
    response = http.request("POST", WIDGETS, widget())
    assert response.status_code == 201
    assert response.json() == http.ok("GET", f"{WIDGETS}/w1")


def test_every_write_bumps_one_global_resource_version(http: Client) -> None:
    first = http.ok("POST", CONFIGMAPS, configmap("a"))
    second = http.ok("POST", WIDGETS, widget())
    third = http.ok("PATCH", f"{CONFIGMAPS}/a", {"data": {"k": "changed"}}, headers=MERGE)
    assert rv(first) < rv(second) < rv(third)


def test_write_that_changes_nothing_keeps_the_resource_version(http: Client) -> None:
    created = http.ok("POST", CONFIGMAPS, configmap("a"))
    patched = http.ok("PATCH", f"{CONFIGMAPS}/a", {"data": {"k": "v"}}, headers=MERGE)
    assert rv(patched) == rv(created)


def test_duplicate_name_is_409_already_exists(http: Client) -> None:
    http.ok("POST", WIDGETS, widget())
    status = status_error(http.request("POST", WIDGETS, widget()), 409, "AlreadyExists")
    assert status["message"] == 'widgets.example.com "w1" already exists'
    assert status["details"] == {"name": "w1", "group": "example.com", "kind": "widgets"}


def test_missing_object_is_404_not_found(http: Client) -> None:
    status = status_error(http.request("GET", f"{CONFIGMAPS}/nope"), 404, "NotFound")
    assert status["message"] == 'configmaps "nope" not found'
    assert status["details"] == {"name": "nope", "kind": "configmaps"}


def test_generate_name_appends_a_random_suffix(http: Client) -> None:
    body = configmap("")
    body["metadata"] = {"generateName": "job-"}
    names = {http.ok("POST", CONFIGMAPS, body)["metadata"]["name"] for _ in range(3)}
    assert len(names) == 3
    assert all(name.startswith("job-") and len(name) == 9 for name in names)


def test_put_with_stale_resource_version_is_409_conflict(http: Client) -> None:
    stale = http.ok("POST", WIDGETS, widget())
    http.ok("PATCH", f"{WIDGETS}/w1", {"metadata": {"labels": {"a": "b"}}}, headers=MERGE)
    status = status_error(http.request("PUT", f"{WIDGETS}/w1", stale), 409, "Conflict")
    assert "the object has been modified" in status["message"]


def test_put_of_custom_resource_requires_a_resource_version(http: Client) -> None:
    http.ok("POST", WIDGETS, widget())
    status = status_error(http.request("PUT", f"{WIDGETS}/w1", widget(replicas=2)), 422, "Invalid")
    assert "metadata.resourceVersion: Invalid value: 0: must be specified for an update" in status["message"]


def test_generation_bumps_on_spec_changes_only(http: Client) -> None:
    http.ok("POST", WIDGETS, widget())
    relabelled = http.ok("PATCH", f"{WIDGETS}/w1", {"metadata": {"labels": {"a": "b"}}}, headers=MERGE)
    with_status = http.ok("PATCH", f"{WIDGETS}/w1/status", {"status": {"phase": "Running"}}, headers=MERGE)
    respecced = http.ok("PATCH", f"{WIDGETS}/w1", {"spec": {"replicas": 2}}, headers=MERGE)
    assert [o["metadata"]["generation"] for o in (relabelled, with_status, respecced)] == [1, 1, 2]


# ------------------------------------------------------------------------------------------------
# The status subresource


def test_main_endpoint_ignores_status(http: Client) -> None:
    body = widget()
    body["status"] = {"phase": "Faked"}
    assert "status" not in http.ok("POST", WIDGETS, body)
    patched = http.ok(
        "PATCH", f"{WIDGETS}/w1", {"status": {"phase": "Faked"}, "spec": {"replicas": 2}}, headers=MERGE
    )
    assert "status" not in patched
    assert patched["spec"]["replicas"] == 2


def test_status_endpoint_changes_only_status(http: Client) -> None:
    http.ok("POST", WIDGETS, widget())
    patch = {"status": {"phase": "Running"}, "spec": {"replicas": 5}, "metadata": {"labels": {"a": "b"}}}
    patched = http.ok("PATCH", f"{WIDGETS}/w1/status", patch, headers=MERGE)
    assert patched["status"] == {"phase": "Running"}
    assert patched["spec"]["replicas"] == 1
    assert "labels" not in patched["metadata"]


def test_put_to_status_replaces_status(http: Client) -> None:
    current = http.ok("POST", WIDGETS, widget())
    current["status"] = {"phase": "Done", "progress": {"epoch": 2}}
    replaced = http.ok("PUT", f"{WIDGETS}/w1/status", current)
    assert replaced["status"] == {"phase": "Done", "progress": {"epoch": 2}}


# ------------------------------------------------------------------------------------------------
# Patches


def test_merge_patch_merges_objects_and_deletes_nulls(http: Client) -> None:
    http.ok("POST", CONFIGMAPS, {**configmap("a"), "data": {"keep": "1", "drop": "2"}})
    patched = http.ok("PATCH", f"{CONFIGMAPS}/a", {"data": {"drop": None, "new": "3"}}, headers=MERGE)
    assert patched["data"] == {"keep": "1", "new": "3"}


def test_json_patch_applies_operations_in_order(http: Client) -> None:
    http.ok("POST", WIDGETS, widget())
    ops = [
        {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
        {"op": "replace", "path": "/spec/replicas", "value": 4},
        {"op": "remove", "path": "/spec/minReplicas"},
    ]
    patched = http.ok("PATCH", f"{WIDGETS}/w1", ops, headers=JSON_PATCH)
    assert patched["metadata"]["labels"] == {"a": "b"}
    assert patched["spec"]["replicas"] == 4
    assert patched["spec"]["minReplicas"] == 0  # defaulted again after removal


def test_json_patch_failing_test_operation_is_422(http: Client) -> None:
    created = http.ok("POST", WIDGETS, widget())
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
        {"op": "replace", "path": "/spec/replicas", "value": 4},
    ]
    status_error(http.request("PATCH", f"{WIDGETS}/w1", ops, headers=JSON_PATCH), 422, "Invalid")
    assert http.ok("GET", f"{WIDGETS}/w1") == created


def test_dry_run_admits_without_storing(http: Client) -> None:
    response = http.request("POST", WIDGETS, widget(), params={"dryRun": "All"})
    assert response.status_code == 201
    assert response.json()["spec"]["replicas"] == 1
    status_error(http.request("GET", f"{WIDGETS}/w1"), 404, "NotFound")


def test_server_side_apply_creates_then_merges_and_forgets_dropped_fields(http: Client) -> None:
    apply = {"Content-Type": "application/apply-patch+yaml"}
    params = {"fieldManager": "helm"}
    first = {**configmap("a"), "data": {"keep": "1", "drop": "2"}}
    response = http.request("PATCH", f"{CONFIGMAPS}/a", first, headers=apply, params=params)
    assert response.status_code == 201
    http.ok("PATCH", f"{CONFIGMAPS}/a", {"data": {"other": "x"}}, headers=MERGE)
    second = {**configmap("a"), "data": {"keep": "1"}}
    updated = http.ok("PATCH", f"{CONFIGMAPS}/a", second, headers=apply, params=params)
    assert updated["data"] == {"keep": "1", "other": "x"}


# ------------------------------------------------------------------------------------------------
# Kinds and versions


def test_secret_string_data_is_stored_base64_encoded_in_data(http: Client) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"token": "abc"}}
    stored = http.ok("POST", "/api/v1/namespaces/default/secrets", body)
    assert (stored["data"], stored["type"]) == ({"token": "YWJj"}, "Opaque")
    assert "stringData" not in stored


def test_every_served_crd_version_reads_the_same_objects(http: Client) -> None:
    crd = json.loads(json.dumps(WIDGET_CRD))
    legacy = {
        **json.loads(json.dumps(crd["spec"]["versions"][0])),
        "name": "v1beta1",
        "storage": False,
        "deprecated": True,
        "deprecationWarning": "example.com/v1beta1 Widget is deprecated",
    }
    crd["spec"]["versions"].append(legacy)
    http.ok(
        "PUT",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com",
        {
            **crd,
            "metadata": http.ok(
                "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com"
            )["metadata"],
        },
    )
    http.ok("POST", WIDGETS, widget())
    response = http.request("GET", "/apis/example.com/v1beta1/namespaces/default/widgets/w1")
    assert response.json()["apiVersion"] == "example.com/v1beta1"
    assert response.headers["Warning"] == '299 - "example.com/v1beta1 Widget is deprecated"'
    assert http.ok("GET", "/apis/example.com")["preferredVersion"]["version"] == "v1"


# ------------------------------------------------------------------------------------------------
# Lists and selectors


def test_list_filters_by_label_selector(http: Client) -> None:
    for name, labels in [("a", {"app": "x", "tier": "web"}), ("b", {"app": "y"}), ("c", {})]:
        http.ok("POST", CONFIGMAPS, configmap(name, labels))

    def names(selector: str) -> list[str]:
        listed = http.ok("GET", CONFIGMAPS, params={"labelSelector": selector})
        return [item["metadata"]["name"] for item in listed["items"]]

    assert names("app=x") == ["a"]
    assert names("app!=x") == ["b", "c"]
    assert names("app") == ["a", "b"]
    assert names("!app") == ["c"]
    assert names("app in (x, y)") == ["a", "b"]
    assert names("app notin (x)") == ["b", "c"]
    assert names("app=x,tier=web") == ["a"]
    assert names("app=x,tier=db") == []


def test_delete_collection_deletes_the_selected_objects(http: Client) -> None:
    http.ok("POST", CONFIGMAPS, configmap("a", {"app": "x"}))
    http.ok("POST", CONFIGMAPS, configmap("b", {"app": "y"}))
    http.ok("DELETE", CONFIGMAPS, params={"labelSelector": "app=x"})
    assert [i["metadata"]["name"] for i in http.ok("GET", CONFIGMAPS)["items"]] == ["b"]


def test_list_is_a_kind_list_with_a_resource_version(http: Client) -> None:
    created = http.ok("POST", CONFIGMAPS, configmap("a"))
    listed = http.ok("GET", CONFIGMAPS)
    assert (listed["kind"], listed["apiVersion"]) == ("ConfigMapList", "v1")
    assert int(listed["metadata"]["resourceVersion"]) >= rv(created)
    assert "kind" not in listed["items"][0]  # as on a real server, built-in list items omit their type


def test_list_filters_by_field_selector_and_spans_namespaces(http: Client) -> None:
    http.ok("POST", WIDGETS, widget("w1"))
    http.ok("POST", "/apis/example.com/v1/namespaces/other/widgets", widget("w1"))
    http.ok("POST", WIDGETS, widget("w2"))
    everywhere = http.ok("GET", "/apis/example.com/v1/widgets", params={"fieldSelector": "metadata.name=w1"})
    assert [i["metadata"]["namespace"] for i in everywhere["items"]] == ["default", "other"]
    status_error(
        http.request("GET", WIDGETS, params={"fieldSelector": "spec.model=llama"}), 400, "BadRequest"
    )


# ------------------------------------------------------------------------------------------------
# Watches


def test_watch_sees_added_modified_deleted_in_order(api: FakeKubeAPI, http: Client) -> None:
    since = http.ok("GET", WIDGETS)["metadata"]["resourceVersion"]
    http.ok("POST", WIDGETS, widget())
    http.ok("PATCH", f"{WIDGETS}/w1", {"spec": {"replicas": 2}}, headers=MERGE)
    http.ok("DELETE", f"{WIDGETS}/w1")
    events = read_watch(api, WIDGETS, {"resourceVersion": since}, count=3)
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert [e["object"]["spec"]["replicas"] for e in events] == [1, 2, 2]
    assert rv(events[0]["object"]) < rv(events[1]["object"]) < rv(events[2]["object"])


def test_watch_streams_live_events(api: FakeKubeAPI, http: Client) -> None:
    since = http.ok("GET", CONFIGMAPS)["metadata"]["resourceVersion"]
    events: list[dict[str, Any]] = []
    reader = threading.Thread(
        target=lambda: events.extend(read_watch(api, CONFIGMAPS, {"resourceVersion": since}, count=2))
    )
    reader.start()
    time.sleep(0.2)
    http.ok("POST", CONFIGMAPS, configmap("a"))
    http.ok("DELETE", f"{CONFIGMAPS}/a")
    reader.join(timeout=5)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("DELETED", "a"),
    ]


def test_watch_resumes_after_a_resource_version(api: FakeKubeAPI, http: Client) -> None:
    first = http.ok("POST", WIDGETS, widget("w1"))
    http.ok("POST", WIDGETS, widget("w2"))
    events = read_watch(api, WIDGETS, {"resourceVersion": str(rv(first))}, count=1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "w2")]


def test_watch_without_resource_version_starts_with_current_objects(api: FakeKubeAPI, http: Client) -> None:
    http.ok("POST", WIDGETS, widget("w1"))
    events = read_watch(api, WIDGETS, {"timeoutSeconds": "1"})
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "w1")]


def test_watch_timeout_seconds_ends_the_stream(api: FakeKubeAPI) -> None:
    started = time.monotonic()
    assert read_watch(api, WIDGETS, {"resourceVersion": "1", "timeoutSeconds": "1"}) == []
    assert 0.9 < time.monotonic() - started < 3


def test_watch_reports_objects_leaving_its_selector_as_deleted(api: FakeKubeAPI, http: Client) -> None:
    created = http.ok("POST", CONFIGMAPS, configmap("a", {"app": "x"}))
    http.ok("PATCH", f"{CONFIGMAPS}/a", {"metadata": {"labels": {"app": "y"}}}, headers=MERGE)
    events = read_watch(
        api, CONFIGMAPS, {"resourceVersion": str(rv(created) - 1), "labelSelector": "app=x"}, count=2
    )
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


def test_watch_from_a_compacted_resource_version_is_410_expired() -> None:
    with FakeKubeAPI(history_limit=2) as server:
        client = Client(server.url)
        for name in "abc":
            client.ok("POST", CONFIGMAPS, configmap(name))
        events = read_watch(server, CONFIGMAPS, {"resourceVersion": "1"}, count=1)
    assert events[0]["type"] == "ERROR"
    assert (events[0]["object"]["code"], events[0]["object"]["reason"]) == (410, "Expired")


def test_watch_rejects_a_non_integer_timeout(http: Client) -> None:
    response = http.request("GET", WIDGETS, params={"watch": "true", "timeoutSeconds": "1.5"})
    status_error(response, 400, "BadRequest")


def test_watch_sends_bookmarks_when_allowed() -> None:
    with FakeKubeAPI(bookmark_interval=0.1) as server:
        events = read_watch(
            server, CONFIGMAPS, {"resourceVersion": "1", "allowWatchBookmarks": "true"}, count=1
        )
    assert events[0]["type"] == "BOOKMARK"
    assert int(events[0]["object"]["metadata"]["resourceVersion"]) >= 1


def test_watch_with_send_initial_events_ends_them_with_a_bookmark(api: FakeKubeAPI, http: Client) -> None:
    http.ok("POST", CONFIGMAPS, configmap("a"))
    params = {
        "sendInitialEvents": "true",
        "resourceVersionMatch": "NotOlderThan",
        "allowWatchBookmarks": "true",
    }
    events = read_watch(api, CONFIGMAPS, params, count=2)
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_stopping_the_server_ends_open_watches(api: FakeKubeAPI) -> None:
    finished = threading.Event()

    def watch() -> None:
        read_watch(api, CONFIGMAPS, {"resourceVersion": "1"}, timeout=10)
        finished.set()

    threading.Thread(target=watch, daemon=True).start()
    deadline = time.monotonic() + 5
    while not any("watch=true" in r[3] for r in list(api.requests)):
        assert time.monotonic() < deadline, "the watch did not start"
        time.sleep(0.01)
    api.stop()
    assert finished.wait(5)


# ------------------------------------------------------------------------------------------------
# Discovery


def test_discovery_lists_crd_resources_with_short_names_and_status(http: Client) -> None:
    groups = {g["name"]: g for g in http.ok("GET", "/apis")["groups"]}
    assert groups["example.com"]["preferredVersion"]["version"] == "v1"
    resources = {r["name"]: r for r in http.ok("GET", "/apis/example.com/v1")["resources"]}
    assert resources["widgets"]["shortNames"] == ["wdg"]
    assert resources["widgets"]["kind"] == "Widget"
    assert resources["widgets"]["namespaced"] is True
    assert "watch" in resources["widgets"]["verbs"]
    assert resources["widgets/status"]["verbs"] == ["get", "patch", "update"]


def test_crd_posted_over_http_is_served_immediately(http: Client) -> None:
    crd = json.loads(json.dumps(WIDGET_CRD).replace("widget", "gadget").replace("Widget", "Gadget"))
    crd["spec"]["names"]["shortNames"] = ["gdg"]
    created = http.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert {c["type"]: c["status"] for c in created["status"]["conditions"]}["Established"] == "True"
    assert "gadgets" in {r["name"] for r in http.ok("GET", "/apis/example.com/v1")["resources"]}
    assert http.ok("POST", "/apis/example.com/v1/namespaces/default/gadgets", {**widget(), "kind": "Gadget"})


def test_deleting_a_crd_deletes_its_objects_and_stops_serving_it(http: Client) -> None:
    http.ok("POST", WIDGETS, widget())
    http.ok("DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com")
    status_error(http.request("GET", "/apis/example.com/v1"), 404, "NotFound")
    status_error(
        http.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com"),
        404,
        "NotFound",
    )


# ------------------------------------------------------------------------------------------------
# Server-side printing


def test_table_shows_printer_columns(http: Client) -> None:
    http.ok("POST", WIDGETS, widget())
    status = {
        "phase": "Training",
        "progress": {"epoch": 2},
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    http.ok("PATCH", f"{WIDGETS}/w1/status", {"status": status}, headers=MERGE)
    table = http.ok("GET", WIDGETS, headers=TABLE)
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Phase", "Epoch", "Ready", "Age"]
    cells = table["rows"][0]["cells"]
    assert cells[:4] == ["w1", "Training", 2, "True"]
    assert cells[4].endswith("s")
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


# ------------------------------------------------------------------------------------------------
# The kubernetes Python client


@pytest.fixture
def kube_client(api: FakeKubeAPI, tmp_path: Path) -> Iterator[k8s.ApiClient]:
    config = k8s.Configuration()
    kubeconfig = str(api.kubeconfig(tmp_path / "kubeconfig"))
    k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=config)  # type: ignore[no-untyped-call]
    with k8s.ApiClient(config) as client:
        yield client


def test_kubernetes_client_manages_custom_objects(kube_client: k8s.ApiClient) -> None:
    objects = k8s.CustomObjectsApi(kube_client)
    args = ("example.com", "v1", "default", "widgets")
    objects.create_namespaced_custom_object(*args, widget())
    objects.patch_namespaced_custom_object(*args, "w1", {"spec": {"replicas": 3}})
    objects.patch_namespaced_custom_object_status(*args, "w1", {"status": {"phase": "Running"}})
    fetched: Any = objects.get_namespaced_custom_object(*args, "w1")
    assert (fetched["spec"]["replicas"], fetched["status"]["phase"]) == (3, "Running")
    listed: Any = objects.list_namespaced_custom_object(*args)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["w1"]


def test_kubernetes_client_manages_configmaps(kube_client: k8s.ApiClient) -> None:
    core = k8s.CoreV1Api(kube_client)
    body = k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="cfg", labels={"a": "b"}), data={"k": "v"})
    core.create_namespaced_config_map("default", body)
    core.patch_namespaced_config_map("cfg", "default", {"data": {"k": "w"}})
    assert core.read_namespaced_config_map("cfg", "default").data == {"k": "w"}
    listed = core.list_namespaced_config_map("default", label_selector="a=b").items
    assert [c.metadata.name for c in listed if c.metadata] == ["cfg"]
    core.delete_namespaced_config_map("cfg", "default")
    with pytest.raises(ApiException) as raised:
        core.read_namespaced_config_map("cfg", "default")
    assert raised.value.status == 404


# ------------------------------------------------------------------------------------------------
# Deletion: finalizers, garbage collection, namespaces


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }


def test_deleting_an_owner_deletes_its_dependents_recursively(http: Client) -> None:
    owner = http.ok("POST", WIDGETS, widget())
    child = http.ok("POST", CONFIGMAPS, configmap("child", ownerReferences=[owner_reference(owner)]))
    http.ok("POST", CONFIGMAPS, configmap("grandchild", ownerReferences=[owner_reference(child)]))
    http.ok("POST", CONFIGMAPS, configmap("bystander"))
    http.ok("DELETE", f"{WIDGETS}/w1")
    assert [i["metadata"]["name"] for i in http.ok("GET", CONFIGMAPS)["items"]] == ["bystander"]


def test_orphan_propagation_keeps_dependents(http: Client) -> None:
    owner = http.ok("POST", WIDGETS, widget())
    http.ok("POST", CONFIGMAPS, configmap("child", ownerReferences=[owner_reference(owner)]))
    http.ok("DELETE", f"{WIDGETS}/w1", {"propagationPolicy": "Orphan"})
    assert "ownerReferences" not in http.ok("GET", f"{CONFIGMAPS}/child")["metadata"]


def test_dependent_whose_owner_does_not_exist_is_collected(api: FakeKubeAPI, http: Client) -> None:
    ghost = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "name": "ghost",
        "uid": "00000000-0000-0000-0000-000000000000",
    }
    http.ok("POST", CONFIGMAPS, configmap("orphan", ownerReferences=[ghost]))
    deadline = time.monotonic() + 2
    while api.store.get("", "v1", "configmaps", "default", "orphan") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.store.get("", "v1", "configmaps", "default", "orphan") is None


def test_finalizers_delay_deletion_until_emptied(api: FakeKubeAPI, http: Client) -> None:
    body = widget()
    body["metadata"]["finalizers"] = ["example.com/cleanup"]
    http.ok("POST", WIDGETS, body)
    deleting = http.ok("DELETE", f"{WIDGETS}/w1")
    assert deleting["metadata"]["deletionTimestamp"]
    assert deleting["metadata"]["generation"] == 2
    assert http.ok("GET", f"{WIDGETS}/w1")["metadata"]["deletionTimestamp"]
    since = deleting["metadata"]["resourceVersion"]
    http.ok("PATCH", f"{WIDGETS}/w1", {"metadata": {"finalizers": None}}, headers=MERGE)
    status_error(http.request("GET", f"{WIDGETS}/w1"), 404, "NotFound")
    assert [e["type"] for e in read_watch(api, WIDGETS, {"resourceVersion": since}, count=1)] == ["DELETED"]


def test_no_finalizer_may_be_added_while_deleting(http: Client) -> None:
    body = widget()
    body["metadata"]["finalizers"] = ["example.com/a"]
    http.ok("POST", WIDGETS, body)
    http.ok("DELETE", f"{WIDGETS}/w1")
    patch = {"metadata": {"finalizers": ["example.com/a", "example.com/b"]}}
    status_error(http.request("PATCH", f"{WIDGETS}/w1", patch, headers=MERGE), 422, "Invalid")


def test_deleting_a_namespace_deletes_its_content(http: Client) -> None:
    http.ok("POST", "/api/v1/namespaces/team/configmaps", configmap("a"))
    http.ok("POST", "/apis/example.com/v1/namespaces/team/widgets", widget())
    http.ok("DELETE", "/api/v1/namespaces/team")
    assert http.ok("GET", "/api/v1/namespaces/team/configmaps")["items"] == []
    status_error(http.request("GET", "/api/v1/namespaces/team"), 404, "NotFound")


def test_creating_in_a_terminating_namespace_is_forbidden(http: Client) -> None:
    body = configmap("held")
    body["metadata"]["finalizers"] = ["example.com/hold"]
    http.ok("POST", "/api/v1/namespaces/team/configmaps", body)
    assert http.ok("DELETE", "/api/v1/namespaces/team")["status"]["phase"] == "Terminating"
    status_error(
        http.request("POST", "/api/v1/namespaces/team/configmaps", configmap("new")), 403, "Forbidden"
    )


# ------------------------------------------------------------------------------------------------
# Validation


def test_schema_violation_is_422_naming_the_field(http: Client) -> None:
    status = status_error(
        http.request("POST", WIDGETS, widget(hyperparameters={"epochs": 0})), 422, "Invalid"
    )
    assert status["message"] == (
        'Widget.example.com "w1" is invalid: spec.hyperparameters.epochs: Invalid value: 0: '
        "spec.hyperparameters.epochs in body should be greater than or equal to 1"
    )
    assert status["details"]["causes"][0]["field"] == "spec.hyperparameters.epochs"


def test_schema_type_and_required_errors_read_like_the_apiserver(http: Client) -> None:
    body = widget(replicas="two")
    del body["spec"]["model"]
    status = status_error(http.request("POST", WIDGETS, body), 422, "Invalid")
    assert status["message"] == (
        'Widget.example.com "w1" is invalid: [spec.model: Required value, spec.replicas: Invalid value: '
        '"string": spec.replicas in body must be of type integer: "string", <nil>: Invalid value: "null": '
        "some validation rules were not checked because the object was invalid; correct the existing errors "
        "to complete validation]"
    )


def test_schema_defaults_are_applied_and_unknown_fields_pruned(http: Client) -> None:
    created = http.ok("POST", WIDGETS, widget(hyperparameters={}, surprise=True))
    assert created["spec"] == {
        "model": "llama",
        "replicas": 1,
        "minReplicas": 0,
        "hyperparameters": {"epochs": 3},
    }


def test_strict_field_validation_rejects_unknown_fields(http: Client) -> None:
    response = http.request("POST", WIDGETS, widget(surprise=True), params={"fieldValidation": "Strict"})
    status = status_error(response, 400, "BadRequest")
    assert 'strict decoding error: unknown field "spec.surprise"' in status["message"]


def test_invalid_label_value_is_422(http: Client) -> None:
    status = status_error(
        http.request("POST", CONFIGMAPS, configmap("a", {"model": "meta/llama"})), 422, "Invalid"
    )
    assert status["message"].startswith(
        'ConfigMap "a" is invalid: metadata.labels: Invalid value: "meta/llama"'
    )


def test_annotations_over_256_kib_are_422(http: Client) -> None:
    body = configmap("a", annotations={"big": "x" * 262_144})
    status = status_error(http.request("POST", CONFIGMAPS, body), 422, "Invalid")
    assert "metadata.annotations: Too long: may not be more than 262144 bytes" in status["message"]


def test_cel_rule_rejects_with_its_message(api: FakeKubeAPI, http: Client) -> None:
    pytest.importorskip("celpy")
    status = status_error(http.request("POST", WIDGETS, widget(replicas=1, minReplicas=2)), 422, "Invalid")
    assert status["message"] == (
        'Widget.example.com "w1" is invalid: spec: Invalid value: "object": '
        "minReplicas must not exceed replicas"
    )
    assert api.skipped_cel_rules == []


def test_cel_transition_rule_compares_with_old_self(http: Client) -> None:
    pytest.importorskip("celpy")
    http.ok("POST", WIDGETS, widget())
    http.ok("PATCH", f"{WIDGETS}/w1", {"spec": {"model": "llama", "replicas": 2}}, headers=MERGE)
    response = http.request("PATCH", f"{WIDGETS}/w1", {"spec": {"model": "mistral"}}, headers=MERGE)
    status = status_error(response, 422, "Invalid")
    assert status["message"].endswith('spec.model: Invalid value: "string": model is immutable')


def test_cel_rules_over_the_whole_object_check_status_writes(http: Client) -> None:
    pytest.importorskip("celpy")
    http.ok("POST", WIDGETS, widget())
    patch = {"status": {"progress": {"epoch": 101}}}
    status = status_error(http.request("PATCH", f"{WIDGETS}/w1/status", patch, headers=MERGE), 422, "Invalid")
    assert status["message"].endswith('status.progress.epoch: Invalid value: "object": epoch is beyond 100')


def test_kuberay_crds_install_and_validate_rayjobs(api: FakeKubeAPI, http: Client) -> None:
    crds = shared.require(shared.KUBERAY_CRDS, "the fake is not checked installing KubeRay's CRDs")
    installed = api.install_crds_from_files(sorted(crds.glob("*.yaml")))
    assert {c["spec"]["names"]["kind"] for c in installed} == {"RayCluster", "RayJob", "RayService"}
    if importlib.util.find_spec("celpy"):
        assert api.skipped_cel_rules == []
    rayjobs = "/apis/ray.io/v1/namespaces/default/rayjobs"
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "j"},
        "spec": {"entrypoint": "python train.py", "shutdownAfterJobFinishes": True, "notAField": 1},
    }
    assert "notAField" not in http.ok("POST", rayjobs, job)["spec"]
    bad = {**job, "metadata": {"name": "k"}, "spec": {"entrypoint": 7}}
    status = status_error(http.request("POST", rayjobs, bad), 422, "Invalid")
    assert 'spec.entrypoint: Invalid value: "integer"' in status["message"]


def test_kuberay_cel_rules_are_enforced(api: FakeKubeAPI, http: Client) -> None:
    pytest.importorskip("celpy")
    api.install_crds_from_files([shared.require(shared.kuberay_crd_path("rayjobs"),
                                                "the fake is not checked enforcing KubeRay's CEL rules")])
    rayjobs = "/apis/ray.io/v1/namespaces/default/rayjobs"
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "j"},
        "spec": {"managedBy": "me"},
    }
    status = status_error(http.request("POST", rayjobs, job), 422, "Invalid")
    assert "the managedBy field value must be either 'ray.io/kuberay-operator'" in status["message"]
    http.ok("POST", rayjobs, {**job, "spec": {"managedBy": "ray.io/kuberay-operator"}})
    patch = {"spec": {"managedBy": "kueue.x-k8s.io/multikueue"}}
    status = status_error(http.request("PATCH", f"{rayjobs}/j", patch, headers=MERGE), 422, "Invalid")
    assert status["message"].endswith(
        'spec.managedBy: Invalid value: "string": the managedBy field is immutable'
    )


# ------------------------------------------------------------------------------------------------
# Instrumentation


def test_stats_count_requests_by_method_and_resource(api: FakeKubeAPI, http: Client) -> None:
    http.ok("POST", "/_fake/reset")
    http.ok("POST", WIDGETS, widget())
    http.ok("GET", WIDGETS)
    stats = http.ok("GET", "/_fake/stats")
    assert stats["by_method"] == {"POST": 1, "GET": 1}
    assert stats["by_resource"] == {"widgets": 2}
    assert api.writes() == 1
    assert api.writes("Widget") == api.writes("widgets") == 1
    assert api.writes("configmaps") == 0


def test_store_gives_tests_copies(api: FakeKubeAPI, http: Client) -> None:
    http.ok("POST", WIDGETS, widget())
    copy = api.store.get("example.com", "v1", "widgets", "default", "w1")
    assert copy is not None
    copy["spec"]["replicas"] = 99
    assert api.store.list("example.com", "v1", "widgets")[0]["spec"]["replicas"] == 1


def test_runs_as_a_process(tmp_path: Path) -> None:
    crd_file = tmp_path / "crd.yaml"
    crd_file.write_text(yaml.safe_dump(WIDGET_CRD))
    command = [
        sys.executable,
        "-m",
        "support.fakekube",
        "--port",
        "0",
        "--crd",
        str(crd_file),
    ]
    tests_dir = str(Path(__file__).resolve().parents[1])  # where the `support` package lives
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert requests.get(url + "/apis/example.com/v1", timeout=5).status_code == 200
        finally:
            process.terminate()
    assert process.returncode == 0


# ------------------------------------------------------------------------------------------------
# kopf


def test_kopf_operator_handles_a_create_and_writes_status(api: FakeKubeAPI, http: Client) -> None:
    registry = kopf.OperatorRegistry()
    seen: list[str] = []

    @kopf.on.startup(registry=registry)
    def configure(settings: Any, **_: Any) -> None:
        settings.peering.standalone = True
        settings.watching.server_timeout = 5

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> Any:
        return kopf.ConnectionInfo(server=api.url, insecure=True, default_namespace="default")

    @kopf.on.create("example.com", "v1", "widgets", registry=registry)
    def created(name: str, body: Any, patch: Any, **_: Any) -> None:
        seen.append(name)
        patch.status["phase"] = "Seen"
        kopf.info(body, reason="Seen", message="kopf saw it")  # kopf 1.45 posts no log lines as events

    def events_about(name: str) -> list[dict[str, Any]]:
        events = http.ok("GET", "/api/v1/namespaces/default/events")["items"]
        return [e for e in events if e["involvedObject"]["name"] == name]

    ready, stop = threading.Event(), threading.Event()
    operator = threading.Thread(
        target=lambda: asyncio.run(
            kopf.operator(
                registry=registry, namespaces=["default"], standalone=True, ready_flag=ready, stop_flag=stop
            )
        )
    )
    operator.start()
    try:
        assert ready.wait(10)
        http.ok("POST", WIDGETS, widget())
        deadline = time.monotonic() + 10
        while not (
            http.ok("GET", f"{WIDGETS}/w1").get("status", {}).get("phase") == "Seen" and events_about("w1")
        ):
            assert time.monotonic() < deadline, "kopf did not write the status and post an event"
            time.sleep(0.05)
    finally:
        stop.set()
        operator.join(timeout=10)
    assert seen == ["w1"]
    assert not operator.is_alive()


# ------------------------------------------------------------------------------------------------
# kubectl


@pytest.fixture
def kubectl(api: FakeKubeAPI, tmp_path: Path) -> Any:
    if not KUBECTL.is_file():
        pytest.skip("kubectl is absent: run scripts/fetch_k8s_tools.py")
    config = api.kubeconfig(tmp_path / "kubeconfig")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(KUBECTL), "--kubeconfig", str(config), "--cache-dir", str(tmp_path / "cache"), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        assert not check or result.returncode == 0, result.stderr
        return result

    return run


@pytest.mark.kubectl
def test_kubectl_applies_and_prints_printer_columns(kubectl: Any, http: Client, tmp_path: Path) -> None:
    manifest = tmp_path / "widget.yaml"
    manifest.write_text(yaml.safe_dump(widget()))
    assert "widget.example.com/w1 created" in kubectl("apply", "--validate=false", "-f", str(manifest)).stdout
    status = {"phase": "Training", "progress": {"epoch": 4}}
    http.ok("PATCH", f"{WIDGETS}/w1/status", {"status": status}, headers=MERGE)
    header, row = kubectl("get", "wdg").stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "EPOCH", "READY", "AGE"]
    assert row.split()[:3] == ["w1", "Training", "4"]
    as_json = json.loads(kubectl("get", "widgets", "w1", "-o", "json").stdout)
    assert as_json["status"]["progress"]["epoch"] == 4
    manifest.write_text(yaml.safe_dump(widget(replicas=2)))
    assert "configured" in kubectl("apply", "--validate=false", "-f", str(manifest)).stdout
    assert http.ok("GET", f"{WIDGETS}/w1")["spec"]["replicas"] == 2


@pytest.mark.kubectl
def test_kubectl_wait_sees_a_ready_condition(kubectl: Any, http: Client) -> None:
    http.ok("POST", WIDGETS, widget())

    def make_ready() -> None:
        time.sleep(0.5)
        condition = {
            "type": "Ready",
            "status": "True",
            "reason": "Done",
            "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
        http.ok("PATCH", f"{WIDGETS}/w1/status", {"status": {"conditions": [condition]}}, headers=MERGE)

    patcher = threading.Thread(target=make_ready)
    patcher.start()
    result = kubectl("wait", "--for=condition=Ready", "--timeout=10s", "widget/w1")
    patcher.join()
    assert "condition met" in result.stdout


@pytest.mark.kubectl
def test_kubectl_reports_validation_errors(kubectl: Any, tmp_path: Path) -> None:
    manifest = tmp_path / "widget.yaml"
    manifest.write_text(yaml.safe_dump(widget(replicas=0)))
    result = kubectl("apply", "--validate=false", "-f", str(manifest), check=False)
    assert result.returncode != 0
    assert "spec.replicas in body should be greater than or equal to 1" in result.stderr


@pytest.mark.kubectl
def test_kubectl_default_validation_is_strict_on_the_server(kubectl: Any, tmp_path: Path) -> None:
    manifest = tmp_path / "widget.yaml"
    manifest.write_text(yaml.safe_dump(widget(surprise=1)))
    result = kubectl("apply", "-f", str(manifest), check=False)
    assert 'strict decoding error: unknown field "spec.surprise"' in result.stderr
    manifest.write_text(yaml.safe_dump(widget()))
    assert "created" in kubectl("apply", "-f", str(manifest)).stdout


@pytest.mark.kubectl
def test_kubectl_typed_generators_send_protobuf_that_the_fake_decodes(kubectl: Any, http: Client) -> None:
    kubectl("create", "namespace", "team")
    kubectl("create", "configmap", "cfg", "-n", "team", "--from-literal=a=b")
    kubectl("create", "secret", "generic", "s", "-n", "team", "--from-literal=token=abc")
    assert http.ok("GET", "/api/v1/namespaces/team/configmaps/cfg")["data"] == {"a": "b"}
    assert http.ok("GET", "/api/v1/namespaces/team/secrets/s")["data"] == {"token": "YWJj"}
    unsupported = kubectl("create", "deployment", "d", "--image=busybox", check=False)
    assert "UnsupportedMediaType" in unsupported.stderr or "decodes protobuf" in unsupported.stderr


@pytest.mark.kubectl
def test_helm_installs_upgrades_and_uninstalls_a_chart(
    api: FakeKubeAPI, http: Client, tmp_path: Path
) -> None:
    if not HELM.is_file():
        pytest.skip("helm is absent: run scripts/fetch_k8s_tools.py")
    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    manifest = {**configmap("demo"), "data": {"size": "{{ .Values.size }}"}}
    del manifest["metadata"]["labels"]
    (chart / "templates" / "cm.yaml").write_text(
        yaml.safe_dump(manifest) + "---\n" + yaml.safe_dump(widget("demo"))
    )
    config = str(api.kubeconfig(tmp_path / "kubeconfig"))

    def helm(*args: str) -> str:
        command = [str(HELM), "--kubeconfig", config, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout

    helm("install", "demo", str(chart), "--set", "size=1")
    assert http.ok("GET", f"{CONFIGMAPS}/demo")["data"] == {"size": "1"}
    assert http.ok("GET", f"{WIDGETS}/demo")["spec"]["model"] == "llama"
    helm("upgrade", "demo", str(chart), "--set", "size=2")
    assert http.ok("GET", f"{CONFIGMAPS}/demo")["data"] == {"size": "2"}
    assert "deployed" in helm("list")
    helm("uninstall", "demo")
    assert http.ok("GET", WIDGETS)["items"] == []
    assert [
        s["metadata"]["name"] for s in http.ok("GET", "/api/v1/namespaces/default/secrets")["items"]
    ] == []


@pytest.mark.kubectl
def test_kubectl_deletes_and_waits_for_deletion(kubectl: Any, http: Client) -> None:
    http.ok("POST", CONFIGMAPS, configmap("a"))
    assert 'configmap "a" deleted' in kubectl("delete", "configmap", "a").stdout
    assert http.ok("GET", CONFIGMAPS)["items"] == []
