"""Reconcile: decide what a FineTuneJob needs, using builders for objects and `kube` for I/O.

Coroutines on the operator's one event loop: no threads, so the runtime's caches need no locks.

No kopf here: waiting and rejection are expressed as exceptions that the handlers translate into
`kopf.TemporaryError` / `kopf.PermanentError`. Each entry point writes the status at most once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetune.api.common import now_rfc3339
from kubetune.api.finetunejob import FineTuneJob, FineTuneJobStatus
from kubetune.contract.evalplan import evaljob_name
from kubetune.operator import builders, evalbuilders, kube
from kubetune.operator.kube import Obj
from kubetune.operator.status import (
    TERMINAL_PHASES,
    RayJobObservation,
    State,
    conditions,
    observe_rayjob,
)
from kubetune.operator.verdicts import Rejected, WaitFor, api_verdicts, too_large, truncated

log = logging.getLogger(__name__)

Key = tuple[str, str]
EventFn = Callable[[Obj, str, str, str], None]

WAIT_FOR_MODEL_DELAY = float(os.environ.get("KUBETUNE_WAIT_DELAY", "30"))


# kopf's index of FineTuneJobs ((namespace, name) -> the stores of bodies under that key), kept by kopf from
# its own watch: read-only here.
JobIndex = Mapping[Key, Iterable[Obj]]


@dataclass
class Runtime:
    """What reconcile needs from the outside world, shared by all handlers of one operator process (kept in
    kopf's `memo`)."""

    kube: kube.Kube
    emit: EventFn
    finetunejobs: JobIndex = field(default_factory=dict)  # kopf.index `finetunejobs`
    rbac_ready: set[str] = field(default_factory=set)  # namespaces whose trainer RBAC exists
    on_transition: Callable[[str], None] = lambda phase: None


def indexed(index: JobIndex, key: Key) -> Obj | None:
    """The body under `key` in a kopf index of jobs (one object per namespace/name), if any."""
    store = index.get(key)
    return next(iter(store), None) if store is not None else None


def ref_of(job: FineTuneJob) -> Obj:
    """The object reference Events are attached to."""
    return {"apiVersion": job.api_version, "kind": job.kind,
            "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace,
                         "uid": job.metadata.uid}}


async def _write_state(rt: Runtime, job: FineTuneJob, state: State, event: bool = True, **facts: Any) -> None:
    """One status write: the conditions for `state` plus observed facts; an Event if the state changed."""
    previous = job.status.conditions
    status: Obj = {
        "observedGeneration": job.metadata.generation,
        "phase": state.phase,
        "conditions": [c.to_wire() for c in conditions(state, job.metadata.generation, previous)],
    }
    status.update({k: v for k, v in facts.items() if v is not None})
    await rt.kube.patch_status(kube.ftj_ref(job.metadata.namespace, job.metadata.name), status)
    if (job.status.phase, _ready_reason(job)) != (state.phase, state.reason):
        if event:
            rt.emit(ref_of(job), state.event_type, state.reason, state.message)
        rt.on_transition(state.phase)


def _ready_reason(job: FineTuneJob) -> str | None:
    return next((c.reason for c in job.status.conditions if c.type == "Ready"), None)


def started(job: FineTuneJob) -> bool:
    """The operator has recorded children for the job: from here on its spec is frozen (CEL)."""
    return bool(job.status.start_time and job.status.children and job.status.children.ray_job)


def restart_after_fix(job: FineTuneJob) -> FineTuneJob:
    """A not-yet-started job whose spec changed: forget an earlier ValidationFailed verdict."""
    if job.status.phase == "Failed" and _ready_reason(job) == "ValidationFailed":
        job.status.phase = None
    return job


# -- invalid spec ----------------------------------------------------------------------------------


async def reject(rt: Runtime, body: Obj, message: str) -> None:
    """Mark a FineTuneJob whose spec does not parse as Failed/ValidationFailed (it never runs)."""
    meta = body.get("metadata") or {}
    previous = _status_of(body).conditions
    state = State("Failed", "ValidationFailed", message)
    already = next((c for c in previous if c.type == "Ready"), None)
    if already and already.reason == state.reason and already.message == message and (
            already.observed_generation == meta.get("generation")):
        return  # e.g. the operator restarted: the verdict is already recorded
    status = {
        "observedGeneration": meta.get("generation"),
        "phase": state.phase,
        "conditions": [c.to_wire() for c in conditions(state, meta.get("generation"), previous)],
    }
    await rt.kube.patch_status(kube.ftj_ref(meta["namespace"], meta["name"]), status)
    rt.emit({"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": meta},
            "Warning", state.reason, message)
    rt.on_transition(state.phase)


# -- launch ----------------------------------------------------------------------------------------


async def launch(rt: Runtime, job: FineTuneJob) -> None:
    """Create the job's children (ConfigMap, RayJob, trainer RBAC) if they do not exist yet.

    Restart-safe: names are deterministic and "already exists" counts as success, so running this
    again after a crash at any point never makes a second RayJob or ConfigMap.
    """
    if job.status.phase in TERMINAL_PHASES:
        if job.status.phase == "Succeeded":
            await ensure_evaluation(rt, job)  # a crash may have come between the Succeeded write and it
        return
    base_model_uri = await _resolve_base_model(rt, job)
    names = builders.children(job)
    config_map = builders.config_map(job, names, base_model_uri)
    ray_job = builders.ray_job(job, names, base_model_uri)
    for child in (config_map, ray_job):
        if problem := too_large(child, job.spec.to_wire):
            await _fail(rt, job, "ApiRejected", problem)
    async with api_verdicts(lambda reason, message: _fail(rt, job, reason, message)):
        if job.status.children is None or job.status.children.ray_job is None:
            # Record the names before creating anything, so a crash leaves a trail to the children.
            state = State("Pending", "Initializing", f"Creating RayJob {names.ray_job}.")
            # No Event here: the "Created" Event below reports this transition once the RayJob exists.
            await _write_state(rt, job, state, event=False, children=names.to_wire(), startTime=now_rfc3339(),
                               resolvedBaseModelUri=base_model_uri)
        await _ensure_trainer_rbac(rt, job.metadata.namespace)
        await rt.kube.ensure_owned(config_map)
        created = await rt.kube.ensure_owned(ray_job)
    if created:
        rt.emit(ref_of(job), "Normal", "Created", f"Created RayJob {names.ray_job} "
                f"({job.spec.resources.workers} workers x {job.spec.resources.gpus_per_worker} "
                f"{job.spec.resources.gpu_type}).")


async def _ensure_trainer_rbac(rt: Runtime, namespace: str) -> None:
    if namespace in rt.rbac_ready:
        return
    for obj in builders.trainer_rbac(namespace):
        await rt.kube.ensure(obj)
    rt.rbac_ready.add(namespace)


async def _resolve_base_model(rt: Runtime, job: FineTuneJob) -> str | None:
    """For a fineTuneJobRef, the referenced job's best checkpoint; waits until that job succeeded."""
    ref = job.spec.base_model.fine_tune_job_ref
    if ref is None:
        return None
    if ref.name == job.metadata.name:
        await _fail(rt, job, "ValidationFailed", "spec.baseModel.fineTuneJobRef: a FineTuneJob cannot use itself")
    body = indexed(rt.finetunejobs, (job.metadata.namespace, ref.name))
    if body is None:
        try:
            body = await rt.kube.get(kube.ftj_ref(job.metadata.namespace, ref.name))
        except kube.NotFound:
            body = None
    other = _status_of(body)
    if body is not None and other.phase == "Succeeded":
        if other.best_checkpoint is None:
            await _fail(rt, job, "BaseModelUnavailable",
                        f"FineTuneJob {ref.name} succeeded but reported no best checkpoint.")
        assert other.best_checkpoint is not None
        if problem := checkpoint_outside_output(body, other.best_checkpoint.uri):
            await _fail(rt, job, "BaseModelUnavailable", f"spec.baseModel.fineTuneJobRef: {problem}")
        return other.best_checkpoint.uri
    if body is not None and other.phase in ("Failed", "Cancelled"):
        await _fail(rt, job, "BaseModelUnavailable", f"FineTuneJob {ref.name} ended {other.phase}.")
    await _check_deadline_while_waiting(rt, job)
    why = "does not exist yet" if body is None else f"is {other.phase or 'Pending'}"
    message = f"Waiting for FineTuneJob {ref.name}, which {why}, to succeed."
    if job.status.phase != "Waiting" or _ready_reason(job) != "WaitingForModel":
        await _write_state(rt, job, State("Waiting", "WaitingForModel", message))
    raise WaitFor(message, WAIT_FOR_MODEL_DELAY)


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


def _status_of(body: Obj | None) -> FineTuneJobStatus:
    try:
        return FineTuneJobStatus.model_validate((body or {}).get("status") or {})
    except ValueError:
        return FineTuneJobStatus()


async def _check_deadline_while_waiting(rt: Runtime, job: FineTuneJob) -> None:
    deadline = job.spec.active_deadline_seconds
    created = (indexed(rt.finetunejobs, (job.metadata.namespace, job.metadata.name)) or {}).get(
        "metadata", {}).get("creationTimestamp")
    if deadline is None or not created:
        return
    age = time.time() - datetime.fromisoformat(created).timestamp()
    if age > deadline:
        await _fail(rt, job, "DeadlineExceeded",
                    f"activeDeadlineSeconds ({deadline}s) passed while waiting for the base model.")


async def _fail(rt: Runtime, job: FineTuneJob, reason: str, message: str) -> None:
    await _write_state(rt, job, State("Failed", reason, message), completionTime=now_rfc3339())
    raise Rejected(message)


# -- follow the RayJob -----------------------------------------------------------------------------


async def follow(rt: Runtime, job: FineTuneJob, rayjob: Obj) -> None:
    """Mirror a RayJob status change into the FineTuneJob's conditions (at most one status write)."""
    if not kube.is_child(rayjob, builders.children(job).ray_job, job.metadata.uid):
        return  # labels are for people: only the job's own RayJob, by name and controller uid, counts
    obs = observe_rayjob(rayjob)
    if obs is None or job.status.phase in TERMINAL_PHASES:
        return
    ray_job_status = "/".join(s for s in (obs.deployment_status, obs.job_status) if s) or None
    unchanged = (
        job.status.phase == obs.state.phase
        and _ready_reason(job) == obs.state.reason
        and job.status.ray_job_status == ray_job_status
        and obs.retries <= (job.status.retries or 0)
        and (job.status.children is None or job.status.children.ray_cluster == obs.ray_cluster)
    )
    if unchanged:
        return
    children = (job.status.children or builders.children(job)).model_copy(update={"ray_cluster": obs.ray_cluster})
    evaluate = obs.state.phase == "Succeeded" and job.spec.evaluation is not None
    if evaluate:  # recorded with the Succeeded verdict, before the EvalJob is created
        children = children.model_copy(update={"eval_job": evaljob_name(job.metadata.name)})
    await _write_state(rt, job, obs.state, children=children.to_wire(), rayJobStatus=ray_job_status,
                       retries=max(job.status.retries or 0, obs.retries) or None, completionTime=_completion(obs))
    if evaluate:
        job.status.children = children
        await ensure_evaluation(rt, job)


# -- spec.evaluation -------------------------------------------------------------------------------


async def ensure_evaluation(rt: Runtime, job: FineTuneJob) -> None:
    """Create the EvalJob spec.evaluation asks for (fine-tuned vs base model few-shot), owned by the job.

    Only once its name is recorded in status.children.evalJob; "already exists" is success.
    """
    if job.spec.evaluation is None or job.status.children is None or job.status.children.eval_job is None:
        return
    base = job.spec.base_model.name or job.spec.base_model.uri or job.status.resolved_base_model_uri
    if base is None:
        return
    try:
        created = await rt.kube.ensure_owned(evalbuilders.evaluation_evaljob(job, base))
    except kube.Invalid as exc:  # e.g. a CRD older than the operator: say so on the FineTuneJob
        rt.emit(ref_of(job), "Warning", "EvaluationInvalid",
                f"EvalJob {job.status.children.eval_job} was rejected: {truncated(exc.message)}")
        return
    except kube.NotOwned as exc:  # the training stands; the evaluation cannot be ours
        rt.emit(ref_of(job), "Warning", "ChildConflict", f"{exc}: no evaluation was created.")
        return
    if created:
        rt.emit(ref_of(job), "Normal", "EvaluationCreated", f"Created EvalJob {job.status.children.eval_job}: "
                f"the best checkpoint against {base} few-shot.")


def _completion(obs: RayJobObservation) -> str | None:
    if not obs.state.terminal:
        return None
    return obs.end_time or now_rfc3339()


# -- suspend ---------------------------------------------------------------------------------------


async def set_suspend(rt: Runtime, job: FineTuneJob) -> None:
    """Pass spec.suspend on to the RayJob (KubeRay deletes or recreates the Ray cluster)."""
    names = builders.children(job)  # never a name from status: anything in the job's pods can write that
    if job.status.phase in TERMINAL_PHASES or names.ray_job is None or job.metadata.uid is None:
        return
    ref = kube.rayjob_ref(job.metadata.namespace, names.ray_job)
    try:
        if not await rt.kube.patch_owned(ref, job.metadata.uid, {"spec": {"suspend": job.spec.suspend}}):
            return  # not created yet: launch builds it with the current spec.suspend
    except kube.NotOwned as exc:
        rt.emit(ref_of(job), "Warning", "NotOwned", f"{exc}: left as it is.")
        return
    verb = "Suspending" if job.spec.suspend else "Resuming"
    rt.emit(ref_of(job), "Normal", verb, f"{verb} RayJob {names.ray_job}.")


# -- the timer: level-triggered repair and ttlSecondsAfterFinished ---------------------------------


async def tick(rt: Runtime, job: FineTuneJob, rayjob_seen: bool) -> None:
    """The periodic pass over one job (kopf.timer): compare it with its owned children and repair drift
    that no watch event announced; expire finished jobs' children after ttlSecondsAfterFinished.

    `rayjob_seen`: kopf's index of owned RayJobs holds one controlled by this job. Only an absence is
    confirmed with the API (the index may lag behind a create), so a healthy job costs no request.
    """
    if job.status.phase in TERMINAL_PHASES:
        if rayjob_seen:
            await expire(rt, job)
        return
    # Until KubeRay has reported on the RayJob (rayJobStatus), the launch handler owns its creation and
    # retries it itself: a RayJob not there yet is not a deleted one.
    if rayjob_seen or not started(job) or job.status.ray_job_status is None:
        return
    names = builders.children(job)
    assert names.ray_job and job.metadata.uid
    if await rt.kube.get_owned(kube.rayjob_ref(job.metadata.namespace, names.ray_job), job.metadata.uid):
        return
    await recreate(rt, job)


async def recreate(rt: Runtime, job: FineTuneJob) -> None:
    """The job's RayJob is gone while the job runs (deleted by hand, by a namespace cleanup, ...): create it
    again while spec.backoffLimit allows, counting in status.retries, else fail with RayJobDeleted."""
    names = builders.children(job)
    retries = (job.status.retries or 0) + 1
    if retries > job.spec.backoff_limit:
        await _fail(rt, job, "RayJobDeleted", f"RayJob {names.ray_job} was deleted while the job was "
                    f"{job.status.phase or 'Pending'}, and backoffLimit ({job.spec.backoff_limit}) allows no "
                    "more attempts.")
    base_model_uri = job.status.resolved_base_model_uri
    async with api_verdicts(lambda reason, message: _fail(rt, job, reason, message)):
        await rt.kube.ensure_owned(builders.config_map(job, names, base_model_uri))
        await rt.kube.ensure_owned(builders.ray_job(job, names, base_model_uri))
        state = State("Pending", "Initializing", f"Re-created RayJob {names.ray_job} (attempt {retries + 1}).")
        await _write_state(rt, job, state, event=False, retries=retries)
    rt.emit(ref_of(job), "Warning", "ChildRecreated", f"RayJob {names.ray_job} was deleted while the job "
            f"ran; re-created it (retry {retries} of {job.spec.backoff_limit}).")


async def delete_children(rt: Runtime, event_ref: Obj, owner_uid: str, refs: list[kube.Ref]) -> list[kube.Ref]:
    """Delete those of `refs` that `owner_uid` controls, in order; leave any other object of those names, with
    a Warning Event `NotOwned` on `event_ref`. Returns the ones this call deleted."""
    deleted = []
    for ref in refs:
        try:
            if await rt.kube.delete_owned(ref, owner_uid):
                deleted.append(ref)
        except kube.NotOwned as exc:
            rt.emit(event_ref, "Warning", "NotOwned", f"{exc}: not deleted.")
    return deleted


def _expiry(job: FineTuneJob) -> float | None:
    """When the job's children are due for deletion (epoch seconds), or None."""
    ttl = job.spec.ttl_seconds_after_finished
    if ttl is None or not job.status.completion_time:
        return None
    return datetime.fromisoformat(job.status.completion_time).timestamp() + ttl


async def expire(rt: Runtime, job: FineTuneJob, now: float | None = None) -> bool:
    """Delete a finished job's children once ttlSecondsAfterFinished has passed; the FineTuneJob and its
    status stay. Only the job's own children (deterministic names, its uid as controller)."""
    due = _expiry(job)
    if due is None or (time.time() if now is None else now) < due or job.metadata.uid is None:
        return False
    names = builders.children(job)  # never a name from status: anything in the job's pods can write that
    namespace = job.metadata.namespace
    # The ConfigMap first: the RayJob (in kopf's index) marks a job whose children are not all gone yet.
    refs = [kube.Ref("v1", "ConfigMap", namespace, names.config_map) if names.config_map else None,
            kube.rayjob_ref(namespace, names.ray_job) if names.ray_job else None]
    gone = await delete_children(rt, ref_of(job), job.metadata.uid, [ref for ref in refs if ref is not None])
    deleted = [ref.kind for ref in gone]
    if deleted:
        rt.emit(ref_of(job), "Normal", "ChildrenDeleted",
                f"ttlSecondsAfterFinished passed: deleted {', '.join(deleted)} of {job.metadata.name}.")
    return bool(deleted)
