"""Status decisions: what a FineTuneJob's conditions say, and what a RayJob's status means for it.

Pure functions. Every phase sets the full, fixed set of condition types so that
`kubectl wait --for=condition=X` and Argo CD / kstatus health checks never see a missing condition:

| phase      | Ready | Running | Succeeded | Failed | Suspended | Reconciling | Stalled | Queued |
|------------|-------|---------|-----------|--------|-----------|-------------|---------|--------|
| Pending    | False | False   | False     | False  | False     | True        | False   | False  |
| Waiting    | False | False   | False     | False  | False     | True        | False   | False  |
| Queued     | False | False   | False     | False  | False     | True        | False   | True   |
| Running    | False | True    | False     | False  | False     | True        | False   | False  |
| Suspended  | False | False   | False     | False  | True      | False       | False   | False  |
| Succeeded  | True  | False   | True      | False  | False     | False       | False   | False  |
| Failed     | False | False   | False     | True   | False     | False       | True    | False  |
| Cancelled  | False | False   | False     | True   | False     | False       | True    | False  |

The Ready condition's reason is the one-word state printed in `kubectl get ftj` (STATUS column). Queued
(reason Queued, or Preempted once it had been admitted) is a RayJob Kueue holds suspended (spec.queueName);
Suspended is the user's spec.suspend.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubetune.api.common import TERMINAL_PHASES, Condition, ConditionStatus, now_rfc3339
from kubetune.api.finetunejob import Phase

CONDITION_TYPES = ("Ready", "Running", "Succeeded", "Failed", "Suspended", "Reconciling", "Stalled", "Queued")
MESSAGE_LIMIT = 512  # of a RayJob's status message quoted in a condition

_TRUE_IN: dict[str, set[Phase]] = {
    "Ready": {Phase.SUCCEEDED},
    "Running": {Phase.RUNNING},
    "Succeeded": {Phase.SUCCEEDED},
    "Failed": {Phase.FAILED, Phase.CANCELLED},
    "Suspended": {Phase.SUSPENDED},
    "Reconciling": {Phase.PENDING, Phase.WAITING, Phase.QUEUED, Phase.RUNNING},
    "Stalled": {Phase.FAILED, Phase.CANCELLED},
    "Queued": {Phase.QUEUED},
}


class Reason(StrEnum):
    """The operator's own reasons, in conditions and Events, for both kinds. A RayJob's failure reason from
    KubeRay (e.g. DeadlineExceeded, SubmissionFailed) is passed through as KubeRay wrote it."""

    # progress (conditions)
    INITIALIZING = "Initializing"
    WAITING_FOR_MODEL = "WaitingForModel"
    STARTING = "Starting"
    RUNNING = "Running"
    RETRYING = "Retrying"
    SUSPENDED = "Suspended"
    CREATING_SERVICES = "CreatingServices"
    WAITING_FOR_SERVICES = "WaitingForServices"
    EVALUATING = "Evaluating"
    SECRET_NOT_FOUND = "SecretNotFound"
    QUEUED = "Queued"  # Kueue holds the RayJob suspended until it admits it
    PREEMPTED = "Preempted"  # Kueue suspended the RayJob again after admitting it
    ADMITTED = "Admitted"  # Kueue unsuspended the RayJob; its Ray cluster is starting
    # endings (conditions)
    SUCCEEDED = "Succeeded"
    CANCELLED = "Cancelled"
    APP_FAILED = "AppFailed"
    FAILED = "Failed"
    RAYJOB_VALIDATION_FAILED = "RayJobValidationFailed"
    VALIDATION_FAILED = "ValidationFailed"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    BASE_MODEL_UNAVAILABLE = "BaseModelUnavailable"
    MODEL_UNAVAILABLE = "ModelUnavailable"
    API_REJECTED = "ApiRejected"
    CHILD_CONFLICT = "ChildConflict"
    RAYJOB_DELETED = "RayJobDeleted"
    SERVING_DELETED = "ServingDeleted"
    SERVING_FAILED = "ServingFailed"
    EVALUATION_FAILED = "EvaluationFailed"
    # the gate (an EvalJob's GatePassed condition)
    GATE_PASSED = "GatePassed"
    GATE_FAILED = "GateFailed"
    NO_GATE = "NoGate"
    NOT_JUDGED = "NotJudged"
    # Events only
    CREATED = "Created"
    NOT_OWNED = "NotOwned"
    CHILD_RECREATED = "ChildRecreated"
    CHILDREN_DELETED = "ChildrenDeleted"
    SUSPENDING = "Suspending"
    RESUMING = "Resuming"
    EVALUATION_CREATED = "EvaluationCreated"
    EVALUATION_INVALID = "EvaluationInvalid"
    GATE_OVERWRITTEN = "GateOverwritten"
    SERVICES_DELETED = "ServicesDeleted"


class EventType(StrEnum):
    """Kubernetes Event types."""

    NORMAL = "Normal"
    WARNING = "Warning"


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
    def event_type(self) -> EventType:
        return EventType.WARNING if self.phase in (Phase.FAILED, Phase.CANCELLED) else EventType.NORMAL

    def conditions(self, generation: int | None, previous: list[Condition]) -> list[Condition]:
        """The job's full condition set in this state."""
        return conditions(self, generation, previous)


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
    # KubeRay's message may carry the tail of the Ray job's log, text of the job author's choosing: one
    # line, at most MESSAGE_LIMIT characters, goes into the job's conditions and Events.
    message = " ".join(str(st.get("message") or "").split())
    message = message if len(message) <= MESSAGE_LIMIT else message[:MESSAGE_LIMIT - 1] + "…"
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
            return State(Phase.SUCCEEDED, Reason.SUCCEEDED, message or "Training finished.")
        if job_status == "STOPPED":
            return State(Phase.CANCELLED, Reason.CANCELLED, message or "The Ray job was stopped.")
        return State(Phase.FAILED, reason or Reason.APP_FAILED,
                     message or f"The Ray job ended {job_status or 'FAILED'}.")
    if deployment in ("Failed", "ValidationFailed"):
        why = reason or (Reason.RAYJOB_VALIDATION_FAILED if deployment == "ValidationFailed" else Reason.FAILED)
        return State(Phase.FAILED, why, message or "The RayJob failed.")
    if deployment in ("Suspending", "Suspended"):
        return State(Phase.SUSPENDED, Reason.SUSPENDED, "The RayJob is suspended; its Ray cluster is deleted.")
    if deployment == "Retrying":
        return State(Phase.RUNNING, Reason.RETRYING, message or "The Ray job failed and is being retried.")
    if deployment == "Running":
        if job_status in ("", "PENDING"):
            return State(Phase.RUNNING, Reason.STARTING, message or "The Ray cluster is up; the job is starting.")
        return State(Phase.RUNNING, Reason.RUNNING, message or "Training is running.")
    return State(Phase.PENDING, Reason.INITIALIZING, message or "Waiting for the Ray cluster to start.")


# -- Kueue ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KueueView:
    """What a queued RayJob says about Kueue's hold on it: a reason and message for the job's status."""

    held: bool  # Kueue holds it suspended: not admitted yet, or preempted
    reason: str
    message: str


def held_by_kueue(rayjob: dict[str, Any]) -> bool:
    """A queued RayJob's spec.suspend: Kueue's decision (kubetune creates it true and never changes it; Kueue
    sets it false to admit the RayJob and true again to preempt it)."""
    return bool((rayjob.get("spec") or {}).get("suspend"))


def kueue_view(held: bool, deployment: str, rayjob: str, queue: str, admitted_before: bool,
               message: str) -> KueueView | None:
    """How a queued RayJob's state reads: held (Queued; Preempted once it had been admitted), admitted with its
    Ray cluster not started yet (Admitted), or None when KubeRay's own state says more (running, finished).

    Kueue admits a RayJob by setting spec.suspend to false; KubeRay then goes Suspended -> "" -> Initializing
    -> Running. It preempts one by setting spec.suspend to true; KubeRay goes Suspending -> Suspended (a
    RayJob created suspended also passes through Initializing and Suspending, without a Ray cluster)."""
    if held:
        if admitted_before:
            return KueueView(True, Reason.PREEMPTED, f"Kueue suspended RayJob {rayjob} after admitting it "
                             f"(preempted or evicted); it waits in LocalQueue {queue} to be admitted again.")
        return KueueView(True, Reason.QUEUED, f"RayJob {rayjob} waits in Kueue LocalQueue {queue} for admission.")
    if deployment in ("", "Initializing", "Suspending", "Suspended"):
        return KueueView(False, Reason.ADMITTED, f"Kueue admitted RayJob {rayjob} (LocalQueue {queue}); "
                         f"{message[:1].lower() + message[1:] if message else 'its Ray cluster is starting.'}")
    return None
