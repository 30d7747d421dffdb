"""The decide step of each kind's reconcile: from the job's status, the trigger and what was observed of its
own children, the one step the job needs. Pure functions: no API, no kopf."""

from __future__ import annotations

from typing import Any

import pytest

from factories import evj, ftj, rayjob
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob
from kubetune.operator import evalreconcile, reconcile
from kubetune.operator.evalreconcile import ServiceSeen
from kubetune.operator.reconcile import Observed, Step, Trigger
from kubetune.operator.status import observe_rayjob

STARTED = {"startTime": "2026-12-07T00:00:00Z", "children": {"rayJob": "viggo-train", "configMap": "viggo-train"}}


def job(phase: str | None = None, *, started: bool = True, reported: bool = True, **status: Any) -> FineTuneJob:
    """A FineTuneJob in `phase`; `started`: its children recorded; `reported`: KubeRay reported its RayJob."""
    wire: dict[str, Any] = {**(STARTED if started else {}), **status}
    if phase:
        wire["phase"] = phase
    if started and reported:
        wire["rayJobStatus"] = "Running/RUNNING"
    return ftj(status=wire)


SEEN = Observed(rayjob=rayjob(jobDeploymentStatus="Running"), rayjob_exists=True)
INDEXED = Observed(rayjob_exists=True)
MISSING = Observed(rayjob_missing=True)
NOTHING_SEEN = Observed()


@pytest.mark.parametrize("trigger", [Trigger.START, Trigger.SPEC])
def test_a_job_not_started_is_launched_on_create_resume_and_spec_change(trigger: Trigger) -> None:
    assert reconcile.decide(job(started=False), trigger, NOTHING_SEEN) is Step.LAUNCH


def test_a_job_not_started_waits_for_its_launch_on_the_timer() -> None:
    assert reconcile.decide(job(started=False), Trigger.TIMER, MISSING) is Step.NOTHING


def test_its_own_rayjob_is_followed_even_where_status_has_not_recorded_the_children() -> None:
    """A restart after the status lost its children: the RayJob is the job's own by name and uid."""
    assert reconcile.decide(job(started=False), Trigger.CHILD, SEEN) is Step.FOLLOW


def test_a_running_job_is_launched_again_after_an_operator_restart() -> None:
    assert reconcile.decide(job("Running"), Trigger.START, SEEN) is Step.LAUNCH


def test_its_own_rayjob_changing_is_followed() -> None:
    assert reconcile.decide(job("Running"), Trigger.CHILD, SEEN) is Step.FOLLOW


def test_a_rayjob_that_is_not_its_own_is_not_followed() -> None:
    assert reconcile.decide(job("Running"), Trigger.CHILD, NOTHING_SEEN) is Step.NOTHING


def test_a_suspend_change_of_a_started_job_goes_to_the_rayjob() -> None:
    seen = Observed(suspend_changed=True)
    assert reconcile.decide(job("Running"), Trigger.SPEC, seen) is Step.SUSPEND


def test_another_spec_change_of_a_started_job_does_nothing() -> None:
    assert reconcile.decide(job("Running"), Trigger.SPEC, NOTHING_SEEN) is Step.NOTHING


def test_the_timer_recreates_a_rayjob_confirmed_missing() -> None:
    assert reconcile.decide(job("Running"), Trigger.TIMER, MISSING) is Step.RECREATE


def test_the_timer_launches_again_where_the_rayjob_is_missing_before_kuberay_reported() -> None:
    """Deleted before KubeRay saw it, or the launch still failing a timer period on: no retry is counted."""
    assert reconcile.decide(job("Pending", reported=False), Trigger.TIMER, MISSING) is Step.LAUNCH


def test_the_timer_leaves_a_job_whose_rayjob_exists_but_has_not_reported() -> None:
    assert reconcile.decide(job("Running"), Trigger.TIMER, INDEXED) is Step.NOTHING


def test_the_timer_mirrors_what_the_rayjob_reports_in_case_a_status_write_was_lost() -> None:
    assert reconcile.decide(job("Running"), Trigger.TIMER, SEEN) is Step.FOLLOW


@pytest.mark.parametrize("phase", ["Succeeded", "Failed", "Cancelled"])
def test_the_timer_expires_a_finished_job_that_still_has_its_rayjob(phase: str) -> None:
    assert reconcile.decide(job(phase), Trigger.TIMER, INDEXED) is Step.EXPIRE


@pytest.mark.parametrize("phase", ["Succeeded", "Failed", "Cancelled"])
def test_nothing_moves_a_finished_job(phase: str) -> None:
    for trigger in (Trigger.SPEC, Trigger.CHILD):
        assert reconcile.decide(job(phase), trigger, SEEN) is Step.NOTHING
    assert reconcile.decide(job(phase), Trigger.TIMER, MISSING) is Step.NOTHING


def test_a_succeeded_job_gets_its_evaluation_after_a_restart() -> None:
    assert reconcile.decide(job("Succeeded"), Trigger.START, SEEN) is Step.EVALUATE


# -- a queued job (spec.queueName): Kueue owns its RayJob's spec.suspend ---------------------------


def queued(phase: str | None = None, *, suspend: bool = False, **status: Any) -> FineTuneJob:
    wire: dict[str, Any] = {**STARTED, "rayJobStatus": "Suspended", **status}
    if phase:
        wire["phase"] = phase
    return ftj(status=wire, spec__queueName="team-a", spec__suspend=suspend)


def test_suspending_a_queued_job_goes_to_its_rayjob() -> None:
    assert reconcile.decide(queued("Queued", suspend=True), Trigger.SPEC,
                            Observed(suspend_changed=True)) is Step.SUSPEND


def test_a_suspended_queued_jobs_rayjob_is_not_followed_while_it_is_deleted() -> None:
    assert reconcile.decide(queued("Suspended", suspend=True), Trigger.CHILD, SEEN) is Step.NOTHING


def test_the_timer_deletes_a_suspended_queued_jobs_rayjob_still_there() -> None:
    assert reconcile.decide(queued("Suspended", suspend=True), Trigger.TIMER, INDEXED) is Step.SUSPEND


def test_the_timer_leaves_a_suspended_queued_job_without_its_rayjob() -> None:
    assert reconcile.decide(queued("Suspended", suspend=True), Trigger.TIMER, MISSING) is Step.NOTHING
    assert reconcile.decide(queued("Suspended", suspend=True), Trigger.TIMER, NOTHING_SEEN) is Step.NOTHING


@pytest.mark.parametrize("phase", ["Queued", "Suspended"])
def test_a_queued_job_missing_its_rayjob_before_it_ran_gets_it_again_without_a_retry(phase: str) -> None:
    """Resumed after a suspension deleted it (the resume's write lost), or deleted while waiting in the queue."""
    assert reconcile.decide(queued(phase), Trigger.TIMER, MISSING) is Step.LAUNCH


def test_a_queued_job_missing_its_rayjob_while_it_ran_counts_a_retry() -> None:
    assert reconcile.decide(queued("Running", rayJobStatus="Running/RUNNING"), Trigger.TIMER, MISSING) is Step.RECREATE


# -- EvalJob ---------------------------------------------------------------------------------------

SVC = "viggo-eval-fine-tuned"


def evaljob(phase: str = "Serving", **status: Any) -> EvalJob:
    return evj(status={"phase": phase, "startTime": "2026-12-07T00:00:00Z", **status})


def service(ready: bool | None, exists: bool = True) -> ServiceSeen:
    return ServiceSeen(SVC, exists, ready, f"RayService {SVC}: ready={ready}")


def observed(*services: ServiceSeen, rayjob_status: dict[str, Any] | None = None,
             exists: bool = True, held: bool = False) -> evalreconcile.Observed:
    obs = observe_rayjob(rayjob(**rayjob_status)) if rayjob_status is not None else None
    return evalreconcile.Observed(list(services), rayjob_exists=exists and rayjob_status is not None, rayjob=obs,
                                  rayjob_held=held)


def test_a_failed_rayservice_fails_the_evaljob() -> None:
    step, message = evalreconcile.decide(evaljob(), observed(service(False)))
    assert step is evalreconcile.Step.SERVING_FAILED and SVC in message


def test_rayservices_not_ready_are_waited_for() -> None:
    step, message = evalreconcile.decide(evaljob(), observed(service(None)))
    assert step is evalreconcile.Step.WAIT_FOR_SERVICES and message.startswith("0/1 RayServices ready.")


def test_a_rayservice_missing_while_serving_is_created() -> None:
    step, _ = evalreconcile.decide(evaljob("Serving"), observed(service(None, exists=False)))
    assert step is evalreconcile.Step.CREATE_SERVICES


def test_a_rayservice_missing_while_evaluating_was_deleted() -> None:
    step, _ = evalreconcile.decide(evaljob("Evaluating"), observed(service(None, exists=False)))
    assert step is evalreconcile.Step.SERVICE_DELETED


def test_once_serving_the_evaluation_is_created() -> None:
    step, _ = evalreconcile.decide(evaljob(), observed(service(True)))
    assert step is evalreconcile.Step.CREATE_EVALUATION


def test_an_evaluation_rayjob_gone_after_kuberay_reported_was_deleted() -> None:
    job_ = evaljob("Evaluating", rayJobStatus="Running/RUNNING")
    step, _ = evalreconcile.decide(job_, observed(service(True)))
    assert step is evalreconcile.Step.EVALUATION_DELETED


@pytest.mark.parametrize("rayjob_status, expected", [
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, evalreconcile.Step.FINISH),
    ({"jobDeploymentStatus": "Failed", "reason": "AppFailed"}, evalreconcile.Step.EVALUATION_FAILED),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, evalreconcile.Step.EVALUATING),
    ({"jobDeploymentStatus": "Initializing"}, evalreconcile.Step.EVALUATING),
])
def test_the_evaluation_rayjob_decides(rayjob_status: dict[str, Any], expected: evalreconcile.Step) -> None:
    step, _ = evalreconcile.decide(evaljob("Evaluating"), observed(service(True), rayjob_status=rayjob_status))
    assert step is expected


def queued_evaljob(phase: str, **status: Any) -> EvalJob:
    return evj(status={"phase": phase, "startTime": "2026-12-07T00:00:00Z", **status}, spec__queueName="team-a")


def test_an_evaluation_rayjob_kueue_holds_is_queued() -> None:
    step, message = evalreconcile.decide(queued_evaljob("Queued"), observed(
        service(True), rayjob_status={"jobDeploymentStatus": "Suspended"}, held=True))
    assert step is evalreconcile.Step.QUEUED and "team-a" in message


def test_an_evaluation_rayjob_held_again_after_it_ran_was_preempted() -> None:
    step, _ = evalreconcile.decide(queued_evaljob("Evaluating", rayJobStatus="Running/RUNNING"), observed(
        service(True), rayjob_status={"jobDeploymentStatus": "Suspending"}, held=True))
    assert step is evalreconcile.Step.PREEMPTED


def test_an_admitted_evaluation_rayjob_is_evaluating() -> None:
    step, message = evalreconcile.decide(queued_evaljob("Queued", rayJobStatus="Suspended"), observed(
        service(True), rayjob_status={"jobDeploymentStatus": "Initializing"}, held=False))
    assert step is evalreconcile.Step.EVALUATING and message.startswith("Kueue admitted")


def test_an_evaluation_rayjob_without_a_queue_is_never_queued() -> None:
    """Without spec.queueName a suspended RayJob is not Kueue's: the EvalJob stays Evaluating."""
    step, _ = evalreconcile.decide(evaljob("Evaluating"), observed(
        service(True), rayjob_status={"jobDeploymentStatus": "Suspended"}, held=True))
    assert step is evalreconcile.Step.EVALUATING
