"""Status mapping: RayJob status -> FineTuneJob phase and conditions."""

from __future__ import annotations

import pytest

from factories import rayjob
from kubetune.api.common import Condition
from kubetune.operator.status import (
    CONDITION_TYPES,
    Reason,
    State,
    conditions,
    held_by_kueue,
    kueue_view,
    observe_rayjob,
)


def by_type(conds: list[Condition]) -> dict[str, str]:
    return {c.type: c.status for c in conds}


@pytest.mark.parametrize("deployment, job_status, reason, phase, why", [
    ("", "", "", "Pending", "Initializing"),
    ("Initializing", "", "", "Pending", "Initializing"),
    ("Running", "PENDING", "", "Running", "Starting"),
    ("Running", "RUNNING", "", "Running", "Running"),
    ("Retrying", "FAILED", "", "Running", "Retrying"),
    ("Complete", "SUCCEEDED", "", "Succeeded", "Succeeded"),
    ("Complete", "STOPPED", "", "Cancelled", "Cancelled"),
    ("Failed", "FAILED", "AppFailed", "Failed", "AppFailed"),
    ("Failed", "", "SubmissionFailed", "Failed", "SubmissionFailed"),
    ("Failed", "RUNNING", "DeadlineExceeded", "Failed", "DeadlineExceeded"),
    ("ValidationFailed", "", "", "Failed", "RayJobValidationFailed"),
    ("Suspending", "", "", "Suspended", "Suspended"),
    ("Suspended", "", "", "Suspended", "Suspended"),
])
def test_rayjob_status_maps_to_phase_and_reason(deployment: str, job_status: str, reason: str,
                                                 phase: str, why: str) -> None:
    obs = observe_rayjob(rayjob(jobDeploymentStatus=deployment, jobStatus=job_status, reason=reason))
    assert obs is not None
    assert (obs.state.phase, obs.state.reason) == (phase, why)


def test_rayjob_message_is_carried_over() -> None:
    obs = observe_rayjob(rayjob(jobDeploymentStatus="Failed", reason="AppFailed", message="OOM on worker 3"))
    assert obs is not None and obs.state.message == "OOM on worker 3"


def test_status_of_an_older_rayjob_generation_is_not_trusted() -> None:
    assert observe_rayjob(rayjob(generation=2, observedGeneration=1, jobDeploymentStatus="Complete",
                                 jobStatus="SUCCEEDED")) is None


def test_status_without_observed_generation_is_trusted() -> None:
    assert observe_rayjob(rayjob(generation=2, jobDeploymentStatus="Running")) is not None


def test_retries_and_cluster_name_are_observed() -> None:
    obs = observe_rayjob(rayjob(jobDeploymentStatus="Retrying", failed=2, rayClusterName="viggo-train-abcde"))
    assert obs is not None and (obs.retries, obs.ray_cluster) == (2, "viggo-train-abcde")


@pytest.mark.parametrize("phase, true_types", [
    ("Pending", {"Reconciling"}),
    ("Waiting", {"Reconciling"}),
    ("Running", {"Running", "Reconciling"}),
    ("Queued", {"Queued", "Reconciling"}),
    ("Suspended", {"Suspended"}),
    ("Succeeded", {"Ready", "Succeeded"}),
    ("Failed", {"Failed", "Stalled"}),
    ("Cancelled", {"Failed", "Stalled"}),
])
def test_every_phase_sets_every_condition_type(phase: str, true_types: set[str]) -> None:
    conds = conditions(State(phase, "R", "m"), 3, [])  # type: ignore[arg-type]
    assert [c.type for c in conds] == list(CONDITION_TYPES)
    assert {t for t, s in by_type(conds).items() if s == "True"} == true_types
    assert all(c.observed_generation == 3 and c.reason == "R" for c in conds)


def test_transition_time_moves_only_when_status_flips() -> None:
    first = conditions(State("Running", "Running", ""), 1, [], now="2026-01-01T00:00:00Z")
    second = conditions(State("Running", "Running", "epoch 2"), 1, first, now="2026-01-01T01:00:00Z")
    third = conditions(State("Succeeded", "Succeeded", ""), 1, second, now="2026-01-01T02:00:00Z")
    times = {c.type: c.last_transition_time for c in second}
    assert times["Running"] == "2026-01-01T00:00:00Z"
    after = {c.type: c.last_transition_time for c in third}
    assert after["Running"] == after["Succeeded"] == "2026-01-01T02:00:00Z"
    assert after["Suspended"] == "2026-01-01T00:00:00Z"


def test_a_long_rayjob_message_is_one_bounded_line() -> None:
    """KubeRay may put the tail of the job's log there: text of the job author's choosing."""
    obs = observe_rayjob(rayjob(jobDeploymentStatus="Failed", reason="AppFailed", message="line\n" * 10_000))
    assert obs is not None
    assert len(obs.state.message) <= 512 and "\n" not in obs.state.message


# -- Kueue: a queued RayJob's spec.suspend is Kueue's decision -----------------------------------------


@pytest.mark.parametrize("deployment", ["", "Initializing", "Suspending", "Suspended"])
def test_a_held_rayjob_is_queued_whatever_kuberay_reports_on_the_way(deployment: str) -> None:
    """A RayJob created suspended passes through Initializing and Suspending without a Ray cluster."""
    view = kueue_view(True, deployment, "viggo-train", "team-a", admitted_before=False, message="")
    assert view is not None and (view.held, view.reason) == (True, Reason.QUEUED)
    assert "team-a" in view.message


def test_a_held_rayjob_that_had_been_admitted_was_preempted() -> None:
    view = kueue_view(True, "Suspending", "viggo-train", "team-a", admitted_before=True, message="")
    assert view is not None and (view.held, view.reason) == (True, Reason.PREEMPTED)


@pytest.mark.parametrize("deployment", ["", "Initializing", "Suspended"])
def test_an_unsuspended_rayjob_not_yet_running_is_admitted(deployment: str) -> None:
    view = kueue_view(False, deployment, "viggo-train", "team-a", admitted_before=False, message="")
    assert view is not None and (view.held, view.reason) == (False, Reason.ADMITTED)


@pytest.mark.parametrize("deployment", ["Running", "Retrying", "Complete", "Failed"])
def test_once_running_kuberays_own_state_says_more(deployment: str) -> None:
    assert kueue_view(False, deployment, "viggo-train", "team-a", admitted_before=True, message="") is None


@pytest.mark.parametrize("spec, held", [({"suspend": True}, True), ({"suspend": False}, False), ({}, False)])
def test_kueues_hold_is_the_rayjobs_spec_suspend(spec: dict[str, bool], held: bool) -> None:
    """Kueue decides a queued RayJob's spec.suspend (kubetune creates it true and never writes it again)."""
    assert held_by_kueue({**rayjob(jobDeploymentStatus="Suspended"), "spec": spec}) is held
