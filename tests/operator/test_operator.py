"""The operator end to end: the real `python -m kubetune.operator` against a fake API over HTTP.

The test creates FineTuneJobs as a user would and plays KubeRay by patching RayJob status.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from factories import ftj_manifest
from kubetune.api.finetunejob import (
    BestCheckpoint,
    EpochResult,
    PreflightSummary,
    Progress,
    SplitData,
    Truncation,
)
from kubetune.contract.progress import StatusReporter
from kubetune.operator import builders, kube
from support.harness import Cluster, Operator, eventually


def create(cluster: Cluster, name: str = "viggo", namespace: str = "default", **paths: object) -> dict:
    """Create a valid FineTuneJob as a user would; `spec__a__b=v` overrides spec.a.b."""
    return cluster.create_ftj(ftj_manifest(name, namespace, **paths)["spec"], name, namespace)


def owned_by(obj: dict, owner: dict) -> bool:
    return any(r["uid"] == owner["metadata"]["uid"] and r.get("controller")
               for r in obj["metadata"].get("ownerReferences", []))


def run_to(cluster: Cluster, *steps: dict) -> None:
    for step in steps:
        cluster.report_rayjob(**step)


RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "viggo-train-x7k2p"}
SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": "2026-11-22T10:00:00Z"}


# -- launching -------------------------------------------------------------------------------------


def test_creates_one_configmap_and_one_rayjob_owned_by_the_job(cluster: Cluster, operator: Operator) -> None:
    owner = create(cluster)
    rayjob = cluster.wait_rayjob()
    config = cluster.kube.get(kube.Ref("v1", "ConfigMap", "default", "viggo-trainer-config"))
    assert owned_by(rayjob, owner) and owned_by(config, owner)
    assert [r["metadata"]["name"] for r in cluster.list("ray.io/v1", "RayJob")] == ["viggo-train"]


def test_child_names_are_recorded_in_status(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    status = cluster.wait_phase("Pending")
    assert status["children"] == {"rayJob": "viggo-train", "configMap": "viggo-trainer-config",
                                  "serviceAccount": "viggo-trainer"}
    assert status["startTime"] and status["observedGeneration"] == 1


def test_each_job_gets_its_own_identity_that_may_patch_only_its_own_status(cluster: Cluster,
                                                                           operator: Operator) -> None:
    job = create(cluster, namespace="team-a")
    cluster.wait_rayjob(namespace="team-a")
    rbac = "rbac.authorization.k8s.io/v1"
    role = cluster.kube.get(kube.Ref(rbac, "Role", "team-a", "viggo-trainer"))
    assert role["rules"] == [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"],
                              "resourceNames": ["viggo"], "verbs": ["get", "patch"]}]
    binding = cluster.kube.get(kube.Ref(rbac, "RoleBinding", "team-a", "viggo-trainer"))
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "viggo-trainer", "namespace": "team-a"}]
    for obj in (role, binding, cluster.kube.get(kube.Ref("v1", "ServiceAccount", "team-a", "viggo-trainer"))):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    pods = cluster.rayjob(namespace="team-a")["spec"]["rayClusterSpec"]
    assert pods["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "viggo-trainer"
    assert pods["workerGroupSpecs"][0]["template"]["spec"]["serviceAccountName"] == "viggo-trainer"


def test_a_named_service_account_is_bound_to_the_jobs_role_and_none_is_created(cluster: Cluster,
                                                                               operator: Operator) -> None:
    create(cluster, spec__podTemplate={"serviceAccountName": "ml-team-s3"})
    cluster.wait_rayjob()
    binding = cluster.kube.get(kube.Ref("rbac.authorization.k8s.io/v1", "RoleBinding", "default", "viggo-trainer"))
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ml-team-s3", "namespace": "default"}]
    assert cluster.list("v1", "ServiceAccount") == []
    assert cluster.status()["children"]["serviceAccount"] == "ml-team-s3"


def test_the_ray_clusters_network_policy_is_created_before_its_rayjob(cluster: Cluster, operator: Operator) -> None:
    job = create(cluster)
    cluster.wait_rayjob()
    ref = kube.Ref("networking.k8s.io/v1", "NetworkPolicy", "default", "viggo-train")
    policy = cluster.kube.get(ref)
    assert policy["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"kubetune.io/ray-cluster": "viggo-train"}
    creates = [r.path.rsplit("/", 1)[-1] for r in cluster.api.request_log
               if r.method == "POST" and r.status == 201 and ("/networkpolicies" in r.path or "/rayjobs" in r.path)]
    assert creates == ["networkpolicies", "rayjobs"]


def test_no_network_policy_where_the_chart_disables_them(cluster: Cluster, tmp_path: Path) -> None:
    operator = Operator(cluster.kubeconfig, tmp_path / "operator.log", KUBETUNE_NETWORK_POLICY="false").start()
    try:
        create(cluster)
        cluster.wait_rayjob()
        assert cluster.list("networking.k8s.io/v1", "NetworkPolicy") == []
    finally:
        operator.end()


def test_pending_job_shows_all_conditions(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    cluster.wait_phase("Pending")
    conditions = {c["type"]: c for c in cluster.status()["conditions"]}
    assert set(conditions) == {"Ready", "Running", "Succeeded", "Failed", "Suspended", "Reconciling", "Stalled",
                               "Queued"}
    assert conditions["Reconciling"]["status"] == "True" and conditions["Ready"]["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in conditions.values())


# -- following the RayJob --------------------------------------------------------------------------


def test_rayjob_lifecycle_to_success(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    cluster.report_rayjob(jobDeploymentStatus="Initializing")
    cluster.report_rayjob(**RUNNING)
    running = cluster.wait_phase("Running")
    assert running["children"]["rayCluster"] == "viggo-train-x7k2p"
    cluster.report_rayjob(**SUCCEEDED)
    done = cluster.wait_phase("Succeeded")
    assert done["completionTime"] == "2026-11-22T10:00:00Z"
    assert cluster.condition("Succeeded")["status"] == "True"
    assert cluster.condition("Ready")["status"] == "True"
    assert cluster.condition("Running")["status"] == "False"


def test_app_failure_fails_the_job_with_the_rayjobs_reason(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    run_to(cluster, RUNNING, {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
                              "message": "CUDA out of memory on worker 3"})
    cluster.wait_phase("Failed")
    failed = cluster.condition("Failed")
    assert (failed["status"], failed["reason"]) == ("True", "AppFailed")
    assert "CUDA out of memory" in failed["message"]
    assert cluster.condition("Stalled")["status"] == "True"


def test_deadline_exceeded_fails_the_job(cluster: Cluster, operator: Operator) -> None:
    create(cluster, spec__activeDeadlineSeconds=60)
    assert cluster.wait_rayjob()["spec"]["activeDeadlineSeconds"] == 60
    cluster.report_rayjob(jobDeploymentStatus="Failed", reason="DeadlineExceeded",
                          message="The RayJob has passed the activeDeadlineSeconds.")
    cluster.wait_phase("Failed")
    assert cluster.condition("Failed")["reason"] == "DeadlineExceeded"


def test_stopped_ray_job_cancels_the_job(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    run_to(cluster, RUNNING, {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"})
    cluster.wait_phase("Cancelled")
    assert cluster.condition("Failed")["reason"] == "Cancelled"


def rayjob_events_followed(operator: Operator) -> int:
    """How many RayJob status events the operator has handled (its follow-rayjob handler calls)."""
    for line in operator.metrics().splitlines():
        if line.startswith('kubetune_reconcile_duration_seconds_count{handler="follow-rayjob"}'):
            return int(float(line.split()[-1]))
    return 0


def test_status_of_a_stale_rayjob_generation_is_ignored(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    cluster.report_rayjob(**RUNNING)
    cluster.wait_phase("Running")
    followed = eventually(lambda: rayjob_events_followed(operator), what="the Running report to be handled")
    # KubeRay's status of generation 0 while the RayJob is at generation 1: an old verdict, not this run's.
    cluster.kube.patch_status(kube.rayjob_ref("default", "viggo-train"),
                              {"observedGeneration": 0, "jobDeploymentStatus": "Complete",
                               "jobStatus": "SUCCEEDED"})
    eventually(lambda: rayjob_events_followed(operator) > followed, what="the stale status to be handled")
    status = cluster.status()
    assert status["phase"] == "Running", f"a stale RayJob status moved the job: {status}"
    assert "Succeeded" not in [e["reason"] for e in cluster.events()]
    # The current generation's status is still followed: a retry, with the job's own generation observed.
    cluster.report_rayjob(jobDeploymentStatus="Retrying", jobStatus="FAILED", failed=1, message="retry 1 of 3")

    def retrying() -> dict | None:
        ready = cluster.condition("Ready")
        return ready if ready["reason"] == "Retrying" else None

    ready = eventually(retrying, what="the Retrying status of the current RayJob generation")
    assert (ready["observedGeneration"], ready["message"]) == (1, "retry 1 of 3")
    assert (cluster.status()["phase"], cluster.status()["retries"]) == ("Running", 1)


def test_transitions_are_recorded_as_events(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    run_to(cluster, RUNNING, SUCCEEDED)
    cluster.wait_phase("Succeeded")
    def reasons() -> list[str]:
        events = sorted(cluster.events(), key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [e["reason"] for e in events]

    eventually(lambda: reasons() == ["Created", "Running", "Succeeded"], what="one Event per transition")


# -- invalid specs ---------------------------------------------------------------------------------


# The CRD rejects these at admission (tests/api); here the apiserver enforces nothing, as on a cluster
# whose CRD is stale or whose apiserver predates CEL, and the operator must catch them itself.


@pytest.mark.no_admission
def test_invalid_spec_fails_with_validation_failed_naming_the_field(cluster: Cluster,
                                                                   operator: Operator) -> None:
    create(cluster, spec__dataset__template__prompt="<START_Q>{}<END_Q>")
    cluster.wait_phase("Failed")
    failed = cluster.condition("Failed")
    assert failed["reason"] == "ValidationFailed"
    assert "spec.dataset.template.prompt" in failed["message"]
    assert cluster.list("ray.io/v1", "RayJob") == []


@pytest.mark.no_admission
def test_invalid_spec_is_not_retried(cluster: Cluster, operator: Operator) -> None:
    create(cluster, spec__dataset__template__prompt="{a b}")
    cluster.wait_phase("Failed")
    writes_after_verdict = cluster.api.writes()
    eventually(lambda: cluster.events(), what="the ValidationFailed event")
    time.sleep(1.5)  # several retry periods of the operator's test settings
    status_writes = [r for r in cluster.api.requests
                     if r[1] == "PATCH" and r[2].endswith("/finetunejobs/viggo/status")]
    assert len(status_writes) == 1
    assert cluster.api.writes() - writes_after_verdict <= 3  # kopf's own bookkeeping, then silence


@pytest.mark.no_admission
def test_fixing_an_invalid_spec_launches_the_job(cluster: Cluster, operator: Operator) -> None:
    create(cluster, spec__dataset__template__prompt="{}")
    cluster.wait_phase("Failed")
    cluster.kube.patch(kube.ftj_ref("default", "viggo"),
                       {"spec": {"dataset": {"template": {"prompt": "<START_Q>{ref}<END_Q>"}}}})
    cluster.wait_rayjob()
    assert cluster.wait_phase("Pending")["observedGeneration"] == 2


# -- suspend, delete, ttl --------------------------------------------------------------------------


def test_suspend_and_resume_are_passed_to_the_rayjob(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    cluster.report_rayjob(**RUNNING)
    cluster.wait_phase("Running")
    cluster.kube.patch(kube.ftj_ref("default", "viggo"), {"spec": {"suspend": True}})
    eventually(lambda: cluster.rayjob()["spec"]["suspend"] is True, what="RayJob suspended")
    cluster.report_rayjob(jobDeploymentStatus="Suspended")
    cluster.wait_phase("Suspended")
    assert cluster.condition("Suspended")["status"] == "True"
    cluster.kube.patch(kube.ftj_ref("default", "viggo"), {"spec": {"suspend": False}})
    eventually(lambda: cluster.rayjob()["spec"]["suspend"] is False, what="RayJob resumed")
    cluster.report_rayjob(**RUNNING)
    cluster.wait_phase("Running")


def test_created_suspended_job_creates_a_suspended_rayjob(cluster: Cluster, operator: Operator) -> None:
    create(cluster, spec__suspend=True)
    assert cluster.wait_rayjob()["spec"]["suspend"] is True


def test_deleting_the_job_removes_its_children(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    cluster.kube.delete(kube.ftj_ref("default", "viggo"))
    eventually(lambda: cluster.list("ray.io/v1", "RayJob") == [], what="RayJob garbage-collected")
    eventually(lambda: [c for c in cluster.list("v1", "ConfigMap") if c["metadata"]["name"] ==
                        "viggo-trainer-config"] == [], what="ConfigMap garbage-collected")


def test_ttl_after_finished_deletes_children_and_keeps_the_job(cluster: Cluster, operator: Operator) -> None:
    create(cluster, spec__ttlSecondsAfterFinished=0)
    cluster.wait_rayjob()
    run_to(cluster, RUNNING, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    cluster.wait_phase("Succeeded")
    eventually(lambda: cluster.list("ray.io/v1", "RayJob") == [], what="RayJob deleted after TTL")
    assert cluster.status()["phase"] == "Succeeded"
    eventually(lambda: "ChildrenDeleted" in {e["reason"] for e in cluster.events()}, what="ChildrenDeleted event")


# -- restarts --------------------------------------------------------------------------------------


def test_restart_mid_job_creates_nothing_twice_and_keeps_following(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    first = cluster.wait_rayjob()
    cluster.report_rayjob(**RUNNING)
    cluster.wait_phase("Running")
    operator.kill()
    cluster.report_rayjob(**SUCCEEDED)  # happens while the operator is down
    operator.start()
    cluster.wait_phase("Succeeded")
    (rayjob,) = cluster.list("ray.io/v1", "RayJob")
    assert rayjob["metadata"]["uid"] == first["metadata"]["uid"]
    assert len([c for c in cluster.list("v1", "ConfigMap") if c["metadata"]["name"].startswith("viggo")]) == 1


def test_crash_during_a_burst_never_duplicates_children(cluster: Cluster, operator: Operator) -> None:
    names = [f"job-{i:02d}" for i in range(20)]
    for name in names:
        create(cluster, name)
    eventually(lambda: len(cluster.list("ray.io/v1", "RayJob")) >= 3, what="some RayJobs")
    operator.kill()  # mid-burst: some jobs launched, some half-launched, some untouched
    operator.start()
    eventually(lambda: len(cluster.list("ray.io/v1", "RayJob")) == 20, timeout=30, what="20 RayJobs")
    creates = [r for r in cluster.api.requests if r[1] == "POST" and r[2].endswith("/rayjobs") and r[4] == 201]
    assert len(creates) == 20
    for name in names:
        assert cluster.wait_phase("Pending", name)["children"]["rayJob"] == f"{name}-train"


# -- two-stage fine-tuning -------------------------------------------------------------------------


def test_finetunejob_ref_waits_for_the_first_stage_then_uses_its_best_checkpoint(
        cluster: Cluster, operator: Operator) -> None:
    create(cluster, "gsm8k", spec__baseModel={"fineTuneJobRef": {"name": "mathqa"}})
    waiting = cluster.wait_phase("Waiting", "gsm8k")
    assert "mathqa" in cluster.condition("Ready", "gsm8k")["message"] and waiting
    assert cluster.condition("Ready", "gsm8k")["reason"] == "WaitingForModel"
    create(cluster, "mathqa", spec__output={"uri": "s3://bucket/runs/mathqa"})
    cluster.wait_rayjob("mathqa-train")
    reporter = StatusReporter(server=cluster.api.url, namespace="default", name="mathqa")
    reporter.epoch_done([EpochResult(epoch=1, train_loss=1.0, val_loss=0.5, val_perplexity=1.65)],
                        BestCheckpoint(uri="s3://bucket/runs/mathqa/epoch-1", epoch=1, val_perplexity=1.65))
    cluster.report_rayjob("mathqa-train", **SUCCEEDED)
    cluster.wait_rayjob("gsm8k-train")
    config = cluster.kube.get(kube.Ref("v1", "ConfigMap", "default", "gsm8k-trainer-config"))
    spec = yaml.safe_load(config["data"][builders.CONFIG_KEY])["spec"]
    assert spec["baseModel"] == {"uri": "s3://bucket/runs/mathqa/epoch-1"}
    assert cluster.status("gsm8k")["resolvedBaseModelUri"] == "s3://bucket/runs/mathqa/epoch-1"


def test_finetunejob_ref_to_a_failed_job_fails(cluster: Cluster, operator: Operator) -> None:
    create(cluster, "mathqa")
    cluster.wait_rayjob("mathqa-train")
    cluster.report_rayjob("mathqa-train", jobDeploymentStatus="Failed", reason="AppFailed")
    cluster.wait_phase("Failed", "mathqa")
    create(cluster, "gsm8k", spec__baseModel={"fineTuneJobRef": {"name": "mathqa"}})
    cluster.wait_phase("Failed", "gsm8k")
    assert cluster.condition("Failed", "gsm8k")["reason"] == "BaseModelUnavailable"


# -- live progress ---------------------------------------------------------------------------------


def test_driver_progress_reaches_status_and_survives_operator_writes(cluster: Cluster,
                                                                     operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    cluster.report_rayjob(**RUNNING)
    cluster.wait_phase("Running")
    reporter = StatusReporter(server=cluster.api.url, namespace="default", name="viggo")
    reporter.preflight(PreflightSummary(max_length=128, truncation=Truncation.DROP_TRUNCATED,
                                        train=SplitData(rows=1000, used=967, tokens=66000, dropped=33),
                                        validation=SplitData(rows=100, used=97, tokens=6700, dropped=3)))
    reporter.progress(Progress(epoch=2, total_epochs=10, step=120, total_steps=600, train_loss=0.41,
                               val_perplexity=1.93, eta_seconds=3600, learning_rate=1.5e-5, grad_norm=0.82,
                               tokens_per_second=5400.0))
    epochs = [EpochResult(epoch=1, train_loss=0.9, val_loss=0.74, val_perplexity=2.1, checkpoint_uri="s3://c/1"),
              EpochResult(epoch=2, train_loss=0.4, val_loss=0.66, val_perplexity=1.93, checkpoint_uri="s3://c/2")]
    reporter.epoch_done(epochs, BestCheckpoint(uri="s3://c/2", epoch=2, val_perplexity=1.93))
    assert reporter.failures == 0
    cluster.report_rayjob(**SUCCEEDED)
    status = cluster.wait_phase("Succeeded")
    assert status["progress"]["epoch"] == 2 and status["progress"]["valPerplexity"] == 1.93
    assert (status["progress"]["learningRate"], status["progress"]["gradNorm"],
            status["progress"]["tokensPerSecond"]) == (1.5e-5, 0.82, 5400.0)
    assert status["preflight"]["truncation"] == "dropTruncated"
    assert status["preflight"]["train"] == {"rows": 1000, "used": 967, "tokens": 66000, "truncated": 0,
                                            "dropped": 33}
    assert [e["epoch"] for e in status["epochs"]] == [1, 2]
    assert status["bestCheckpoint"] == {"uri": "s3://c/2", "epoch": 2, "valPerplexity": 1.93}


def test_unreachable_api_does_not_stop_the_driver() -> None:
    reporter = StatusReporter(server="http://127.0.0.1:9", namespace="default", name="viggo", timeout=0.5)
    reporter.progress(Progress(epoch=1))
    assert reporter.failures == 1


# -- the operator process --------------------------------------------------------------------------


def test_metrics_count_jobs_by_phase_and_reconciles(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    run_to(cluster, RUNNING, SUCCEEDED)
    cluster.wait_phase("Succeeded")
    def scraped() -> str | None:
        text = operator.metrics()
        return text if 'kubetune_finetunejobs{phase="Succeeded"} 1.0' in text else None

    text = eventually(scraped, what="metrics to show the Succeeded job")
    assert 'kubetune_reconcile_duration_seconds_count{handler="launch"}' in text
    assert 'kubetune_api_requests_total{verb="POST"}' in text


def test_watches_only_the_configured_namespaces(cluster: Cluster, tmp_path: Path) -> None:
    # Watched namespaces exist before the operator is pointed at them, as on a real cluster. (kopf's
    # namespaced mode was seen to miss a namespace created within moments of its start.)
    for namespace in ("team-a", "team-b"):
        cluster.kube.ensure({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    op = Operator(cluster.kubeconfig, tmp_path / "ns-operator.log", "--namespace", "team-a").start()
    try:
        create(cluster, namespace="team-b")
        create(cluster, namespace="team-a")
        cluster.wait_rayjob(namespace="team-a")
        assert cluster.list("ray.io/v1", "RayJob", "team-b") == []
        assert "phase" not in cluster.status(namespace="team-b")
    finally:
        op.end()


def test_the_operator_never_writes_spec(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    cluster.wait_rayjob()
    run_to(cluster, RUNNING, SUCCEEDED)
    cluster.wait_phase("Succeeded")
    assert cluster.ftj()["metadata"]["generation"] == 1
