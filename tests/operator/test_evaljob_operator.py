"""EvalJobs end to end: the real `python -m kubetune.operator` against the fake API over HTTP.

The test creates EvalJobs (and FineTuneJobs, Secrets) as a user would, plays KubeRay by patching
RayService and RayJob status, and plays the evaluator by patching the EvalJob's status with results
through `kubetune.contract.progress.StatusReporter`, exactly as `kubetune.serving.evaluate` does.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from factories import evj_manifest, ftj_manifest
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import BestCheckpoint, EpochResult
from kubetune.contract.evalplan import judge_gate
from kubetune.contract.progress import StatusReporter
from kubetune.operator import kube
from support.harness import Cluster, Operator, eventually

NAME = "viggo-eval"
EVAL_RAYJOB = "viggo-eval-eval"
BEST = "s3://bucket/runs/viggo/epoch-3"

# Candidates that need no FineTuneJob: a checkpoint directory and a Hub model.
TUNED = {"name": "tuned", "model": {"uri": "s3://bucket/runs/viggo/best"},
         "prompt": {"template": "<START_Q>{ref}<END_Q><START_A>"}, "generation": {"stop": ["<END_A>"]}}
BASE = {"name": "base", "model": {"name": "meta-llama/Llama-2-7b-hf"},
        "prompt": {"template": "Sentence: {ref}\nMeaning representation:"}, "generation": {"stop": ["\n"]}}
GPT4 = {"name": "gpt-4", "model": {"endpoint": {"url": "https://api.openai.com/v1", "model": "gpt-4",
                                                "apiKeySecretRef": {"name": "openai", "key": "api-key"}}},
        "prompt": {"template": "Sentence: {ref}\nMeaning representation:", "chat": True}}
GATE = {"candidate": "tuned", "metric": "exactMatch", "minimum": 0.8, "beats": [{"candidate": "base", "margin": 0.1}]}
SERVICES = ["viggo-eval-tuned", "viggo-eval-base"]

GOOD = {"tuned": {"exactMatch": 0.86, "functionAccuracy": 0.99}, "base": {"exactMatch": 0.41}}
BAD = {"tuned": {"exactMatch": 0.62, "functionAccuracy": 0.97}, "base": {"exactMatch": 0.41}}
RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": "2026-11-22T11:00:00Z"}


# -- the user --------------------------------------------------------------------------------------


def create(cluster: Cluster, name: str = NAME, **paths: Any) -> dict[str, Any]:
    """Create an EvalJob; by default TUNED vs BASE with GATE (`spec__x=v` overrides spec.x)."""
    paths = {"spec__candidates": [TUNED, BASE], "spec__gate": GATE, **paths}
    return cluster.kube.create(evj_manifest(name, **{k: v for k, v in paths.items() if v is not None}))


def evaljob(cluster: Cluster, name: str = NAME) -> dict[str, Any]:
    return cluster.kube.get(kube.evj_ref("default", name))


def status(cluster: Cluster, name: str = NAME) -> dict[str, Any]:
    return dict(evaljob(cluster, name).get("status") or {})


def condition(cluster: Cluster, type_: str, name: str = NAME) -> dict[str, Any]:
    return next(c for c in status(cluster, name).get("conditions", []) if c["type"] == type_)


def wait_phase(cluster: Cluster, phase: str, reason: str | None = None, name: str = NAME) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        st = status(cluster, name)
        ready = next((c for c in st.get("conditions", []) if c["type"] == "Ready"), {})
        return st if st.get("phase") == phase and reason in (None, ready.get("reason")) else None

    result: dict[str, Any] = eventually(reached, what=f"EvalJob {name} {phase}/{reason}")
    return result


def reasons(cluster: Cluster, name: str = NAME) -> list[str]:
    return [e["reason"] for e in cluster.events(name)]


# -- KubeRay ---------------------------------------------------------------------------------------


def rayservices(cluster: Cluster) -> list[str]:
    return sorted(s["metadata"]["name"] for s in cluster.list("ray.io/v1", "RayService"))


def rayservice(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.kube.get(kube.rayservice_ref("default", name))


def wait_rayservices(cluster: Cluster, names: list[str] = SERVICES) -> list[dict[str, Any]]:
    eventually(lambda: rayservices(cluster) == sorted(names), what=f"RayServices {names}")
    return [rayservice(cluster, n) for n in names]


def report_ready(cluster: Cluster, name: str) -> None:
    generation = rayservice(cluster, name)["metadata"]["generation"]
    cluster.kube.patch_status(kube.rayservice_ref("default", name), {
        "observedGeneration": generation, "serviceStatus": "Running", "numServeEndpoints": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "",
                        "lastTransitionTime": "2026-11-22T10:00:00Z"}]})


def serve_all(cluster: Cluster, names: list[str] = SERVICES) -> dict[str, Any]:
    """KubeRay brings every RayService up; the evaluation RayJob follows."""
    wait_rayservices(cluster, names)
    for name in names:
        report_ready(cluster, name)
    return cluster.wait_rayjob(EVAL_RAYJOB)


# -- the evaluator ---------------------------------------------------------------------------------


def report_results(cluster: Cluster, metrics: dict[str, dict[str, float]], name: str = NAME) -> None:
    """What `kubetune.serving.evaluate` writes into status: per-candidate results, the gate, the report."""
    spec = EvalJob.from_body(evaljob(cluster, name)).spec
    gate = judge_gate(spec, metrics)
    reporter = StatusReporter(server=cluster.api.url, namespace="default", name=name, plural="evaljobs")
    assert reporter.patch({
        "candidates": [{"name": c, "metrics": m, "examples": 500} for c, m in metrics.items()],
        "gate": gate.to_wire() if gate else None,
        "report": {"uri": "s3://bucket/viggo/eval/report.html"},
    })


def evaluate(cluster: Cluster, metrics: dict[str, dict[str, float]] | None, name: str = NAME) -> None:
    cluster.report_rayjob(EVAL_RAYJOB, **RUNNING)
    if metrics is not None:
        report_results(cluster, metrics, name)
    cluster.report_rayjob(EVAL_RAYJOB, **SUCCEEDED)


def succeed_finetunejob(cluster: Cluster, name: str = "viggo", **paths: Any) -> None:
    """A FineTuneJob that trains (KubeRay and the driver played) and succeeds with checkpoint BEST."""
    cluster.create_ftj(ftj_manifest(name, **paths)["spec"], name)
    cluster.wait_rayjob(f"{name}-train")
    StatusReporter(server=cluster.api.url, namespace="default", name=name).epoch_done(
        [EpochResult(epoch=3, train_loss=0.3, val_loss=0.2, val_perplexity=1.22)],
        BestCheckpoint(uri=BEST, epoch=3, val_perplexity=1.22))
    cluster.report_rayjob(f"{name}-train", **SUCCEEDED)
    cluster.wait_phase("Succeeded", name)


# -- waiting for the model -------------------------------------------------------------------------


def test_waits_for_the_finetunejob_then_serves_its_best_checkpoint(cluster: Cluster, operator: Operator) -> None:
    create(cluster, spec__candidates=None, spec__gate=None)  # the factory's fineTuneJobRef to `viggo`
    wait_phase(cluster, "Waiting", "WaitingForModel")
    assert "viggo" in condition(cluster, "Ready")["message"]
    assert rayservices(cluster) == []
    succeed_finetunejob(cluster)
    fine_tuned, _base = wait_rayservices(cluster, ["viggo-eval-fine-tuned", "viggo-eval-base"])
    assert f"modelUri: {BEST}" in fine_tuned["spec"]["serveConfigV2"]
    st = wait_phase(cluster, "Serving")
    assert st["children"]["rayServices"] == ["viggo-eval-fine-tuned", "viggo-eval-base"]
    assert st["startTime"] and st["candidateCount"] == 2


def test_finetunejob_that_failed_makes_the_model_unavailable(cluster: Cluster, operator: Operator) -> None:
    cluster.create_ftj(ftj_manifest("viggo")["spec"], "viggo")
    cluster.wait_rayjob("viggo-train")
    cluster.report_rayjob("viggo-train", jobDeploymentStatus="Failed", reason="AppFailed")
    cluster.wait_phase("Failed", "viggo")
    create(cluster, spec__candidates=None, spec__gate=None)
    wait_phase(cluster, "Failed", "ModelUnavailable")
    assert "spec.candidates[0].model.fineTuneJobRef" in condition(cluster, "Failed")["message"]


# -- serving and evaluating ------------------------------------------------------------------------


def test_children_are_recorded_owned_and_the_plan_points_at_the_services(cluster: Cluster,
                                                                        operator: Operator) -> None:
    owner = create(cluster)
    services = wait_rayservices(cluster)
    st = wait_phase(cluster, "Serving", "WaitingForServices")
    assert st["children"] == {"rayServices": SERVICES, "rayJob": EVAL_RAYJOB, "configMap": "viggo-eval-eval-config",
                              "serviceAccount": "viggo-eval-evaluator"}
    config = cluster.kube.get(kube.Ref("v1", "ConfigMap", "default", "viggo-eval-eval-config"))
    plan = json.loads(config["data"]["plan.json"])
    assert [c["baseUrl"] for c in plan["candidates"]] == [
        "http://viggo-eval-tuned-serve-svc.default.svc:8000/v1", "http://viggo-eval-base-serve-svc.default.svc:8000/v1"]
    for child in [*services, config]:
        assert [r["uid"] for r in child["metadata"]["ownerReferences"]] == [owner["metadata"]["uid"]]
    assert cluster.list("ray.io/v1", "RayJob") == []  # not before every RayService is ready


def test_evaluation_starts_only_when_every_rayservice_is_ready(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    wait_rayservices(cluster)
    report_ready(cluster, "viggo-eval-tuned")
    eventually(lambda: condition(cluster, "Ready")["message"].startswith("1/2 RayServices ready"),
               what="one of two RayServices ready")
    assert cluster.list("ray.io/v1", "RayJob") == []
    report_ready(cluster, "viggo-eval-base")
    rayjob = cluster.wait_rayjob(EVAL_RAYJOB)
    assert rayjob["spec"]["entrypoint"] == "python -m kubetune.serving.evaluate --plan /etc/kubetune/plan.json"
    wait_phase(cluster, "Evaluating")


def test_passed_gate_succeeds_and_tears_serving_down(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    serve_all(cluster)
    evaluate(cluster, GOOD)
    st = wait_phase(cluster, "Succeeded")
    assert st["completionTime"] == "2026-11-22T11:00:00Z"
    assert st["candidates"][0]["metrics"]["exactMatch"] == 0.86
    gate = condition(cluster, "GatePassed")
    assert (gate["status"], gate["reason"]) == ("True", "GatePassed")
    assert condition(cluster, "Ready")["status"] == "True"
    eventually(lambda: rayservices(cluster) == [], what="RayServices deleted")
    eventually(lambda: "ServicesDeleted" in reasons(cluster), what="ServicesDeleted event")


def test_no_gate_succeeds_with_reason_no_gate(cluster: Cluster, operator: Operator) -> None:
    create(cluster, spec__gate=None)
    serve_all(cluster)
    evaluate(cluster, BAD)
    wait_phase(cluster, "Succeeded")
    gate = condition(cluster, "GatePassed")
    assert (gate["status"], gate["reason"]) == ("True", "NoGate")


def test_gate_not_met_fails_with_reason_gate_failed(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    serve_all(cluster)
    evaluate(cluster, BAD)
    st = wait_phase(cluster, "Failed", "GateFailed")
    failed, stalled = condition(cluster, "Failed"), condition(cluster, "Stalled")
    # What Argo CD / kstatus show as Degraded: Failed+Stalled True, the gate's own words as the message.
    assert (failed["status"], stalled["status"]) == ("True", "True")
    assert failed["message"] == st["gate"]["message"]
    assert "tuned exactMatch >= 0.8: 0.62 vs 0.8" in failed["message"]
    assert condition(cluster, "GatePassed")["status"] == "False"
    eventually(lambda: rayservices(cluster) == [], what="RayServices deleted")


def test_keep_serving_leaves_the_rayservices_up(cluster: Cluster, operator: Operator) -> None:
    create(cluster, spec__keepServing=True)
    serve_all(cluster)
    evaluate(cluster, GOOD)
    wait_phase(cluster, "Succeeded")
    eventually(lambda: "Succeeded" in reasons(cluster), what="the Succeeded event")
    operator.stop()  # whatever it was going to do after the verdict, it has done
    assert rayservices(cluster) == sorted(SERVICES)
    assert [r for r in cluster.api.requests if r[1] == "DELETE" and "/rayservices/" in r[2]] == []


def test_evaluation_without_results_fails(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    serve_all(cluster)
    evaluate(cluster, None)
    wait_phase(cluster, "Failed", "EvaluationFailed")
    assert "no results" in condition(cluster, "Failed")["message"]
    assert condition(cluster, "GatePassed")["status"] == "Unknown"


def test_failed_evaluation_rayjob_fails_with_its_message(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    serve_all(cluster)
    cluster.report_rayjob(EVAL_RAYJOB, jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed",
                          message="dataset s3://bucket/viggo/test.jsonl not found")
    wait_phase(cluster, "Failed", "EvaluationFailed")
    assert "dataset s3://bucket/viggo/test.jsonl not found" in condition(cluster, "Failed")["message"]
    eventually(lambda: rayservices(cluster) == [], what="RayServices deleted")


def test_rayservice_that_cannot_deploy_fails_serving(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    wait_rayservices(cluster)
    cluster.kube.patch_status(kube.rayservice_ref("default", "viggo-eval-base"), {"pendingServiceStatus": {
        "applicationStatuses": {"base": {"status": "DEPLOY_FAILED", "message": "CUDA out of memory"}}}})
    wait_phase(cluster, "Failed", "ServingFailed")
    assert "CUDA out of memory" in condition(cluster, "Failed")["message"]


def test_deadline_fails_an_evaljob_whose_services_never_come_up(cluster: Cluster, operator: Operator) -> None:
    create(cluster, spec__activeDeadlineSeconds=1)  # KubeRay (the test) never reports them ready
    wait_phase(cluster, "Failed", "DeadlineExceeded")
    assert "activeDeadlineSeconds (1s)" in condition(cluster, "Failed")["message"]
    eventually(lambda: rayservices(cluster) == [], what="no RayService left")


# -- secrets ---------------------------------------------------------------------------------------


def test_missing_api_key_secret_waits_naming_the_field_then_proceeds(cluster: Cluster,
                                                                     operator: Operator) -> None:
    create(cluster, spec__candidates=[TUNED, GPT4], spec__gate=None)
    wait_phase(cluster, "Waiting", "SecretNotFound")
    message = condition(cluster, "Ready")["message"]
    assert message == 'spec.candidates[1].model.endpoint.apiKeySecretRef: Secret "openai" not found'
    eventually(lambda: "SecretNotFound" in reasons(cluster), what="a SecretNotFound event")
    assert next(e for e in cluster.events(NAME) if e["reason"] == "SecretNotFound")["type"] == "Warning"
    assert rayservices(cluster) == []
    cluster.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "openai", "namespace": "default"},
                         "stringData": {"api-key": "sk-test"}})
    wait_rayservices(cluster, ["viggo-eval-tuned"])
    report_ready(cluster, "viggo-eval-tuned")
    env = cluster.wait_rayjob(EVAL_RAYJOB)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["env"]
    assert {"name": "KUBETUNE_API_KEY_GPT_4",
            "valueFrom": {"secretKeyRef": {"name": "openai", "key": "api-key", "optional": True}}} in env


@pytest.fixture
def impatient_operator(cluster: Cluster, tmp_path: Any) -> Any:
    """An operator that gives a missing Secret no grace period."""
    op = Operator(cluster.kubeconfig, tmp_path / "operator.log", KUBETUNE_SECRET_WAIT_SECONDS="0").start()
    try:
        yield op
    finally:
        op.end()


def test_missing_api_key_secret_fails_naming_the_field_once_the_grace_period_is_over(
        cluster: Cluster, impatient_operator: Operator) -> None:
    create(cluster, spec__candidates=[TUNED, GPT4], spec__gate=None)
    wait_phase(cluster, "Failed", "SecretNotFound")
    message = condition(cluster, "Failed")["message"]
    assert message.startswith('spec.candidates[1].model.endpoint.apiKeySecretRef: Secret "openai" not found')
    assert condition(cluster, "Stalled")["status"] == "True"
    assert rayservices(cluster) == [] and cluster.list("ray.io/v1", "RayJob") == []


def test_the_evaluators_own_error_is_the_failed_conditions_message(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    serve_all(cluster)
    cluster.report_rayjob(EVAL_RAYJOB, **RUNNING)
    problem = "spec.candidates[1].model.endpoint.apiKeySecretRef: no API key for candidate gpt-4"
    assert StatusReporter(server=cluster.api.url, namespace="default", name=NAME, plural="evaljobs").patch(
        {"evaluationError": problem})
    cluster.report_rayjob(EVAL_RAYJOB, jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed",
                          message="Job entrypoint command failed with exit code 2")
    wait_phase(cluster, "Failed", "EvaluationFailed")
    assert problem in condition(cluster, "Failed")["message"]


# -- invalid EvalJobs ------------------------------------------------------------------------------


@pytest.mark.no_admission
@pytest.mark.parametrize("paths, field", [
    ({"spec__scorer__name": "rouge"}, "spec.scorer.name"),
    ({"spec__candidates": []}, "spec.candidates"),
], ids=["unknown-scorer", "no-candidates"])
def test_invalid_evaljob_fails_with_validation_failed_naming_the_field(
        cluster: Cluster, operator: Operator, paths: dict[str, Any], field: str) -> None:
    cluster.kube.create(evj_manifest(NAME, **paths))
    wait_phase(cluster, "Failed", "ValidationFailed")
    assert condition(cluster, "Failed")["message"].startswith(field)
    assert rayservices(cluster) == []


# -- FineTuneJob.spec.evaluation -------------------------------------------------------------------


EVALUATION = {"dataset": {"uri": "s3://bucket/viggo/test.jsonl", "reference": "{mr}"}, "scorer": {"name": "viggo"},
              "baselinePrompt": {"template": "Sentence: {ref}\nMeaning representation:", "fewShot": {"k": 3}}}


def test_finetunejob_with_evaluation_creates_an_owned_evaljob_on_success(cluster: Cluster,
                                                                         operator: Operator) -> None:
    succeed_finetunejob(cluster, spec__evaluation=EVALUATION)
    eval_job = eventually(lambda: evaljob(cluster, "viggo-eval"), what="EvalJob viggo-eval")
    owner = cluster.ftj("viggo")
    assert [r["uid"] for r in eval_job["metadata"]["ownerReferences"]] == [owner["metadata"]["uid"]]
    assert [c["name"] for c in eval_job["spec"]["candidates"]] == ["fine-tuned", "base-few-shot"]
    assert eval_job["spec"]["candidates"][1]["model"] == {"name": "meta-llama/Llama-2-7b-hf"}
    assert owner["status"]["children"]["evalJob"] == "viggo-eval"
    fine_tuned, _ = wait_rayservices(cluster, ["viggo-eval-fine-tuned", "viggo-eval-base-few-shot"])
    assert f"modelUri: {BEST}" in fine_tuned["spec"]["serveConfigV2"]


# -- the operator's manners ------------------------------------------------------------------------


def test_the_operator_never_writes_an_evaljobs_spec(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    serve_all(cluster)
    evaluate(cluster, GOOD)
    wait_phase(cluster, "Succeeded")
    assert evaljob(cluster)["metadata"]["generation"] == 1


def test_restart_while_serving_creates_nothing_twice(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    first = {s["metadata"]["name"]: s["metadata"]["uid"] for s in wait_rayservices(cluster)}
    wait_phase(cluster, "Serving", "WaitingForServices")
    operator.kill()
    for name in SERVICES:
        report_ready(cluster, name)  # while the operator is down
    operator.start()
    cluster.wait_rayjob(EVAL_RAYJOB)
    assert {s["metadata"]["name"]: s["metadata"]["uid"] for s in cluster.list("ray.io/v1", "RayService")} == first
    creates = [r for r in cluster.api.requests if r[1] == "POST" and r[2].endswith("/rayservices") and r[4] == 201]
    assert len(creates) == 2


def test_metrics_count_evaljobs_by_phase(cluster: Cluster, operator: Operator) -> None:
    create(cluster)
    serve_all(cluster)
    evaluate(cluster, BAD)
    wait_phase(cluster, "Failed")

    def scraped() -> str | None:
        text = operator.metrics()
        return text if 'kubetune_evaljobs{phase="Failed"} 1.0' in text else None

    text = eventually(scraped, what="metrics to show the failed EvalJob")
    assert 'kubetune_reconcile_duration_seconds_count{handler="follow-rayservice"}' in text


def test_ttl_after_finished_deletes_every_child_and_keeps_the_evaljob(cluster: Cluster, operator: Operator) -> None:
    """RayServices kept by spec.keepServing included; the RayJob ended (endTime) long before the TTL."""
    uid = create(cluster, spec__keepServing=True, spec__ttlSecondsAfterFinished=60)["metadata"]["uid"]
    serve_all(cluster)
    evaluate(cluster, GOOD)
    wait_phase(cluster, "Succeeded")

    def owned() -> list[str]:
        objects = [*cluster.list("v1", "ConfigMap"), *cluster.list("ray.io/v1", "RayService"),
                   *cluster.list("ray.io/v1", "RayJob")]
        return [o["metadata"]["name"] for o in objects
                if any(ref["uid"] == uid for ref in o["metadata"].get("ownerReferences") or [])]

    eventually(lambda: owned() == [], what="the EvalJob's children deleted after its TTL")
    assert status(cluster)["phase"] == "Succeeded"
    assert "ChildrenDeleted" in reasons(cluster)


def test_every_ray_cluster_of_the_evaljob_gets_its_network_policy(cluster: Cluster, operator: Operator) -> None:
    uid = create(cluster)["metadata"]["uid"]
    serve_all(cluster)
    policies = cluster.list("networking.k8s.io/v1", "NetworkPolicy")
    assert sorted(p["metadata"]["name"] for p in policies) == sorted([*SERVICES, EVAL_RAYJOB])
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == uid for p in policies)
