"""Queued jobs end to end: the real operator, the fake API over HTTP, and a Kueue-like controller playing Kueue
(admission, preemption, admission again) and KubeRay (support.fakekueue).

What kubetune promises with spec.queueName:
- the RayJob is created suspended, labelled with the LocalQueue (and WorkloadPriorityClass), and valid for
  KubeRay v1.7.0's CRD;
- kubetune never unsuspends it (Kueue would suspend it again: `fights` stays empty), and never writes it;
- the job is Queued (phase and condition) until Kueue admits it, Preempted (phase Queued) when Kueue suspends it
  again, and proceeds when admitted;
- the user's spec.suspend still works: suspending deletes the RayJob (leaving the queue), resuming creates it
  again, queued, without counting a retry.

State table (docs: README "Queues (Kueue)"):

| spec.suspend | RayJob spec.suspend (Kueue's)  | kubetune does                      | phase / Ready reason        |
|--------------|--------------------------------|------------------------------------|-----------------------------|
| false        | (none yet)                     | creates it, suspended + labels     | Queued / Queued             |
| false        | true, never admitted           | nothing                            | Queued / Queued             |
| false        | false (admitted), not running  | nothing                            | Pending / Admitted          |
| false        | false, running                 | follows KubeRay                    | Running / Running           |
| false        | true again (preempted)         | nothing                            | Queued / Preempted          |
| true         | any                            | deletes it (Kueue forgets it)      | Suspended / Suspended       |
| true         | (none)                         | nothing                            | Suspended / Suspended       |
| true -> false| (none)                         | creates it again, suspended        | Queued / Queued             |
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_evaljob_operator import EVAL_RAYJOB, GOOD, SUCCEEDED, report_results, serve_all
from test_evaljob_operator import create as create_evaljob
from test_evaljob_operator import status as evaljob_status
from test_evaljob_operator import wait_phase as wait_evaljob

from factories import ftj_manifest
from kube_schema import schema_errors
from kubetune.operator import kube
from support.fakekueue import FakeKueue
from support.harness import Cluster, Operator, eventually
from support.shared import kuberay_crd

PRIORITIES = {"low": 100, "high": 1000}


@pytest.fixture
def kueue(cluster: Cluster) -> Iterator[FakeKueue]:
    """Kueue with no quota yet (nothing is admitted until the test gives it some), checking every RayJob it sees
    against KubeRay v1.7.0's CRD."""
    crd = kuberay_crd("rayjobs")
    fake = FakeKueue(cluster.api.url, capacity=0, priorities=PRIORITIES,
                     check=lambda rayjob: schema_errors(rayjob, crd)).start()
    try:
        yield fake
    finally:
        fake.stop()
        assert fake.errors == []
        assert fake.violations == [], "a queued RayJob Kueue's webhook or KubeRay's CRD would refuse"
        assert fake.fights == [], "a queued RayJob was unsuspended without Kueue's admission"


def create(cluster: Cluster, name: str = "viggo", **paths: Any) -> dict[str, Any]:
    spec = ftj_manifest(name, **{"spec__queueName": "team-a", **paths})["spec"]
    return cluster.create_ftj(spec, name)


def wait_state(cluster: Cluster, phase: str, reason: str, name: str = "viggo") -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = cluster.status(name)
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
        return status if (status.get("phase"), ready.get("reason")) == (phase, reason) else None

    result: dict[str, Any] = eventually(reached, what=f"{name} {phase}/{reason}")
    return result


def operator_wrote_a_rayjob(cluster: Cluster) -> list[str]:
    """PUTs and PATCHes of a RayJob itself by the operator (kopf's or its own aiohttp client)."""
    return [f"{r.method} {r.path} {r.body!r}" for r in cluster.api.request_log
            if r.method in ("PUT", "PATCH") and "/rayjobs/" in r.path and not r.path.endswith("/status")
            and (r.user_agent.startswith("kopf/") or " aiohttp/" in r.user_agent)]


def test_a_queued_job_is_queued_until_kueue_admits_it_then_runs(cluster: Cluster, operator: Operator,
                                                                 kueue: FakeKueue) -> None:
    create(cluster, spec__workloadPriorityClassName="high")
    rayjob = cluster.wait_rayjob()
    assert rayjob["spec"]["suspend"] is True
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    eventually(lambda: (cluster.rayjob().get("status") or {}).get("jobDeploymentStatus") == "Suspended",
               what="KubeRay to report the queued RayJob Suspended")
    queued = wait_state(cluster, "Queued", "Queued")
    assert cluster.condition("Queued")["status"] == "True" and cluster.condition("Running")["status"] == "False"
    assert "team-a" in cluster.condition("Ready")["message"] and queued["children"]["rayJob"] == "viggo-train"
    time.sleep(0.5)  # several timer periods: nothing moves a job Kueue holds
    assert cluster.status()["phase"] == "Queued" and cluster.rayjob()["spec"]["suspend"] is True

    kueue.set_capacity(1)
    wait_state(cluster, "Running", "Running")
    assert cluster.condition("Queued")["status"] == "False"
    cluster.report_rayjob(jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    cluster.wait_phase("Succeeded")
    assert kueue.admissions == ["viggo-train"]
    assert operator_wrote_a_rayjob(cluster) == []


def test_a_preempted_job_shows_it_and_runs_again_when_admitted_again(cluster: Cluster, operator: Operator,
                                                                     kueue: FakeKueue) -> None:
    kueue.set_capacity(1)
    create(cluster)
    cluster.wait_rayjob()
    wait_state(cluster, "Running", "Running")
    kueue.set_capacity(0)  # the quota shrinks: nothing is admitted again until it grows
    kueue.preempt("viggo-train")
    preempted = wait_state(cluster, "Queued", "Preempted")
    assert "admitting it" in cluster.condition("Ready")["message"]
    assert cluster.condition("Queued")["status"] == "True"
    assert preempted.get("retries") is None  # a preemption is not a failed attempt
    kueue.set_capacity(1)
    wait_state(cluster, "Running", "Running")
    assert kueue.admissions == ["viggo-train", "viggo-train"] and kueue.preemptions == ["viggo-train"]
    (only,) = cluster.list("ray.io/v1", "RayJob")  # the same RayJob throughout: Kueue's to suspend and resume
    assert only["metadata"]["name"] == "viggo-train"
    assert operator_wrote_a_rayjob(cluster) == []
    reasons = [e["reason"] for e in sorted(cluster.events(), key=lambda e: int(e["metadata"]["resourceVersion"]))]
    assert reasons[:1] == ["Created"] and "Preempted" in reasons


def test_a_higher_priority_job_preempts_a_lower_one_which_runs_again_after_it(cluster: Cluster, operator: Operator,
                                                                              kueue: FakeKueue) -> None:
    kueue.set_capacity(1)
    create(cluster, "low", spec__workloadPriorityClassName="low", spec__output={"uri": "s3://b/runs/low"})
    wait_state(cluster, "Running", "Running", "low")
    create(cluster, "high", spec__workloadPriorityClassName="high", spec__output={"uri": "s3://b/runs/high"})
    wait_state(cluster, "Running", "Running", "high")
    wait_state(cluster, "Queued", "Preempted", "low")
    cluster.report_rayjob("high-train", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    cluster.wait_phase("Succeeded", "high")
    wait_state(cluster, "Running", "Running", "low")
    assert kueue.admissions == ["low-train", "high-train", "low-train"]
    assert operator_wrote_a_rayjob(cluster) == []


def test_suspending_a_queued_job_takes_it_out_of_the_queue_and_resuming_queues_it_again(
        cluster: Cluster, operator: Operator, kueue: FakeKueue) -> None:
    kueue.set_capacity(1)
    create(cluster)
    first = cluster.wait_rayjob()
    wait_state(cluster, "Running", "Running")
    cluster.kube.patch(kube.ftj_ref("default", "viggo"), {"spec": {"suspend": True}})
    eventually(lambda: cluster.list("ray.io/v1", "RayJob") == [], what="the RayJob deleted")
    wait_state(cluster, "Suspended", "Suspended")
    assert cluster.condition("Suspended")["status"] == "True" and cluster.condition("Queued")["status"] == "False"
    time.sleep(1.0)  # five timer periods: a suspended queued job gets no RayJob (Kueue would admit it)
    assert cluster.list("ray.io/v1", "RayJob") == []

    kueue.set_capacity(0)  # the queue is full: the new RayJob waits, so what the operator created can be read
    cluster.kube.patch(kube.ftj_ref("default", "viggo"), {"spec": {"suspend": False}})
    again = cluster.wait_rayjob()
    assert again["metadata"]["uid"] != first["metadata"]["uid"]
    assert again["spec"]["suspend"] is True and again["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    kueue.set_capacity(1)
    wait_state(cluster, "Running", "Running")
    assert cluster.status().get("retries") is None  # suspending and resuming is no failed attempt
    assert kueue.admissions == ["viggo-train", "viggo-train"]
    assert operator_wrote_a_rayjob(cluster) == []


def test_a_queued_job_created_suspended_gets_no_rayjob_and_one_suspended_while_it_waits_leaves_the_queue(
        cluster: Cluster, operator: Operator, kueue: FakeKueue) -> None:
    create(cluster, spec__suspend=True)
    status = wait_state(cluster, "Suspended", "Suspended")
    assert status["children"]["rayJob"] == "viggo-train"
    eventually(lambda: cluster.kube.get(kube.Ref("v1", "ConfigMap", "default", "viggo-trainer-config")),
               what="the job's ConfigMap (everything but the RayJob is created)")
    time.sleep(0.5)  # several timer periods
    assert cluster.list("ray.io/v1", "RayJob") == []

    cluster.kube.patch(kube.ftj_ref("default", "viggo"), {"spec": {"suspend": False}})
    cluster.wait_rayjob()
    wait_state(cluster, "Queued", "Queued")
    cluster.kube.patch(kube.ftj_ref("default", "viggo"), {"spec": {"suspend": True}})
    eventually(lambda: cluster.list("ray.io/v1", "RayJob") == [], what="the waiting RayJob deleted")
    kueue.set_capacity(1)  # quota now: nothing of the suspended job is there to admit
    wait_state(cluster, "Suspended", "Suspended")
    time.sleep(0.5)
    assert kueue.admissions == [] and cluster.list("ray.io/v1", "RayJob") == []

    cluster.kube.patch(kube.ftj_ref("default", "viggo"), {"spec": {"suspend": False}})
    wait_state(cluster, "Running", "Running")
    assert kueue.admissions == ["viggo-train"]


def test_a_queued_rayjob_deleted_while_it_waits_is_created_again_without_a_retry(
        cluster: Cluster, operator: Operator, kueue: FakeKueue) -> None:
    create(cluster)
    first = cluster.wait_rayjob()
    wait_state(cluster, "Queued", "Queued")
    cluster.kube.delete(kube.rayjob_ref("default", "viggo-train"))
    eventually(lambda: [r["metadata"]["uid"] for r in cluster.list("ray.io/v1", "RayJob")] not in ([], [
        first["metadata"]["uid"]]), what="the RayJob created again")
    wait_state(cluster, "Queued", "Queued")
    assert cluster.status().get("retries") is None


# -- the evaluation RayJob of an EvalJob ------------------------------------------------------------


def test_an_evaljobs_evaluation_rayjob_is_queued_preempted_and_admitted_again(cluster: Cluster, operator: Operator,
                                                                              kueue: FakeKueue) -> None:
    create_evaljob(cluster, spec__queueName="team-a", spec__workloadPriorityClassName="low")
    rayjob = serve_all(cluster)  # the RayServices are not queued: they serve first, then the evaluation queues
    assert rayjob["spec"]["suspend"] is True and rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    for service in cluster.list("ray.io/v1", "RayService"):
        assert "kueue.x-k8s.io/queue-name" not in service["metadata"]["labels"]
    wait_evaljob(cluster, "Queued", "Queued")
    kueue.set_capacity(1)
    wait_evaljob(cluster, "Evaluating", "Evaluating")
    eventually(lambda: (cluster.rayjob(EVAL_RAYJOB).get("status") or {}).get("jobDeploymentStatus") == "Running",
               what="the evaluation running")
    kueue.set_capacity(0)
    kueue.preempt(EVAL_RAYJOB)
    wait_evaljob(cluster, "Queued", "Preempted")
    kueue.set_capacity(1)
    eventually(lambda: evaljob_status(cluster).get("rayJobStatus") == "Running/RUNNING", what="admitted again")
    report_results(cluster, GOOD)
    cluster.report_rayjob(EVAL_RAYJOB, **SUCCEEDED)
    wait_evaljob(cluster, "Succeeded")
    assert kueue.admissions == [EVAL_RAYJOB, EVAL_RAYJOB]
    assert operator_wrote_a_rayjob(cluster) == []
    (queued,) = [c for c in evaljob_status(cluster)["conditions"] if c["type"] == "Queued"]
    assert queued["status"] == "False"
