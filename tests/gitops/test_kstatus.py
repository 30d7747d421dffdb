"""The conditions the operator writes follow kstatus (sigs.k8s.io/cli-utils), which Flux and kpt use.

kstatus rules for a custom resource: a status whose `observedGeneration` differs from the object's
generation is InProgress; a `Reconciling` condition that is True means InProgress; a `Stalled`
condition that is True means Failed; otherwise the resource is Current. `Reconciling` and `Stalled`
are "abnormal-true" conditions: True only while something is not (yet) as it should be. Every
condition also records the generation it describes.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.evaljob import Phase as EvalPhase
from kubetune.api.finetunejob import Phase as FtjPhase
from kubetune.operator import evalstatus
from kubetune.operator import status as ftj_status

GENERATION = 7
NOW = "2026-11-20T10:00:00Z"
ABNORMAL_TRUE = ("Reconciling", "Stalled")

Obj = dict[str, Any]


def kstatus(obj: Obj) -> str:
    """cli-utils' kstatus `Compute` for a custom resource without type-specific rules."""
    meta, st = obj["metadata"], obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    observed = st.get("observedGeneration")
    if observed is not None and observed != meta.get("generation"):
        return "InProgress"
    for cond in st.get("conditions") or []:
        if cond["type"] == "Reconciling" and cond["status"] == "True":
            return "InProgress"
        if cond["type"] == "Stalled" and cond["status"] == "True":
            return "Failed"
    return "Current"


FTJ_PHASES = [p.value for p in FtjPhase]
EVJ_PHASES = [p.value for p in EvalPhase]
EXPECTED_KSTATUS = {
    "FineTuneJob": {"Pending": "InProgress", "Waiting": "InProgress", "Queued": "InProgress", "Running": "InProgress",
                    "Suspended": "Current", "Succeeded": "Current", "Failed": "Failed", "Cancelled": "Failed"},
    "EvalJob": {"Pending": "InProgress", "Waiting": "InProgress", "Serving": "InProgress", "Queued": "InProgress",
                "Evaluating": "InProgress", "Succeeded": "Current", "Failed": "Failed"},
}
CASES = [("FineTuneJob", p) for p in FTJ_PHASES] + [("EvalJob", p) for p in EVJ_PHASES]
IDS = [f"{kind}-{phase}" for kind, phase in CASES]


def module(kind: str) -> Any:
    return ftj_status if kind == "FineTuneJob" else evalstatus


def written(kind: str, phase: str, generation: int = GENERATION, observed: int = GENERATION) -> Obj:
    """The object as the operator leaves it in `phase`: conditions from the operator's own function."""
    mod = module(kind)
    state = mod.State(phase, f"{phase}Reason", f"The job is {phase}.")
    conds = [c.to_wire() for c in mod.conditions(state, observed, [], now=NOW)]
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": kind,
            "metadata": {"name": "job", "namespace": "default", "generation": generation},
            "status": {"observedGeneration": observed, "phase": phase, "conditions": conds}}


def conditions(obj: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


def test_every_phase_is_covered() -> None:
    assert set(EXPECTED_KSTATUS["FineTuneJob"]) == set(FTJ_PHASES)
    assert set(EXPECTED_KSTATUS["EvalJob"]) == set(EVJ_PHASES)


@pytest.mark.parametrize(("kind", "phase"), CASES, ids=IDS)
def test_kstatus_verdict_of_every_phase(kind: str, phase: str) -> None:
    assert kstatus(written(kind, phase)) == EXPECTED_KSTATUS[kind][phase]


@pytest.mark.parametrize(("kind", "phase"), CASES, ids=IDS)
def test_every_condition_records_the_generation(kind: str, phase: str) -> None:
    for cond in written(kind, phase)["status"]["conditions"]:
        assert cond["observedGeneration"] == GENERATION, cond["type"]


@pytest.mark.parametrize(("kind", "phase"), CASES, ids=IDS)
def test_every_phase_sets_every_condition_type_once(kind: str, phase: str) -> None:
    types = [c["type"] for c in written(kind, phase)["status"]["conditions"]]
    assert sorted(types) == sorted(module(kind).CONDITION_TYPES)
    assert {"Ready", "Reconciling", "Stalled"} <= set(types)


@pytest.mark.parametrize(("kind", "phase"), CASES, ids=IDS)
def test_reconciling_is_true_exactly_while_in_progress(kind: str, phase: str) -> None:
    in_progress = EXPECTED_KSTATUS[kind][phase] == "InProgress"
    assert conditions(written(kind, phase))["Reconciling"]["status"] == ("True" if in_progress else "False")


@pytest.mark.parametrize(("kind", "phase"), CASES, ids=IDS)
def test_stalled_is_true_exactly_on_failure(kind: str, phase: str) -> None:
    failed = EXPECTED_KSTATUS[kind][phase] == "Failed"
    assert conditions(written(kind, phase))["Stalled"]["status"] == ("True" if failed else "False")


@pytest.mark.parametrize(("kind", "phase"), CASES, ids=IDS)
def test_ready_is_true_only_on_success(kind: str, phase: str) -> None:
    assert conditions(written(kind, phase))["Ready"]["status"] == ("True" if phase == "Succeeded" else "False")


@pytest.mark.parametrize(("kind", "phase"), CASES, ids=IDS)
def test_abnormal_true_conditions_are_never_true_together(kind: str, phase: str) -> None:
    conds = conditions(written(kind, phase))
    assert [t for t in ABNORMAL_TRUE if conds[t]["status"] == "True"] in ([], ["Reconciling"], ["Stalled"])


@pytest.mark.parametrize("kind", ["FineTuneJob", "EvalJob"])
def test_the_normal_end_state_has_every_abnormal_true_condition_false(kind: str) -> None:
    conds = conditions(written(kind, "Succeeded"))
    assert {t: conds[t]["status"] for t in (*ABNORMAL_TRUE, "Failed")} == dict.fromkeys(
        (*ABNORMAL_TRUE, "Failed"), "False")


@pytest.mark.parametrize(("kind", "phase"), CASES, ids=IDS)
def test_status_of_an_older_generation_is_in_progress(kind: str, phase: str) -> None:
    assert kstatus(written(kind, phase, generation=GENERATION + 1, observed=GENERATION)) == "InProgress"


@pytest.mark.parametrize(("kind", "phase"), CASES, ids=IDS)
def test_condition_statuses_are_kubernetes_values(kind: str, phase: str) -> None:
    for cond in written(kind, phase)["status"]["conditions"]:
        assert cond["status"] in ("True", "False", "Unknown")
        assert cond["reason"], f"{cond['type']} has no reason"
        if cond["type"] != "GatePassed":
            assert cond["status"] != "Unknown", cond["type"]
