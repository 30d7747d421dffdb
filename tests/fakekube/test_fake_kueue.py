"""The contract of the fake Kueue (support.fakekueue) the operator's Kueue tests stand on: what Kueue's RayJob
integration and KubeRay do to a queued RayJob, one behaviour per test, over HTTP against the fake API.

Kueue's side, as sigs.k8s.io/kueue's jobframework reconciler and RayJob webhook do it: a RayJob labelled with
a LocalQueue is admitted by setting spec.suspend to false, preempted by setting it to true, suspended again if
anyone else unsuspends it, and must be created suspended with shutdownAfterJobFinishes. KubeRay's side, as
its RayJob controller reports it: Initializing -> Suspending -> Suspended while suspended, Suspended ->
Initializing -> Running once unsuspended.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.operator import kube
from support.client import SyncKube
from support.fakekube import FakeKubeAPI
from support.fakekueue import PRIORITY_LABEL, QUEUE_LABEL, FakeKueue
from support.harness import start_api

Obj = dict[str, Any]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeKubeAPI]:
    fake, _ = start_api(tmp_path)
    try:
        yield fake
    finally:
        fake.stop()


def rayjob(name: str, queue: str | None = "team-a", priority: str | None = None, suspend: bool = True,
           shutdown: bool = True) -> Obj:
    labels = {QUEUE_LABEL: queue} if queue else {}
    if priority:
        labels[PRIORITY_LABEL] = priority
    container = {"name": "ray-head", "image": "kubetune/runtime:0.1.0"}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"entrypoint": "python -m x", "suspend": suspend, "shutdownAfterJobFinishes": shutdown,
                     "rayClusterSpec": {"headGroupSpec": {"rayStartParams": {},
                                                          "template": {"spec": {"containers": [container]}}}}}}


def get(client: SyncKube, name: str) -> Obj:
    return client.get(kube.rayjob_ref("default", name))


def deployment(client: SyncKube, name: str) -> str:
    return str((get(client, name).get("status") or {}).get("jobDeploymentStatus") or "")


def steps(kueue: FakeKueue, n: int) -> None:
    for _ in range(n):
        kueue.step()


def test_admits_as_many_as_its_capacity_oldest_first(api: FakeKubeAPI) -> None:
    client = SyncKube(api.url)
    for name in ("a", "b", "c"):
        client.create(rayjob(name))
    kueue = FakeKueue(api.url, capacity=2)
    kueue.step()
    assert kueue.admissions == ["a", "b"]
    assert [get(client, n)["spec"]["suspend"] for n in ("a", "b", "c")] == [False, False, True]


def test_admits_a_higher_priority_first_and_preempts_a_lower_one_for_it(api: FakeKubeAPI) -> None:
    client = SyncKube(api.url)
    client.create(rayjob("low", priority="low"))
    kueue = FakeKueue(api.url, capacity=1, priorities={"low": 1, "high": 10})
    kueue.step()
    client.create(rayjob("high", priority="high"))
    kueue.step()
    assert kueue.admissions == ["low", "high"] and kueue.preemptions == ["low"]
    assert (get(client, "low")["spec"]["suspend"], get(client, "high")["spec"]["suspend"]) == (True, False)


def test_a_preempted_rayjob_is_admitted_again_when_there_is_room(api: FakeKubeAPI) -> None:
    client = SyncKube(api.url)
    client.create(rayjob("a"))
    kueue = FakeKueue(api.url, capacity=1)
    kueue.step()
    kueue.set_capacity(0)
    kueue.preempt("a")
    kueue.step()
    assert get(client, "a")["spec"]["suspend"] is True and kueue.preemptions == ["a"]
    kueue.set_capacity(1)
    kueue.step()
    assert get(client, "a")["spec"]["suspend"] is False and kueue.admissions == ["a", "a"]


def test_a_rayjob_unsuspended_without_admission_is_suspended_again(api: FakeKubeAPI) -> None:
    client = SyncKube(api.url)
    client.create(rayjob("a"))
    kueue = FakeKueue(api.url, capacity=0)
    kueue.step()
    client.patch(kube.rayjob_ref("default", "a"), {"spec": {"suspend": False}})  # someone else's resume
    kueue.step()
    assert kueue.fights == ["a"] and get(client, "a")["spec"]["suspend"] is True


def test_its_webhook_refuses_rayjobs_created_unsuspended_or_kept_after_they_finish(api: FakeKubeAPI) -> None:
    client = SyncKube(api.url)
    client.create(rayjob("running", suspend=False))
    client.create(rayjob("kept", shutdown=False))
    kueue = FakeKueue(api.url, capacity=0, check=lambda obj: ["bad"] if obj["metadata"]["name"] == "kept" else [])
    kueue.step()
    assert sorted(kueue.violations) == ["kept: bad", "kept: shutdownAfterJobFinishes is not true",
                                        "running: created unsuspended"]


def test_rayjobs_without_a_queue_are_not_kueues(api: FakeKubeAPI) -> None:
    client = SyncKube(api.url)
    client.create(rayjob("free", queue=None, suspend=False))
    kueue = FakeKueue(api.url, capacity=0)
    steps(kueue, 3)
    assert kueue.fights == [] and get(client, "free")["spec"]["suspend"] is False
    assert deployment(client, "free") == ""


def test_kuberay_reports_a_rayjob_created_suspended_through_suspending_to_suspended(api: FakeKubeAPI) -> None:
    client = SyncKube(api.url)
    client.create(rayjob("a"))
    kueue = FakeKueue(api.url, capacity=0)
    seen = []
    for _ in range(4):
        kueue.step()
        seen.append(deployment(client, "a"))
    assert seen == ["Initializing", "Suspending", "Suspended", "Suspended"]
    status = get(client, "a")["status"]
    assert status["observedGeneration"] == get(client, "a")["metadata"]["generation"]


def test_kuberay_runs_an_admitted_rayjob_and_suspends_a_preempted_one(api: FakeKubeAPI) -> None:
    client = SyncKube(api.url)
    client.create(rayjob("a"))
    kueue = FakeKueue(api.url, capacity=0)
    steps(kueue, 3)
    kueue.set_capacity(1)
    seen = []
    for _ in range(2):
        kueue.step()
        seen.append(deployment(client, "a"))
    assert seen == ["Initializing", "Running"]
    assert get(client, "a")["status"]["rayClusterName"] == "a-raycluster"
    kueue.set_capacity(0)
    kueue.preempt("a")
    for _ in range(2):
        kueue.step()
        seen.append(deployment(client, "a"))
    assert seen[2:] == ["Suspending", "Suspended"]


def test_a_finished_rayjob_frees_its_place_and_is_left_alone(api: FakeKubeAPI) -> None:
    client = SyncKube(api.url)
    client.create(rayjob("a"))
    client.create(rayjob("b"))
    kueue = FakeKueue(api.url, capacity=1)
    steps(kueue, 3)
    client.patch_status(kube.rayjob_ref("default", "a"), {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    kueue.step()
    assert kueue.admissions == ["a", "b"] and deployment(client, "a") == "Complete"
