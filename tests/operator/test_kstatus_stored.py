"""kstatus on what the running operator stores, not only on what its status functions return.

Flux (kstatus) and Argo CD read the objects in the API. At each step of a FineTuneJob's and an EvalJob's
life, the object as the fake API holds it after the operator's write must say what kstatus should
conclude: InProgress while it works (also while the operator has not seen the latest generation),
Current on success and while suspended, Failed when it failed; and every condition records the
generation it describes.
"""

from __future__ import annotations

from typing import Any

from test_evaljob_operator import BAD, EVAL_RAYJOB, RUNNING, serve_all
from test_evaljob_operator import create as create_evj
from test_evaljob_operator import evaluate as finish_evaluation
from test_operator import SUCCEEDED, create

from gitops.test_kstatus import kstatus
from kubetune.operator import kube
from support.harness import Cluster, Operator, eventually


def stored(cluster: Cluster, ref: kube.Ref) -> dict[str, Any]:
    return cluster.kube.get(ref)


def settles(cluster: Cluster, ref: kube.Ref, phase: str, expected: str) -> dict[str, Any]:
    """Wait until the stored object is in `phase`, then check what kstatus makes of it."""
    def in_phase() -> dict[str, Any] | None:
        obj = stored(cluster, ref)
        return obj if (obj.get("status") or {}).get("phase") == phase else None

    obj: dict[str, Any] = eventually(in_phase, what=f"{ref.name} {phase}")
    generation = obj["metadata"]["generation"]
    assert obj["status"]["observedGeneration"] == generation
    assert all(c["observedGeneration"] == generation for c in obj["status"]["conditions"])
    assert kstatus(obj) == expected, (phase, obj["status"]["conditions"])
    return obj


def test_a_finetunejob_is_in_progress_then_current_then_in_progress_after_a_spec_change(
        cluster: Cluster, operator: Operator) -> None:
    ref = kube.ftj_ref("default", "viggo")
    create(cluster)
    settles(cluster, ref, "Pending", "InProgress")
    cluster.wait_rayjob()
    cluster.report_rayjob(jobDeploymentStatus="Running", jobStatus="RUNNING")
    settles(cluster, ref, "Running", "InProgress")
    cluster.kube.patch(ref, {"spec": {"suspend": True}})
    eventually(lambda: cluster.rayjob()["spec"]["suspend"] is True, what="RayJob suspended")
    cluster.report_rayjob(jobDeploymentStatus="Suspended")
    settles(cluster, ref, "Suspended", "Current")  # nothing to do until the user resumes it
    resumed = cluster.kube.patch(ref, {"spec": {"suspend": False}})
    assert kstatus(resumed) == "InProgress"  # a new generation the operator has not acted on yet
    eventually(lambda: cluster.rayjob()["spec"]["suspend"] is False, what="RayJob resumed")
    cluster.report_rayjob(jobDeploymentStatus="Running", jobStatus="RUNNING")
    settles(cluster, ref, "Running", "InProgress")
    cluster.report_rayjob(**SUCCEEDED)
    settles(cluster, ref, "Succeeded", "Current")


def test_an_evaljob_whose_gate_fails_ends_failed_for_kstatus(cluster: Cluster, operator: Operator) -> None:
    ref = kube.evj_ref("default", "viggo-eval")
    create_evj(cluster)
    eventually(lambda: kstatus(stored(cluster, ref)) == "InProgress", what="InProgress while serving")
    serve_all(cluster)
    cluster.report_rayjob(EVAL_RAYJOB, **RUNNING)
    settles(cluster, ref, "Evaluating", "InProgress")
    finish_evaluation(cluster, BAD)
    settles(cluster, ref, "Failed", "Failed")
