"""A hostile tenant against the operator: it acts only on the objects it controls.

Every pod of a job runs code its author chose and may write the job's status; anyone in the namespace may
create objects with any name and labels. Each test below is one such attack, and what must survive it.
The real `python -m kubetune.operator` runs against the fake API over HTTP; the test plays the tenant,
KubeRay and the evaluator.
"""

from __future__ import annotations

import copy
from typing import Any

from test_evaljob_operator import (
    BAD,
    EVAL_RAYJOB,
    GOOD,
    SERVICES,
    evaluate,
    rayservices,
    serve_all,
    wait_phase,
)
from test_evaljob_operator import create as create_evaljob
from test_evaljob_operator import status as evaljob_status
from test_operator import RUNNING, SUCCEEDED, create, rayjob_events_followed, run_to

from factories import ftj_manifest
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import BestCheckpoint, EpochResult
from kubetune.contract.evalplan import judge_gate
from kubetune.contract.progress import StatusReporter
from kubetune.operator import kube
from support.harness import Cluster, Operator, eventually


def config_map(name: str, data: dict[str, str], **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default", **metadata},
            "data": data}


def foreign_copy(obj: dict[str, Any], name: str, **metadata: Any) -> dict[str, Any]:
    """Another object with `obj`'s spec (valid for its CRD), under `name`, owned by nobody."""
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "spec": copy.deepcopy(obj["spec"]),
            "metadata": {"name": name, "namespace": "default", **metadata}}


def tamper_status(cluster: Cluster, ref: kube.Ref, status: dict[str, Any]) -> None:
    """What any pod of the job can do with the namespace's trainer ServiceAccount."""
    cluster.kube.patch_status(ref, status)


def reasons(cluster: Cluster, name: str = "viggo") -> set[str]:
    return {e["reason"] for e in cluster.events(name)}


def exists(cluster: Cluster, ref: kube.Ref) -> bool:
    try:
        cluster.kube.get(ref)
        return True
    except kube.NotFound:
        return False


VICTIM_CM = kube.Ref("v1", "ConfigMap", "default", "team-b-data")


# -- names from status are never acted on ----------------------------------------------------------


def test_ttl_never_deletes_a_configmap_named_in_status(cluster: Cluster, operator: Operator) -> None:
    cluster.kube.create(config_map("team-b-data", {"rows": "precious"}))
    create(cluster, spec__ttlSecondsAfterFinished=0)
    cluster.wait_rayjob()
    run_to(cluster, RUNNING)
    cluster.wait_phase("Running")
    tamper_status(cluster, kube.ftj_ref("default", "viggo"),
                  {"children": {"configMap": "team-b-data", "rayJob": "viggo-train"}})
    cluster.report_rayjob(**SUCCEEDED)
    eventually(lambda: "ChildrenDeleted" in reasons(cluster), what="TTL expiry")
    assert cluster.kube.get(VICTIM_CM)["data"] == {"rows": "precious"}
    assert not exists(cluster, kube.Ref("v1", "ConfigMap", "default", "viggo-trainer-config"))  # its own went


def test_ttl_never_deletes_a_rayjob_named_in_status(cluster: Cluster, operator: Operator) -> None:
    create(cluster, "other")
    theirs = cluster.wait_rayjob("other-train")
    create(cluster, spec__ttlSecondsAfterFinished=0)
    cluster.wait_rayjob()
    run_to(cluster, RUNNING)
    cluster.wait_phase("Running")
    tamper_status(cluster, kube.ftj_ref("default", "viggo"), {"children": {"rayJob": "other-train"}})
    cluster.report_rayjob(**SUCCEEDED)
    eventually(lambda: "ChildrenDeleted" in reasons(cluster), what="TTL expiry")
    assert cluster.rayjob("other-train")["metadata"]["uid"] == theirs["metadata"]["uid"]
    assert not exists(cluster, kube.rayjob_ref("default", "viggo-train"))


def test_suspend_never_touches_a_rayjob_named_in_status(cluster: Cluster, operator: Operator) -> None:
    create(cluster, "other")
    cluster.wait_rayjob("other-train")
    create(cluster)
    cluster.wait_rayjob()
    run_to(cluster, RUNNING)
    cluster.wait_phase("Running")
    tamper_status(cluster, kube.ftj_ref("default", "viggo"), {"children": {"rayJob": "other-train"}})
    cluster.kube.patch(kube.ftj_ref("default", "viggo"), {"spec": {"suspend": True}})
    eventually(lambda: cluster.rayjob()["spec"]["suspend"] is True, what="its own RayJob suspended")
    assert cluster.rayjob("other-train")["spec"]["suspend"] is False


def test_evaljob_teardown_never_deletes_a_rayservice_named_in_status(cluster: Cluster, operator: Operator) -> None:
    create_evaljob(cluster)
    serve_all(cluster)
    foreign = foreign_copy(cluster.kube.get(kube.rayservice_ref("default", SERVICES[0])), "team-b-chatbot")
    cluster.kube.create(foreign)
    tamper_status(cluster, kube.evj_ref("default", "viggo-eval"),
                  {"children": {"rayServices": ["team-b-chatbot"], "rayJob": EVAL_RAYJOB,
                                "configMap": "viggo-eval-eval-config"}})
    evaluate(cluster, {"tuned": {"exactMatch": 0.86}, "base": {"exactMatch": 0.41}})
    wait_phase(cluster, "Succeeded")
    eventually(lambda: rayservices(cluster) == ["team-b-chatbot"], what="its own RayServices deleted")


# -- labels route nothing ----------------------------------------------------------------------------


def test_a_labelled_foreign_rayjob_changes_nothing(cluster: Cluster, operator: Operator) -> None:
    owner = create(cluster)
    ours = cluster.wait_rayjob()
    run_to(cluster, RUNNING)
    cluster.wait_phase("Running")
    labels = dict(ours["metadata"]["labels"])
    impostor = foreign_copy(ours, "impostor", labels=labels)
    cluster.kube.create(impostor)
    cluster.report_rayjob("impostor", jobDeploymentStatus="ValidationFailed", reason="ValidationFailed",
                          message="forged")
    # The same, claiming the victim as an owner (not as its controller) and as its controller under
    # another name: neither is the job's RayJob.
    claims = [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "viggo",
               "uid": owner["metadata"]["uid"]}]
    cluster.kube.create(foreign_copy(ours, "impostor-2", labels=labels, ownerReferences=claims))
    cluster.report_rayjob("impostor-2", jobDeploymentStatus="Failed", reason="AppFailed", message="forged")
    controller = [{**claims[0], "controller": True}]
    followed = rayjob_events_followed(operator)
    cluster.kube.create(foreign_copy(ours, "impostor-3", labels=labels, ownerReferences=controller))
    cluster.report_rayjob("impostor-3", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED", message="forged")
    # It names the victim as its controller, so the operator looks at it (and must decide it is not the job's).
    eventually(lambda: rayjob_events_followed(operator) > followed, what="the forged status to be handled")
    assert cluster.status()["phase"] == "Running"
    cluster.report_rayjob(jobDeploymentStatus="Retrying", failed=1, message="retrying after a node loss")
    eventually(lambda: cluster.condition("Ready")["reason"] == "Retrying", what="its own RayJob followed")
    assert cluster.status()["phase"] == "Running" and cluster.status()["retries"] == 1
    assert "forged" not in str(cluster.status())


# -- "already exists" is checked, never adopted ------------------------------------------------------


def test_a_precreated_foreign_configmap_fails_the_job_with_child_conflict(cluster: Cluster,
                                                                          operator: Operator) -> None:
    planted = config_map("viggo-trainer-config", {"finetunejob.yaml": "spec: {output: {uri: s3://attacker}}"})
    cluster.kube.create(planted)
    create(cluster)
    cluster.wait_phase("Failed")
    ready = cluster.condition("Ready")
    assert ready["reason"] == "ChildConflict" and "viggo-trainer-config" in ready["message"]
    assert cluster.kube.get(kube.Ref("v1", "ConfigMap", "default", "viggo-trainer-config"))["data"] == planted["data"]
    assert cluster.list("ray.io/v1", "RayJob") == []  # nothing launched on the planted config


def test_a_precreated_configmap_owned_by_another_job_is_not_adopted(cluster: Cluster, operator: Operator) -> None:
    other = create(cluster, "other")
    cluster.wait_rayjob("other-train")
    reference = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "other",
                 "uid": other["metadata"]["uid"], "controller": True}
    cluster.kube.create(config_map("viggo-trainer-config", {"k": "v"}, ownerReferences=[reference]))
    create(cluster)
    assert cluster.wait_phase("Failed")["conditions"][0]["reason"] == "ChildConflict"


def test_restart_after_its_own_children_exist_carries_on(cluster: Cluster, operator: Operator) -> None:
    """The other side of ChildConflict: children the job controls are its own after a restart."""
    create(cluster)
    first = cluster.wait_rayjob()
    operator.kill()
    cluster.kube.patch_status(kube.ftj_ref("default", "viggo"), {"children": None})  # as if never recorded
    operator.start()
    # The resumed launch records the children again and finds the RayJob its own; KubeRay reports after.
    eventually(lambda: (cluster.status().get("children") or {}).get("rayJob") == "viggo-train",
               what="the children recorded again")
    run_to(cluster, RUNNING)
    cluster.wait_phase("Running")
    assert cluster.rayjob()["metadata"]["uid"] == first["metadata"]["uid"]


# -- the operator's own verdicts ---------------------------------------------------------------------


def test_a_tampered_gate_is_corrected(cluster: Cluster, operator: Operator) -> None:
    create_evaljob(cluster)
    serve_all(cluster)
    cluster.report_rayjob(EVAL_RAYJOB, **RUNNING)
    forged = judge_gate(EvalJob.from_body(cluster.kube.get(kube.evj_ref("default", "viggo-eval"))).spec, GOOD)
    assert forged is not None and forged.passed
    reporter = StatusReporter(server=cluster.api.url, namespace="default", name="viggo-eval", plural="evaljobs")
    assert reporter.patch({"candidates": [{"name": c, "metrics": m, "examples": 500} for c, m in BAD.items()],
                           "gate": forged.to_wire()})  # the metrics fail the gate; the verdict says passed
    cluster.report_rayjob(EVAL_RAYJOB, **SUCCEEDED)
    status = wait_phase(cluster, "Failed", "GateFailed")
    assert status["gate"]["passed"] is False
    assert "GateOverwritten" in {e["reason"] for e in cluster.events("viggo-eval")}


def report_best(cluster: Cluster, name: str, uri: str) -> None:
    StatusReporter(server=cluster.api.url, namespace="default", name=name).epoch_done(
        [EpochResult(epoch=1, train_loss=1.0, val_loss=0.5, val_perplexity=1.65)],
        BestCheckpoint(uri=uri, epoch=1, val_perplexity=1.65))


def test_a_best_checkpoint_outside_the_referenced_jobs_output_is_refused(cluster: Cluster,
                                                                           operator: Operator) -> None:
    create(cluster, "mathqa")  # output s3://bucket/runs/viggo
    cluster.wait_rayjob("mathqa-train")
    report_best(cluster, "mathqa", "s3://attacker-bucket/trojan")
    cluster.report_rayjob("mathqa-train", **SUCCEEDED)
    cluster.wait_phase("Succeeded", "mathqa")
    create(cluster, "gsm8k", spec__baseModel={"fineTuneJobRef": {"name": "mathqa"}})
    cluster.wait_phase("Failed", "gsm8k")
    ready = cluster.condition("Ready", "gsm8k")
    assert ready["reason"] == "BaseModelUnavailable" and "not under its spec.output.uri" in ready["message"]
    assert not exists(cluster, kube.rayjob_ref("default", "gsm8k-train"))


def test_a_best_checkpoint_escaping_the_output_by_dot_dot_is_refused(cluster: Cluster, operator: Operator) -> None:
    create(cluster, "mathqa")
    cluster.wait_rayjob("mathqa-train")
    report_best(cluster, "mathqa", "s3://bucket/runs/viggo/../../other-team/model")
    cluster.report_rayjob("mathqa-train", **SUCCEEDED)
    cluster.wait_phase("Succeeded", "mathqa")
    create(cluster, "gsm8k", spec__baseModel={"fineTuneJobRef": {"name": "mathqa"}})
    assert cluster.wait_phase("Failed", "gsm8k")["conditions"][0]["reason"] == "BaseModelUnavailable"


def test_an_evaljob_refuses_a_best_checkpoint_outside_the_jobs_output(cluster: Cluster, operator: Operator) -> None:
    cluster.create_ftj(ftj_manifest("viggo")["spec"], "viggo")
    cluster.wait_rayjob()
    report_best(cluster, "viggo", "s3://attacker-bucket/trojan")
    cluster.report_rayjob(**SUCCEEDED)
    cluster.wait_phase("Succeeded")
    tuned = {"name": "tuned", "model": {"fineTuneJobRef": {"name": "viggo"}}}
    create_evaljob(cluster, spec__candidates=[tuned], spec__gate=None)
    status = wait_phase(cluster, "Failed", "ModelUnavailable")
    assert "not under its spec.output.uri" in status["conditions"][0]["message"]
    assert rayservices(cluster) == []


# -- faults end in a condition -----------------------------------------------------------------------


def test_a_422_on_rayjob_create_fails_the_job_with_the_apiservers_message(cluster: Cluster,
                                                                            operator: Operator) -> None:
    cluster.api.fail_next("POST", r"/rayjobs$", 422, "Invalid",
                          'RayJob.ray.io "viggo-train" is invalid: spec.entrypoint: Required value', times=100)
    create(cluster)
    cluster.wait_phase("Failed")
    ready = cluster.condition("Ready")
    assert ready["reason"] == "ApiRejected" and "spec.entrypoint: Required value" in ready["message"]
    posts = [r for r in cluster.api.requests if r[1] == "POST" and r[2].endswith("/rayjobs")]
    assert len(posts) <= 3


def test_a_403_on_configmap_create_fails_the_job_instead_of_retrying(cluster: Cluster, operator: Operator) -> None:
    cluster.api.fail_next("POST", r"/configmaps$", 403, "Forbidden",
                          'configmaps is forbidden: User "system:serviceaccount:kubetune:operator" cannot create',
                          times=100)
    create(cluster)
    cluster.wait_phase("Failed")
    assert cluster.condition("Ready")["reason"] == "ApiRejected"
    posts = [r for r in cluster.api.requests if r[1] == "POST" and r[2].endswith("/configmaps")]
    assert len(posts) <= 3


def test_transient_errors_are_retried_until_the_job_launches(cluster: Cluster, operator: Operator) -> None:
    cluster.api.fail_next("POST", r"/rayjobs$", 500, "InternalError", "etcdserver: request timed out", times=2)
    cluster.api.fail_next("POST", r"/configmaps$", 429, "TooManyRequests", "slow down", times=1, retry_after=1)
    create(cluster)
    cluster.wait_rayjob()
    assert cluster.wait_phase("Pending")["conditions"][0]["reason"] == "Initializing"


def test_a_plan_over_the_configmap_limit_fails_before_the_call_naming_the_field(cluster: Cluster,
                                                                                operator: Operator) -> None:
    # A valid EvalJob of ~600 KB whose resolved plan is ~1.2 MB: ten candidates with long instructions.
    huge = {"name": "tuned", "model": {"uri": "s3://bucket/runs/viggo/best"},
            "prompt": {"template": "<START_Q>{ref}<END_Q>", "instruction": "x" * 60_000}}
    candidates = [{**huge, "name": f"c{i}"} for i in range(10)]
    create_evaljob(cluster, spec__candidates=candidates, spec__gate=None)
    status = wait_phase(cluster, "Failed", "ApiRejected")
    message = status["conditions"][0]["message"]
    assert "over the API's limit" in message and "spec.candidates" in message
    assert [r for r in cluster.api.requests if r[1] == "POST" and r[2].endswith("/configmaps")] == []


# -- a child deleted behind the operator's back ------------------------------------------------------


def test_a_rayjob_deleted_mid_run_is_recreated_while_retries_are_left(cluster: Cluster, operator: Operator) -> None:
    create(cluster, spec__backoffLimit=2)
    first = cluster.wait_rayjob()
    run_to(cluster, RUNNING)
    cluster.wait_phase("Running")
    cluster.kube.delete(kube.rayjob_ref("default", "viggo-train"))
    again = eventually(lambda: (rj := cluster.rayjob()) and rj["metadata"]["uid"] != first["metadata"]["uid"] and rj,
                       what="the RayJob re-created")
    assert again["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["ownerReferences"][0]["uid"]
    eventually(lambda: cluster.status().get("retries") == 1, what="the retry counted")
    assert "ChildRecreated" in reasons(cluster)
    run_to(cluster, RUNNING, SUCCEEDED)
    cluster.wait_phase("Succeeded")


def test_a_rayjob_deleted_with_no_retries_left_fails_the_job(cluster: Cluster, operator: Operator) -> None:
    create(cluster)  # backoffLimit 0
    cluster.wait_rayjob()
    run_to(cluster, RUNNING)
    cluster.wait_phase("Running")
    cluster.kube.delete(kube.rayjob_ref("default", "viggo-train"))
    cluster.wait_phase("Failed")
    ready = cluster.condition("Ready")
    assert ready["reason"] == "RayJobDeleted" and "backoffLimit (0)" in ready["message"]
    assert cluster.list("ray.io/v1", "RayJob") == []


def test_a_rayservice_deleted_during_the_evaluation_fails_the_evaljob_without_retries(
        cluster: Cluster, operator: Operator) -> None:
    create_evaljob(cluster)  # backoffLimit 0
    serve_all(cluster)
    cluster.report_rayjob(EVAL_RAYJOB, **RUNNING)
    wait_phase(cluster, "Evaluating")
    cluster.kube.delete(kube.rayservice_ref("default", SERVICES[0]))
    status = wait_phase(cluster, "Failed", "ServingDeleted")
    assert "backoffLimit (0)" in status["conditions"][0]["message"]


def test_an_evaluation_rayjob_deleted_mid_run_is_recreated_while_retries_are_left(
        cluster: Cluster, operator: Operator) -> None:
    create_evaljob(cluster, spec__backoffLimit=1)
    first = serve_all(cluster)
    cluster.report_rayjob(EVAL_RAYJOB, **RUNNING)
    eventually(lambda: evaljob_status(cluster).get("rayJobStatus"), what="the RayJob's status recorded")
    cluster.kube.delete(kube.rayjob_ref("default", EVAL_RAYJOB))
    again = eventually(lambda: (rj := cluster.rayjob(EVAL_RAYJOB)) and rj["metadata"]["uid"] != first["metadata"][
        "uid"] and rj, what="the evaluation RayJob re-created")
    assert again and evaljob_status(cluster)["retries"] == 1
    assert "ChildRecreated" in {e["reason"] for e in cluster.events("viggo-eval")}
    evaluate(cluster, {"tuned": {"exactMatch": 0.86}, "base": {"exactMatch": 0.41}})
    wait_phase(cluster, "Succeeded")


def test_a_rayjob_deleted_before_kuberay_reported_is_launched_again(cluster: Cluster, operator: Operator) -> None:
    """No RayJob status yet, so no retry is counted: the timer launches again, as a restart would."""
    create(cluster)
    first = cluster.wait_rayjob()
    cluster.kube.delete(kube.rayjob_ref("default", "viggo-train"))
    again = eventually(lambda: (rj := cluster.rayjob()) and rj["metadata"]["uid"] != first["metadata"]["uid"] and rj,
                       timeout=40, what="the RayJob created again")
    assert again["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["ownerReferences"][0]["uid"]
    assert cluster.status().get("retries") is None and "ChildRecreated" not in reasons(cluster)
    run_to(cluster, RUNNING, SUCCEEDED)
    cluster.wait_phase("Succeeded")
