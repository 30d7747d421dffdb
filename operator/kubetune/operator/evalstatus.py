"""EvalJob status decisions: what its conditions say, and what a RayService's status means for it.

Pure functions, like `status` for FineTuneJobs. Every phase sets the full, fixed set of condition types,
so `kubectl wait --for=condition=X` and Argo CD / kstatus health checks never see a missing condition:

| phase      | Ready | Running | Succeeded | Failed | Reconciling | Stalled | GatePassed           | Queued |
|------------|-------|---------|-----------|--------|-------------|---------|----------------------|--------|
| Pending    | False | False   | False     | False  | True        | False   | Unknown              | False  |
| Waiting    | False | False   | False     | False  | True        | False   | Unknown              | False  |
| Serving    | False | True    | False     | False  | True        | False   | Unknown              | False  |
| Queued     | False | True    | False     | False  | True        | False   | Unknown              | True   |
| Evaluating | False | True    | False     | False  | True        | False   | Unknown              | False  |
| Succeeded  | True  | False   | True      | False  | False       | False   | True                 | False  |
| Failed     | False | False   | False     | True   | False       | True    | False (GateFailed),   | False  |
|            |       |         |           |        |             |         | else Unknown         |        |

Queued: the evaluation RayJob waits for Kueue's admission (spec.queueName), or was preempted; the RayServices
(not queued) keep serving, so Running stays True.

GatePassed is judged only from results: True with reason GatePassed (or NoGate when the EvalJob has no
gate), False with reason GateFailed, Unknown (NotJudged) before results or when there are none. The Ready
condition's reason is the one-word state printed in `kubectl get evj` (STATUS column).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetune.api.common import TERMINAL_PHASES, Condition, ConditionStatus, now_rfc3339
from kubetune.api.evaljob import Phase
from kubetune.operator.status import EventType, Reason, condition

CONDITION_TYPES = ("Ready", "Running", "Succeeded", "Failed", "Reconciling", "Stalled", "GatePassed", "Queued")

_TRUE_IN: dict[str, set[Phase]] = {
    "Ready": {Phase.SUCCEEDED},
    "Running": {Phase.SERVING, Phase.QUEUED, Phase.EVALUATING},
    "Succeeded": {Phase.SUCCEEDED},
    "Failed": {Phase.FAILED},
    "Reconciling": {Phase.PENDING, Phase.WAITING, Phase.SERVING, Phase.QUEUED, Phase.EVALUATING},
    "Stalled": {Phase.FAILED},
    "Queued": {Phase.QUEUED},
}

GateVerdict = Literal[Reason.GATE_PASSED, Reason.GATE_FAILED, Reason.NO_GATE]
NOT_JUDGED = Reason.NOT_JUDGED
NOT_JUDGED_MESSAGE = "The gate is judged once the evaluation has results."


@dataclass(frozen=True)
class State:
    """A phase with the reason and message that explain it, and the gate's verdict once there is one."""

    phase: Phase
    reason: str
    message: str
    gate: GateVerdict | None = None
    gate_message: str = ""

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def event_type(self) -> EventType:
        # A missing Secret is the user's to fix, like a Pod waiting for one: a Warning, not a failure.
        warn = self.phase == Phase.FAILED or self.reason == Reason.SECRET_NOT_FOUND
        return EventType.WARNING if warn else EventType.NORMAL

    def conditions(self, generation: int | None, previous: list[Condition]) -> list[Condition]:
        """The EvalJob's full condition set in this state."""
        return conditions(self, generation, previous)


def _gate_condition(state: State) -> tuple[ConditionStatus, str, str]:
    if state.gate is None:
        return "Unknown", NOT_JUDGED, NOT_JUDGED_MESSAGE
    status: ConditionStatus = "False" if state.gate == Reason.GATE_FAILED else "True"
    message = state.gate_message or ("The EvalJob has no gate." if state.gate == Reason.NO_GATE else "")
    return status, state.gate, message


def conditions(state: State, generation: int | None, previous: list[Condition],
               now: str | None = None) -> list[Condition]:
    """The full condition set for `state`; lastTransitionTime moves only when a status flips."""
    now = now or now_rfc3339()
    before = {c.type: c for c in previous}
    out = []
    for kind in CONDITION_TYPES:
        if kind == "GatePassed":
            status, reason, message = _gate_condition(state)
        else:
            status = "True" if state.phase in _TRUE_IN[kind] else "False"
            reason, message = state.reason, state.message
        out.append(condition(kind, status, reason, message, generation, before.get(kind), now))
    return out


def observe_rayservice(obj: dict[str, Any]) -> tuple[bool | None, str]:
    """(ready, message) of a RayService as KubeRay reports it.

    ready is True when it serves: the `Ready` condition is True (KubeRay 1.5+), or, from older KubeRay
    without conditions, `serviceStatus` is "Running". False when an application of it failed to deploy
    (`DEPLOY_FAILED`: the model did not load, say), which waiting will not fix. None while it is not ready
    yet, including when its status describes an older generation (not trustworthy).
    """
    meta = obj.get("metadata") or {}
    st = obj.get("status") or {}
    name = meta.get("name", "RayService")
    observed = st.get("observedGeneration")
    if observed is not None and meta.get("generation") is not None and observed < meta["generation"]:
        return None, f"RayService {name}: status describes an older generation."
    apps = (st.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    apps = {**apps, **((st.get("pendingServiceStatus") or {}).get("applicationStatuses") or {})}
    for app, app_status in sorted(apps.items()):
        if (app_status or {}).get("status") == "DEPLOY_FAILED":
            detail = (app_status or {}).get("message") or "no message"
            return False, f"RayService {name}: application {app} failed to deploy: {detail}"
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is not None:
        if ready.get("status") == "True":
            return True, f"RayService {name} is ready."
        why = ready.get("message") or ready.get("reason") or "not ready"
        return None, f"RayService {name} is not ready: {why}"
    if st.get("serviceStatus") == "Running":
        return True, f"RayService {name} is running."
    return None, f"RayService {name} is starting."
