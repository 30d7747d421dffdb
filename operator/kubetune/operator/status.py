"""Status decisions: what a FineTuneJob's conditions say, and what a RayJob's status means for it.

Pure functions. Every phase sets the full, fixed set of condition types so that
`kubectl wait --for=condition=X` and Argo CD / kstatus health checks never see a missing condition:

| phase      | Ready | Running | Succeeded | Failed | Suspended | Reconciling | Stalled |
|------------|-------|---------|-----------|--------|-----------|-------------|---------|
| Pending    | False | False   | False     | False  | False     | True        | False   |
| Waiting    | False | False   | False     | False  | False     | True        | False   |
| Running    | False | True    | False     | False  | False     | True        | False   |
| Suspended  | False | False   | False     | False  | True      | False       | False   |
| Succeeded  | True  | False   | True      | False  | False     | False       | False   |
| Failed     | False | False   | False     | True   | False     | False       | True    |
| Cancelled  | False | False   | False     | True   | False     | False       | True    |

The Ready condition's reason is the one-word state printed in `kubectl get ftj` (STATUS column).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api.common import Condition, ConditionStatus, now_rfc3339
from kubetune.api.finetunejob import Phase

CONDITION_TYPES = ("Ready", "Running", "Succeeded", "Failed", "Suspended", "Reconciling", "Stalled")

_TRUE_IN: dict[str, set[str]] = {
    "Ready": {"Succeeded"},
    "Running": {"Running"},
    "Succeeded": {"Succeeded"},
    "Failed": {"Failed", "Cancelled"},
    "Suspended": {"Suspended"},
    "Reconciling": {"Pending", "Waiting", "Running"},
    "Stalled": {"Failed", "Cancelled"},
}
# The phases that end a job, of either kind: nothing moves a job out of them. The one definition, for
# FineTuneJobs and EvalJobs alike (an EvalJob's Phase has no Cancelled; tests/operator/test_evalstatus.py).
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "Cancelled"})


@dataclass(frozen=True)
class State:
    """A phase with the reason and message that explain it."""

    phase: Phase
    reason: str
    message: str

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def event_type(self) -> str:
        return "Warning" if self.phase in ("Failed", "Cancelled") else "Normal"


def conditions(state: State, generation: int | None, previous: list[Condition],
               now: str | None = None) -> list[Condition]:
    """The full condition set for `state`; lastTransitionTime moves only when a status flips."""
    now = now or now_rfc3339()
    before = {c.type: c for c in previous}
    return [condition(kind, "True" if state.phase in _TRUE_IN[kind] else "False", state.reason, state.message,
                      generation, before.get(kind), now)
            for kind in CONDITION_TYPES]


def condition(kind: str, status: ConditionStatus, reason: str, message: str, generation: int | None,
              old: Condition | None, now: str) -> Condition:
    """One condition, with observedGeneration; its lastTransitionTime moves only when its status flips."""
    kept = old is not None and old.status == status
    return Condition(type=kind, status=status, reason=reason, message=message,
                     last_transition_time=old.last_transition_time if kept and old else now,
                     observed_generation=generation)


@dataclass(frozen=True)
class RayJobObservation:
    """What a RayJob's status says about the training run."""

    state: State
    deployment_status: str
    job_status: str
    ray_cluster: str | None
    retries: int
    end_time: str | None


def observe_rayjob(rayjob: dict[str, Any]) -> RayJobObservation | None:
    """Interpret a RayJob's status; None while it describes an older generation (not trustworthy)."""
    meta = rayjob.get("metadata") or {}
    st = rayjob.get("status") or {}
    observed = st.get("observedGeneration")
    if observed is not None and meta.get("generation") is not None and observed < meta["generation"]:
        return None
    deployment = st.get("jobDeploymentStatus") or ""
    job_status = st.get("jobStatus") or ""
    reason = st.get("reason") or ""
    message = st.get("message") or ""
    state = _state_of(deployment, job_status, reason, message)
    return RayJobObservation(
        state=state,
        deployment_status=deployment,
        job_status=job_status,
        ray_cluster=st.get("rayClusterName") or None,
        retries=int(st.get("failed") or 0),
        end_time=st.get("endTime") if state.terminal else None,
    )


def _state_of(deployment: str, job_status: str, reason: str, message: str) -> State:
    if deployment == "Complete":
        if job_status == "SUCCEEDED":
            return State("Succeeded", "Succeeded", message or "Training finished.")
        if job_status == "STOPPED":
            return State("Cancelled", "Cancelled", message or "The Ray job was stopped.")
        return State("Failed", reason or "AppFailed", message or f"The Ray job ended {job_status or 'FAILED'}.")
    if deployment in ("Failed", "ValidationFailed"):
        why = reason or ("RayJobValidationFailed" if deployment == "ValidationFailed" else "Failed")
        return State("Failed", why, message or "The RayJob failed.")
    if deployment in ("Suspending", "Suspended"):
        return State("Suspended", "Suspended", "The RayJob is suspended; its Ray cluster is deleted.")
    if deployment == "Retrying":
        return State("Running", "Retrying", message or "The Ray job failed and is being retried.")
    if deployment == "Running":
        if job_status in ("", "PENDING"):
            return State("Running", "Starting", message or "The Ray cluster is up; the job is starting.")
        return State("Running", "Running", message or "Training is running.")
    return State("Pending", "Initializing", message or "Waiting for the Ray cluster to start.")
