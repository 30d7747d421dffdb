"""The contract of the fake Kueue (support.fakekueue) the operator's Kueue tests stand on: what Kueue's RayJob
integration and KubeRay do to a queued RayJob, one behaviour per test, over HTTP against the fake API.

Kueue's side, as sigs.k8s.io/kueue's jobframework reconciler and RayJob webhook do it: a RayJob labelled with
a LocalQueue is admitted by setting spec.suspend to false, preempted by setting it to true, suspended again if
anyone else unsuspends it, and must be created suspended with shutdownAfterJobFinishes. KubeRay's side, as
its RayJob controller reports it: Initializing -> Suspending -> Suspended while suspended, Suspended ->
Initializing -> Running once unsuspended.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune.operator import kube
from support.client import SyncKube
from support.fakekube import FakeKubeAPI
from support.fakekueue import PRIORITY_LABEL, QUEUE_LABEL, FakeKueue
from support.harness import start_api

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubeAPI]:
    fake, _ = start_api(tmp_path_factory.mktemp("fake-kueue"))
    try:
        yield fake
    finally:
        fake.stop()


_NAMESPACES = itertools.count()


class Namespace:
    """One test's namespace of the module's fake API: its RayJobs, and a FakeKueue over them."""

    def __init__(self, api: FakeKubeAPI) -> None:
        self.url = api.url
        self.name = f"queue-{next(_NAMESPACES)}"
        self.client = SyncKube(api.url)

    def create(self, name: str, queue: str | None = "team-a", priority: str | None = None, suspend: bool = True,
               shutdown: bool = True) -> None:
        labels = {QUEUE_LABEL: queue} if queue else {}
        if priority:
            labels[PRIORITY_LABEL] = priority
        container = {"name": "ray-head", "image": "kubetune/runtime:0.1.0"}
        self.client.create({
            "apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": name, "namespace": self.name, "labels": labels},
            "spec": {"entrypoint": "python -m x", "suspend": suspend, "shutdownAfterJobFinishes": shutdown,
                     "rayClusterSpec": {"headGroupSpec": {"rayStartParams": {},
                                                          "template": {"spec": {"containers": [container]}}}}}})

    def ref(self, name: str) -> kube.Ref:
        return kube.rayjob_ref(self.name, name)

    def get(self, name: str) -> Obj:
        return self.client.get(self.ref(name))

    def suspended(self, name: str) -> bool:
        return bool(self.get(name)["spec"]["suspend"])

    def deployment(self, name: str) -> str:
        return str((self.get(name).get("status") or {}).get("jobDeploymentStatus") or "")

    def kueue(self, **options: Any) -> FakeKueue:
        return FakeKueue(self.url, namespace=self.name, **options)


@pytest.fixture
def ns(shared_api: FakeKubeAPI) -> Namespace:
    return Namespace(shared_api)


def steps(kueue: FakeKueue, n: int) -> None:
    for _ in range(n):
        kueue.step()


def test_admits_as_many_as_its_capacity_oldest_first(ns: Namespace) -> None:
    for name in ("a", "b", "c"):
        ns.create(name)
    kueue = ns.kueue(capacity=2)
    kueue.step()
    assert kueue.admissions == ["a", "b"]
    assert [ns.suspended(n) for n in ("a", "b", "c")] == [False, False, True]


def test_admits_a_higher_priority_first_and_preempts_a_lower_one_for_it(ns: Namespace) -> None:
    ns.create("low", priority="low")
    kueue = ns.kueue(capacity=1, priorities={"low": 1, "high": 10})
    kueue.step()
    ns.create("high", priority="high")
    kueue.step()
    assert kueue.admissions == ["low", "high"] and kueue.preemptions == ["low"]
    assert (ns.suspended("low"), ns.suspended("high")) == (True, False)


def test_a_preempted_rayjob_is_admitted_again_when_there_is_room(ns: Namespace) -> None:
    ns.create("a")
    kueue = ns.kueue(capacity=1)
    kueue.step()
    kueue.set_capacity(0)
    kueue.preempt("a")
    kueue.step()
    assert ns.suspended("a") and kueue.preemptions == ["a"]
    kueue.set_capacity(1)
    kueue.step()
    assert not ns.suspended("a") and kueue.admissions == ["a", "a"]


def test_a_rayjob_unsuspended_without_admission_is_suspended_again(ns: Namespace) -> None:
    ns.create("a")
    kueue = ns.kueue(capacity=0)
    kueue.step()
    ns.client.patch(ns.ref("a"), {"spec": {"suspend": False}})  # someone else's resume
    kueue.step()
    assert kueue.fights == ["a"] and ns.suspended("a")


def test_its_webhook_refuses_rayjobs_created_unsuspended_or_kept_after_they_finish(ns: Namespace) -> None:
    ns.create("running", suspend=False)
    ns.create("kept", shutdown=False)
    kueue = ns.kueue(capacity=0, check=lambda obj: ["bad"] if obj["metadata"]["name"] == "kept" else [])
    kueue.step()
    assert sorted(kueue.violations) == ["kept: bad", "kept: shutdownAfterJobFinishes is not true",
                                        "running: created unsuspended"]


def test_rayjobs_without_a_queue_are_not_kueues(ns: Namespace) -> None:
    ns.create("free", queue=None, suspend=False)
    kueue = ns.kueue(capacity=0)
    steps(kueue, 3)
    assert kueue.fights == [] and not ns.suspended("free") and ns.deployment("free") == ""


def test_kuberay_reports_a_rayjob_created_suspended_through_suspending_to_suspended(ns: Namespace) -> None:
    ns.create("a")
    kueue = ns.kueue(capacity=0)
    seen = []
    for _ in range(4):
        kueue.step()
        seen.append(ns.deployment("a"))
    assert seen == ["Initializing", "Suspending", "Suspended", "Suspended"]
    assert ns.get("a")["status"]["observedGeneration"] == ns.get("a")["metadata"]["generation"]


def test_kuberay_runs_an_admitted_rayjob_and_suspends_a_preempted_one(ns: Namespace) -> None:
    ns.create("a")
    kueue = ns.kueue(capacity=0)
    steps(kueue, 3)
    kueue.set_capacity(1)
    seen = []
    for _ in range(2):
        kueue.step()
        seen.append(ns.deployment("a"))
    assert seen == ["Initializing", "Running"]
    assert ns.get("a")["status"]["rayClusterName"] == "a-raycluster"
    kueue.set_capacity(0)
    kueue.preempt("a")
    for _ in range(2):
        kueue.step()
        seen.append(ns.deployment("a"))
    assert seen[2:] == ["Suspending", "Suspended"]


def test_a_finished_rayjob_frees_its_place_and_is_left_alone(ns: Namespace) -> None:
    ns.create("a")
    ns.create("b")
    kueue = ns.kueue(capacity=1)
    steps(kueue, 3)
    ns.client.patch_status(ns.ref("a"), {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    kueue.step()
    assert kueue.admissions == ["a", "b"] and ns.deployment("a") == "Complete"
