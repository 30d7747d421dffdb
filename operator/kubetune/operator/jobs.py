"""What the reconcilers of both kinds share: the runtime, Event references, the one status write, the verdict
on a spec that does not parse, the trust rule for a referenced FineTuneJob's checkpoint, the trainer RBAC and
the deletion of owned children.

`reconcile` (FineTuneJobs) and `evalreconcile` (EvalJobs) import this module; neither imports the other.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.api import evaljob, finetunejob
from kubetune.api.common import Condition
from kubetune.api.evaljob import EvalJob, EvalJobStatus
from kubetune.api.finetunejob import FineTuneJob, FineTuneJobStatus
from kubetune.operator import evalstatus, kube, status
from kubetune.operator.kube import Obj
from kubetune.operator.status import EventType, Reason
from kubetune.operator.verdicts import truncated

Key = tuple[str, str]
EventFn = Callable[[Obj, str, str, str], None]
# kopf's index of FineTuneJobs ((namespace, name) -> the stores of bodies under that key), kept by kopf from
# its own watch: read-only here.
JobIndex = Mapping[Key, Iterable[Obj]]
Job = FineTuneJob | EvalJob
State = status.State | evalstatus.State

WAIT_FOR_MODEL_DELAY = float(os.environ.get("KUBETUNE_WAIT_DELAY", "30"))
# The level-triggered pass per job (kopf.timer): how soon drift no event announced (a deleted child, a TTL,
# a deadline) is acted on.
TIMER_INTERVAL = float(os.environ.get("KUBETUNE_TIMER_INTERVAL", "60"))


@dataclass
class Runtime:
    """What reconcile needs from the outside world, shared by all handlers of one operator process (kept in
    kopf's `memo`). Coroutines on one event loop: nothing here needs a lock."""

    kube: kube.Kube
    emit: EventFn
    finetunejobs: JobIndex = field(default_factory=dict)  # kopf.index `finetunejobs`
    on_transition: Callable[[str], None] = lambda phase: None  # a FineTuneJob's phase changed (metrics)
    # The namespace of KubeRay's operator, which every Ray cluster's NetworkPolicy admits to the head's
    # ports; None: no NetworkPolicies (the chart's networkPolicy.enabled=false).
    kuberay_namespace: str | None = "ray-system"


def indexed(index: JobIndex, key: Key) -> Obj | None:
    """The body under `key` in a kopf index of jobs (one object per namespace/name), if any."""
    store = index.get(key)
    return next(iter(store), None) if store is not None else None


def ref_of(job: Job) -> Obj:
    """The object reference Events are attached to."""
    return {"apiVersion": job.api_version, "kind": job.kind,
            "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace,
                         "uid": job.metadata.uid}}


def _api_ref(kind: str, namespace: str, name: str) -> kube.Ref:
    return kube.evj_ref(namespace, name) if kind == evaljob.KIND else kube.ftj_ref(namespace, name)


def ready(conditions: list[Condition]) -> Condition | None:
    """The Ready condition: its reason is the one-word state `kubectl get` prints."""
    return next((c for c in conditions if c.type == "Ready"), None)


async def write_status(rt: Runtime, job: Job, state: State, *, event: bool = True, if_unchanged: bool = False,
                       **facts: Any) -> None:
    """The one status write of either kind: the conditions for `state` plus observed facts (None ones left
    out); an Event (unless `event` is False) when the phase or the Ready reason changes. `if_unchanged`:
    only if the job is still the version it was read at (else kube.KubeError 409, nothing written)."""
    generation = job.metadata.generation
    wire: Obj = {
        "observedGeneration": generation,
        "phase": state.phase,
        "conditions": [c.to_wire() for c in state.conditions(generation, job.status.conditions)],
    }
    wire.update({k: v for k, v in facts.items() if v is not None})
    await rt.kube.patch_status(_api_ref(job.kind, job.metadata.namespace, job.metadata.name), wire,
                               resource_version=job.metadata.resource_version if if_unchanged else None)
    before = ready(job.status.conditions)
    if (job.status.phase, before.reason if before else None) != (state.phase, state.reason):
        if event:
            rt.emit(ref_of(job), state.event_type, state.reason, state.message)
        if job.kind == finetunejob.KIND:
            rt.on_transition(state.phase)


async def reject(rt: Runtime, body: Obj, message: str) -> None:
    """Mark a job of either kind whose spec does not parse as Failed/ValidationFailed: it never runs.
    Nothing is written when that verdict is already recorded for this generation (an operator restart)."""
    meta = body.get("metadata") or {}
    kind = str(body.get("kind") or finetunejob.KIND)
    model = EvalJobStatus if kind == evaljob.KIND else FineTuneJobStatus
    try:
        previous = model.model_validate(body.get("status") or {}).conditions
    except ValueError:
        previous = []
    already = ready(previous)
    if already and already.reason == Reason.VALIDATION_FAILED and already.message == message and (
            already.observed_generation == meta.get("generation")):
        return
    state: State = (evalstatus.State(evaljob.Phase.FAILED, Reason.VALIDATION_FAILED, message)
                    if kind == evaljob.KIND else status.State(finetunejob.Phase.FAILED, Reason.VALIDATION_FAILED, message))
    wire = {
        "observedGeneration": meta.get("generation"),
        "phase": state.phase,
        "conditions": [c.to_wire() for c in state.conditions(meta.get("generation"), previous)],
    }
    await rt.kube.patch_status(_api_ref(kind, meta["namespace"], meta["name"]), wire)
    rt.emit({"apiVersion": body.get("apiVersion"), "kind": kind, "metadata": meta},
            EventType.WARNING, state.reason, message)
    if kind == finetunejob.KIND:
        rt.on_transition(state.phase)


def finetunejob_status(body: Obj | None) -> FineTuneJobStatus:
    """A FineTuneJob body's status; empty when absent or when it does not parse."""
    try:
        return FineTuneJobStatus.model_validate((body or {}).get("status") or {})
    except ValueError:
        return FineTuneJobStatus()


def checkpoint_outside_output(body: Obj, uri: str) -> str | None:
    """Why a FineTuneJob's reported best checkpoint may not be used (None if it may): anything in the job's
    pods can write its status, so a checkpoint counts only where the job's own spec.output.uri holds it."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    output = str((spec.get("output") or {}).get("uri") or "").rstrip("/")
    parts = uri.split("/")
    if output and uri.startswith(output + "/") and ".." not in parts and "." not in parts[3:]:
        return None
    return (f"FineTuneJob {meta.get('name')} reports its best checkpoint at {truncated(uri, 200)!r}, which is "
            f"not under its spec.output.uri {truncated(output, 200)!r}; refusing to use it")


async def ensure_identity(rt: Runtime, objects: list[Obj], read_first: bool = False) -> None:
    """The job's own ServiceAccount, Role and RoleBinding (builders.identity), each created if missing and
    required to be the job's (kube.NotOwned otherwise: never adopted)."""
    await ensure_all_owned(rt, objects, read_first)


async def ensure_all_owned(rt: Runtime, objects: list[Obj], read_first: bool = False) -> None:
    """`kube.ensure_owned` for each of `objects` at once (none depends on another: a RoleBinding may name a
    Role not created yet): one round trip of latency instead of one per object. Every call finishes; the
    first failure, in the order given, is raised. `read_first`: they probably exist (a retry)."""
    results = await asyncio.gather(*(rt.kube.ensure_owned(obj, read_first) for obj in objects),
                                   return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def delete_children(rt: Runtime, event_ref: Obj, owner_uid: str, refs: list[kube.Ref]) -> list[kube.Ref]:
    """Delete those of `refs` that `owner_uid` controls, in order; leave any other object of those names, with
    a Warning Event `NotOwned` on `event_ref`. Returns the ones this call deleted."""
    deleted = []
    for ref in refs:
        try:
            if await rt.kube.delete_owned(ref, owner_uid):
                deleted.append(ref)
        except kube.NotOwned as exc:
            rt.emit(event_ref, EventType.WARNING, Reason.NOT_OWNED, f"{exc}: not deleted.")
    return deleted
