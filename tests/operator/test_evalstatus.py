"""EvalJob status: every phase's conditions, the gate's condition, and what a RayService's status means."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import evaljob, finetunejob
from kubetune.api.common import TERMINAL_PHASES, Condition
from kubetune.operator.evalstatus import CONDITION_TYPES, State, conditions, observe_rayservice


def by_type(conds: list[Condition]) -> dict[str, str]:
    return {c.type: c.status for c in conds}


def rayservice(generation: int = 1, **status: Any) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": "viggo-eval-base", "namespace": "default", "generation": generation},
            "status": status}


def ready_condition(status: str, reason: str = "NonZeroServeEndpoints", message: str = "") -> dict[str, Any]:
    return {"type": "Ready", "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-22T10:00:00Z"}


# -- conditions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state, true_types, gate", [
    (State("Pending", "Initializing", ""), {"Reconciling"}, "Unknown"),
    (State("Waiting", "WaitingForModel", ""), {"Reconciling"}, "Unknown"),
    (State("Waiting", "SecretNotFound", ""), {"Reconciling"}, "Unknown"),
    (State("Serving", "CreatingServices", ""), {"Running", "Reconciling"}, "Unknown"),
    (State("Serving", "WaitingForServices", ""), {"Running", "Reconciling"}, "Unknown"),
    (State("Evaluating", "Evaluating", ""), {"Running", "Reconciling"}, "Unknown"),
    (State("Queued", "Queued", ""), {"Running", "Reconciling", "Queued"}, "Unknown"),
    (State("Queued", "Preempted", ""), {"Running", "Reconciling", "Queued"}, "Unknown"),
    (State("Succeeded", "Succeeded", "", gate="GatePassed"), {"Ready", "Succeeded", "GatePassed"}, "True"),
    (State("Succeeded", "Succeeded", "", gate="NoGate"), {"Ready", "Succeeded", "GatePassed"}, "True"),
    (State("Failed", "GateFailed", "", gate="GateFailed"), {"Failed", "Stalled"}, "False"),
    (State("Failed", "EvaluationFailed", ""), {"Failed", "Stalled"}, "Unknown"),
    (State("Failed", "ValidationFailed", ""), {"Failed", "Stalled"}, "Unknown"),
], ids=lambda v: f"{v.phase}-{v.reason}" if isinstance(v, State) else None)
def test_every_phase_sets_every_condition_type(state: State, true_types: set[str], gate: str) -> None:
    conds = conditions(state, 4, [])
    assert [c.type for c in conds] == list(CONDITION_TYPES)
    assert {t for t, s in by_type(conds).items() if s == "True"} == true_types
    assert by_type(conds)["GatePassed"] == gate
    assert all(c.observed_generation == 4 for c in conds)


def test_ready_reason_is_the_one_word_state() -> None:
    conds = {c.type: c for c in conditions(State("Serving", "WaitingForServices", "1/2 ready"), 1, [])}
    assert (conds["Ready"].reason, conds["Ready"].message) == ("WaitingForServices", "1/2 ready")


@pytest.mark.parametrize("gate, status", [("GatePassed", "True"), ("NoGate", "True"), ("GateFailed", "False")])
def test_gate_condition_carries_its_own_reason_and_the_verdict(gate: str, status: str) -> None:
    phase = "Failed" if gate == "GateFailed" else "Succeeded"
    state = State(phase, gate if gate == "GateFailed" else "Succeeded", "summary", gate=gate,  # type: ignore[arg-type]
                  gate_message="fine-tuned exactMatch >= 0.8: 0.62 vs 0.8")
    cond = next(c for c in conditions(state, 1, []) if c.type == "GatePassed")
    assert (cond.status, cond.reason) == (status, gate)
    assert cond.message == "fine-tuned exactMatch >= 0.8: 0.62 vs 0.8"


def test_gate_is_not_judged_before_results() -> None:
    cond = next(c for c in conditions(State("Evaluating", "Evaluating", ""), 1, []) if c.type == "GatePassed")
    assert (cond.status, cond.reason) == ("Unknown", "NotJudged")


def test_transition_time_moves_only_when_status_flips() -> None:
    first = conditions(State("Serving", "CreatingServices", ""), 1, [], now="2026-01-01T00:00:00Z")
    second = conditions(State("Evaluating", "Evaluating", ""), 1, first, now="2026-01-01T01:00:00Z")
    third = conditions(State("Succeeded", "Succeeded", "", gate="GatePassed"), 1, second,
                       now="2026-01-01T02:00:00Z")
    assert {c.type: c.last_transition_time for c in second}["Running"] == "2026-01-01T00:00:00Z"
    after = {c.type: c.last_transition_time for c in third}
    assert after["Running"] == after["Succeeded"] == after["GatePassed"] == "2026-01-01T02:00:00Z"
    assert after["Failed"] == "2026-01-01T00:00:00Z"


def test_a_missing_secret_is_a_warning_but_not_a_failure() -> None:
    state = State("Waiting", "SecretNotFound", 'Secret "openai" not found')
    assert state.event_type == "Warning" and not state.terminal
    assert State("Waiting", "WaitingForModel", "").event_type == "Normal"


# -- RayService status -----------------------------------------------------------------------------


def test_ready_condition_true_means_serving() -> None:
    assert observe_rayservice(rayservice(observedGeneration=1, conditions=[ready_condition("True")]))[0] is True


def test_ready_condition_false_means_not_yet_and_says_why() -> None:
    ready, message = observe_rayservice(rayservice(conditions=[
        ready_condition("False", "ZeroServeEndpoints", "no serve endpoint is ready")]))
    assert ready is None and "no serve endpoint is ready" in message


def test_older_kuberay_without_conditions_is_read_from_service_status() -> None:
    assert observe_rayservice(rayservice(serviceStatus="Running"))[0] is True
    assert observe_rayservice(rayservice(serviceStatus="WaitForServeDeploymentReady"))[0] is None


def test_a_fresh_rayservice_is_not_ready() -> None:
    assert observe_rayservice(rayservice())[0] is None


def test_status_of_an_older_generation_is_not_trusted() -> None:
    obj = rayservice(generation=2, observedGeneration=1, conditions=[ready_condition("True")])
    assert observe_rayservice(obj)[0] is None


def test_application_that_failed_to_deploy_fails_serving() -> None:
    ready, message = observe_rayservice(rayservice(pendingServiceStatus={"applicationStatuses": {
        "base": {"status": "DEPLOY_FAILED", "message": "model s3://x not found"}}}))
    assert ready is False
    assert "base" in message and "model s3://x not found" in message


def test_one_terminal_phase_set_ends_jobs_of_both_kinds() -> None:
    """api.common.TERMINAL_PHASES is the one definition: Succeeded, Failed and (FineTuneJobs only) Cancelled."""
    ftj_phases, evj_phases = {p.value for p in finetunejob.Phase}, {p.value for p in evaljob.Phase}
    assert TERMINAL_PHASES & ftj_phases == {"Succeeded", "Failed", "Cancelled"}
    assert TERMINAL_PHASES & evj_phases == {"Succeeded", "Failed"}
    assert TERMINAL_PHASES <= ftj_phases | evj_phases
    assert [p for p in evaljob.Phase if State(p, "r", "m").terminal] == ["Succeeded", "Failed"]
