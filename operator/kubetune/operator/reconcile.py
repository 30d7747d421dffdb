"""Reconcile a FineTuneJob, in KubeRay's shape: observe its owned children -> decide the one step it
needs -> act, whatever called (its create/resume/update handlers, its RayJob's events, its timer).

- observe: the job's own RayJob, only by its deterministic name and the job's uid as controller (from the
  event that called, kopf's index of owned RayJobs, or, to confirm an absence, the API);
- decide (`decide`, pure): which `Step` the job's status, the trigger and the observation call for;
- act: one step; each writes the status at most once and creates children by deterministic name, so a
  crash at any point and a second call converge instead of duplicating.

No kopf here: waiting and rejection are the exceptions `WaitFor` and `Rejected`, which the handlers
translate into `kopf.TemporaryError` / `kopf.PermanentError`. Coroutines on the operator's one event loop,
serialised per object by kopf: nothing needs a lock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from kubetune.api.common import TERMINAL_PHASES, now_rfc3339
from kubetune.api.finetunejob import Children, FineTuneJob, Phase
from kubetune.contract.evalplan import evaljob_name
from kubetune.operator import builders, evalbuilders, kube
from kubetune.operator.jobs import (
    TIMER_INTERVAL,
    WAIT_FOR_MODEL_DELAY,
    Runtime,
    checkpoint_outside_output,
    delete_children,
    ensure_all_owned,
    finetunejob_status,
    indexed,
    ready,
    ref_of,
    write_status,
)
from kubetune.operator.kube import Obj
from kubetune.operator.status import (
    EventType,
    RayJobObservation,
    Reason,
    State,
    held_by_kueue,
    kueue_view,
    observe_rayjob,
)
from kubetune.operator.verdicts import Rejected, WaitFor, api_verdicts, too_large, truncated

log = logging.getLogger(__name__)

# kopf runs timers beside the change handlers, not after them: the launch handler gets this long to create
# a RayJob (its first attempt and its own retries) before the timer launches again.
LAUNCH_GRACE = max(TIMER_INTERVAL, 10.0)


class Trigger(StrEnum):
    """Why the reconcile runs."""

    START = "start"  # the job was created, or the operator (re)started: launch what is missing
    SPEC = "spec"  # the job's spec changed
    CHILD = "child"  # the job's RayJob changed
    TIMER = "timer"  # the periodic level-triggered pass (kopf.timer)


class Step(StrEnum):
    """What one reconcile does."""

    NOTHING = "nothing"
    LAUNCH = "launch"  # resolve the base model; record the children's names; create what is missing
    EVALUATE = "evaluate"  # a Succeeded job's spec.evaluation EvalJob (a crash may have come before it)
    FOLLOW = "follow"  # mirror the RayJob's status into the job's conditions
    SUSPEND = "suspend"  # pass spec.suspend on to the RayJob
    RECREATE = "recreate"  # the RayJob was deleted under a running job
    EXPIRE = "expire"  # ttlSecondsAfterFinished: delete a finished job's children


@dataclass(frozen=True)
class Observed:
    """What the reconcile saw of the job's owned children."""

    rayjob: Obj | None = None  # the job's own RayJob, when the caller or the API showed it
    rayjob_exists: bool = False  # it exists (kopf's index of owned RayJobs, or the body above)
    rayjob_missing: bool = False  # its absence was confirmed with the API
    suspend_changed: bool = False  # spec.suspend is what changed (Trigger.SPEC)


async def reconcile(rt: Runtime, job: FineTuneJob, trigger: Trigger, *, rayjob: Obj | None = None,
                    rayjob_indexed: bool = False, suspend_changed: bool = False) -> Step:
    """One ordered pass over the job: observe -> decide -> act. Returns the step taken.

    `rayjob`: the RayJob body of the event that called (Trigger.CHILD), or its identity and status from
    kopf's index of owned RayJobs (Trigger.TIMER); `rayjob_indexed`: that index holds one this job
    controls; `suspend_changed`: Trigger.SPEC's diff.
    Raises WaitFor (try again later) and Rejected (the job has failed; its status says why).
    """
    if trigger is Trigger.SPEC:
        job = restart_after_fix(job)
    seen = await observe(rt, job, trigger, rayjob, rayjob_indexed, suspend_changed)
    step = decide(job, trigger, seen)
    if step is Step.LAUNCH:
        await launch(rt, job)
    elif step is Step.EVALUATE:
        await ensure_evaluation(rt, job)
    elif step is Step.FOLLOW:
        assert seen.rayjob is not None
        if trigger is Trigger.TIMER:
            # The timer runs beside the RayJob's event handler: its repair writes only if the job is still
            # as it read it, so the two never write (and announce) one transition twice.
            try:
                await follow(rt, job, seen.rayjob, if_unchanged=True)
            except kube.KubeError as exc:
                if exc.status != 409:
                    raise
                return Step.NOTHING  # written since: the next pass looks again
        else:
            await follow(rt, job, seen.rayjob)
    elif step is Step.SUSPEND:
        await set_suspend(rt, job)
    elif step is Step.RECREATE:
        await recreate(rt, job)
    elif step is Step.EXPIRE:
        await expire(rt, job)
    return step


async def observe(rt: Runtime, job: FineTuneJob, trigger: Trigger, rayjob: Obj | None, rayjob_indexed: bool,
                  suspend_changed: bool) -> Observed:
    """The job's own RayJob as far as this pass needs it. Only an absence the timer would act on is
    confirmed with the API (kopf's index may lag behind a create), so a healthy job costs no request."""
    names = builders.children(job)
    if rayjob is not None and not kube.is_child(rayjob, names.ray_job, job.metadata.uid):
        rayjob = None  # labels are for people: only the job's own RayJob, by name and controller uid, counts
    exists = rayjob_indexed or rayjob is not None
    absent_by_design = builders.queued(job) and job.spec.suspend  # a suspended queued job has no RayJob
    if trigger is Trigger.TIMER and not exists and not absent_by_design and job.status.phase not in TERMINAL_PHASES \
            and started(job) and (
            job.status.ray_job_status is not None or _launched_before(job, time.time() - LAUNCH_GRACE)):
        # Not in kopf's index: confirm with the API. Once KubeRay has reported on it (rayJobStatus), a RayJob
        # not there was deleted; before, the launch handler creates it and retries that itself, for
        # LAUNCH_GRACE, after which the timer launches again.
        assert names.ray_job and job.metadata.uid
        rayjob = await rt.kube.get_owned(kube.rayjob_ref(job.metadata.namespace, names.ray_job),
                                         job.metadata.uid)
        return Observed(rayjob=rayjob, rayjob_exists=rayjob is not None, rayjob_missing=rayjob is None)
    return Observed(rayjob=rayjob, rayjob_exists=exists, suspend_changed=suspend_changed)


def decide(job: FineTuneJob, trigger: Trigger, seen: Observed) -> Step:
    """The one step the job needs now (pure)."""
    if job.status.phase in TERMINAL_PHASES:
        if trigger is Trigger.START and job.status.phase == Phase.SUCCEEDED:
            return Step.EVALUATE
        if trigger is Trigger.TIMER and seen.rayjob_exists:
            return Step.EXPIRE
        return Step.NOTHING
    queued_and_suspended = builders.queued(job) and job.spec.suspend
    if trigger is Trigger.CHILD:
        if queued_and_suspended:
            return Step.NOTHING  # its RayJob is being deleted (suspend_queued): nothing to mirror
        # Its own RayJob (by name and controller uid) reports: whatever status says of the children, they exist.
        return Step.FOLLOW if seen.rayjob is not None else Step.NOTHING
    if not started(job):
        return Step.LAUNCH if trigger in (Trigger.START, Trigger.SPEC) else Step.NOTHING
    if trigger is Trigger.START:
        return Step.LAUNCH  # the operator restarted: re-ensure what a crash may have left uncreated
    if trigger is Trigger.SPEC:
        return Step.SUSPEND if seen.suspend_changed else Step.NOTHING
    if queued_and_suspended:
        # A suspended queued job has no RayJob (Kueue would admit it): one still there is deleted again.
        return Step.SUSPEND if seen.rayjob_exists else Step.NOTHING
    if seen.rayjob is not None and (seen.rayjob.get("status") or {}).get("jobDeploymentStatus"):
        # What KubeRay reports, mirrored again: a status write after a watch event may have been lost
        # (follow writes only what changed, so a job already up to date costs nothing).
        return Step.FOLLOW
    if not seen.rayjob_missing:
        return Step.NOTHING
    if builders.queued(job) and job.status.phase in (Phase.QUEUED, Phase.SUSPENDED):
        # A queued job whose RayJob never ran since it was (re-)created: resumed after a suspension that deleted
        # it, or deleted while waiting in the queue. Created again, queued again; not a retry.
        return Step.LAUNCH
    # Deleted after KubeRay reported on it: a retry. Before: the launch did not finish (the RayJob deleted
    # before KubeRay saw it, or the launch still failing): launch again, as a restart would.
    return Step.RECREATE if job.status.ray_job_status is not None else Step.LAUNCH


def _launched_before(job: FineTuneJob, when: float) -> bool:
    start = job.status.start_time
    return start is not None and datetime.fromisoformat(start).timestamp() < when


def started(job: FineTuneJob) -> bool:
    """The operator has recorded children for the job: from here on its spec is frozen (CEL)."""
    return bool(job.status.start_time and job.status.children and job.status.children.ray_job)


def restart_after_fix(job: FineTuneJob) -> FineTuneJob:
    """A job whose spec changed: forget an earlier ValidationFailed verdict (on a spec it no longer has)."""
    verdict = ready(job.status.conditions)
    if job.status.phase == Phase.FAILED and verdict and verdict.reason == Reason.VALIDATION_FAILED:
        job.status.phase = None
    return job


# -- launch ----------------------------------------------------------------------------------------


async def launch(rt: Runtime, job: FineTuneJob) -> None:
    """Create the job's children (its identity, ConfigMap, RayJob) where they do not exist yet.

    Restart-safe: names are deterministic and recorded in status before anything is created, and "already
    exists" is read back and must be the job's own, so a crash at any point never makes a second RayJob.
    """
    base_model_uri = await _resolve_base_model(rt, job)
    names = builders.children(job)
    config_map = builders.config_map(job, names, base_model_uri)
    ray_job = builders.ray_job(job, names, base_model_uri)
    for child in (config_map, ray_job):
        if problem := too_large(child, job.spec.to_wire):
            await _fail(rt, job, Reason.API_REJECTED, problem)
    # Started already: an earlier attempt (a retry, a restart, the timer) has probably created the children.
    again = started(job)
    queue = job.spec.queue_name
    # A suspended queued job gets no RayJob until it is resumed: Kueue admits any queued RayJob it sees.
    hold = queue is not None and job.spec.suspend
    async with api_verdicts(lambda reason, message: _fail(rt, job, reason, message)):
        if not again:
            # Record the names before creating anything, so a crash leaves a trail to the children.
            if hold:
                state = State(Phase.SUSPENDED, Reason.SUSPENDED, f"Suspended before it was queued: RayJob "
                              f"{names.ray_job} is created, in Kueue LocalQueue {queue}, once spec.suspend is false.")
            elif queue is not None:
                state = State(Phase.QUEUED, Reason.QUEUED, f"Creating RayJob {names.ray_job} in Kueue LocalQueue "
                              f"{queue}.")
            else:
                state = State(Phase.PENDING, Reason.INITIALIZING, f"Creating RayJob {names.ray_job}.")
            # No Event here: the "Created" Event below reports this transition once the RayJob exists.
            await write_status(rt, job, state, event=hold, children=names.to_wire(), startTime=now_rfc3339(),
                               resolvedBaseModelUri=base_model_uri)
        # What the Ray cluster needs, at once (its identity, config and NetworkPolicy), then the RayJob.
        await ensure_all_owned(rt, [*builders.trainer_identity(job, names), config_map,
                                    *_network_policy(rt, job, names)], read_first=again)
        created = False if hold else await rt.kube.ensure_owned(ray_job, read_first=again)
    if created:
        where = f" in Kueue LocalQueue {queue}" if queue is not None else ""
        rt.emit(ref_of(job), EventType.NORMAL, Reason.CREATED, f"Created RayJob {names.ray_job}{where} "
                f"({job.spec.resources.workers} workers x {job.spec.resources.gpus_per_worker} "
                f"{job.spec.resources.gpu_type}).")


def _network_policy(rt: Runtime, job: FineTuneJob, names: Children) -> list[Obj]:
    """The Ray cluster's NetworkPolicy, unless the operator creates none (networkPolicy.enabled=false)."""
    if rt.kuberay_namespace is None:
        return []
    return [builders.training_network_policy(job, names, rt.kuberay_namespace)]


async def _resolve_base_model(rt: Runtime, job: FineTuneJob) -> str | None:
    """For a fineTuneJobRef, the referenced job's best checkpoint; waits until that job succeeded."""
    ref = job.spec.base_model.fine_tune_job_ref
    if ref is None:
        return None
    if ref.name == job.metadata.name:
        await _fail(rt, job, Reason.VALIDATION_FAILED,
                    "spec.baseModel.fineTuneJobRef: a FineTuneJob cannot use itself")
    body = indexed(rt.finetunejobs, (job.metadata.namespace, ref.name))
    if body is None:
        try:
            body = await rt.kube.get(kube.ftj_ref(job.metadata.namespace, ref.name))
        except kube.NotFound:
            body = None
    other = finetunejob_status(body)
    if body is not None and other.phase == Phase.SUCCEEDED:
        if other.best_checkpoint is None:
            await _fail(rt, job, Reason.BASE_MODEL_UNAVAILABLE,
                        f"FineTuneJob {ref.name} succeeded but reported no best checkpoint.")
        assert other.best_checkpoint is not None
        if problem := checkpoint_outside_output(body, other.best_checkpoint.uri):
            await _fail(rt, job, Reason.BASE_MODEL_UNAVAILABLE, f"spec.baseModel.fineTuneJobRef: {problem}")
        return other.best_checkpoint.uri
    if body is not None and other.phase in TERMINAL_PHASES:
        await _fail(rt, job, Reason.BASE_MODEL_UNAVAILABLE, f"FineTuneJob {ref.name} ended {other.phase}.")
    await _check_deadline_while_waiting(rt, job)
    why = "does not exist yet" if body is None else f"is {other.phase or Phase.PENDING}"
    message = f"Waiting for FineTuneJob {ref.name}, which {why}, to succeed."
    verdict = ready(job.status.conditions)
    if job.status.phase != Phase.WAITING or verdict is None or verdict.reason != Reason.WAITING_FOR_MODEL:
        await write_status(rt, job, State(Phase.WAITING, Reason.WAITING_FOR_MODEL, message))
    raise WaitFor(message, WAIT_FOR_MODEL_DELAY)


async def _check_deadline_while_waiting(rt: Runtime, job: FineTuneJob) -> None:
    deadline = job.spec.active_deadline_seconds
    created = (indexed(rt.finetunejobs, (job.metadata.namespace, job.metadata.name)) or {}).get(
        "metadata", {}).get("creationTimestamp")
    if deadline is None or not created:
        return
    age = time.time() - datetime.fromisoformat(created).timestamp()
    if age > deadline:
        await _fail(rt, job, Reason.DEADLINE_EXCEEDED,
                    f"activeDeadlineSeconds ({deadline}s) passed while waiting for the base model.")


async def _fail(rt: Runtime, job: FineTuneJob, reason: str, message: str) -> None:
    """Record a Failed verdict and stop this reconcile (`Rejected`)."""
    await write_status(rt, job, State(Phase.FAILED, reason, message), completionTime=now_rfc3339())
    raise Rejected(message)


# -- follow the RayJob -----------------------------------------------------------------------------


async def follow(rt: Runtime, job: FineTuneJob, rayjob: Obj, if_unchanged: bool = False) -> None:
    """Mirror the job's RayJob's status into its conditions (at most one status write; `if_unchanged`: only
    onto the job as read)."""
    obs = observe_rayjob(rayjob)
    if obs is None:
        return
    ray_job_status = "/".join(s for s in (obs.deployment_status, obs.job_status) if s) or None
    verdict = ready(job.status.conditions)
    state = _queued_state(job, rayjob, obs) or obs.state
    unchanged = (
        job.status.phase == state.phase
        and (verdict.reason if verdict else None) == state.reason
        and job.status.ray_job_status == ray_job_status
        and obs.retries <= (job.status.retries or 0)
        and (job.status.children is None or job.status.children.ray_cluster == obs.ray_cluster)
    )
    if unchanged:
        return
    children = (job.status.children or builders.children(job)).model_copy(update={"ray_cluster": obs.ray_cluster})
    evaluate = state.phase == Phase.SUCCEEDED and job.spec.evaluation is not None
    if evaluate:  # recorded with the Succeeded verdict, before the EvalJob is created
        children = children.model_copy(update={"eval_job": evaljob_name(job.metadata.name)})
    await write_status(rt, job, state, if_unchanged=if_unchanged, children=children.to_wire(),
                       rayJobStatus=ray_job_status, retries=max(job.status.retries or 0, obs.retries) or None,
                       completionTime=_completion(obs))
    if evaluate:
        job.status.children = children
        await ensure_evaluation(rt, job)


def _queued_state(job: FineTuneJob, rayjob: Obj, obs: RayJobObservation) -> State | None:
    """A queued job's state while Kueue holds its RayJob (Queued, Preempted) or has just admitted it (Admitted);
    None where KubeRay's own state says more."""
    queue, name = job.spec.queue_name, builders.children(job).ray_job
    if queue is None or name is None or obs.state.terminal:
        return None
    verdict = ready(job.status.conditions)
    reason = verdict.reason if verdict else None
    admitted_before = job.status.phase == Phase.RUNNING or reason in (Reason.ADMITTED, Reason.PREEMPTED)
    view = kueue_view(held_by_kueue(rayjob), obs.deployment_status, name, queue, admitted_before,
                      obs.state.message)
    if view is None:
        return None
    return State(Phase.QUEUED if view.held else Phase.PENDING, view.reason, view.message)


def _completion(obs: RayJobObservation) -> str | None:
    if not obs.state.terminal:
        return None
    return obs.end_time or now_rfc3339()


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
        rt.emit(ref_of(job), EventType.WARNING, Reason.EVALUATION_INVALID,
                f"EvalJob {job.status.children.eval_job} was rejected: {truncated(exc.message)}")
        return
    except kube.NotOwned as exc:  # the training stands; the evaluation cannot be ours
        rt.emit(ref_of(job), EventType.WARNING, Reason.CHILD_CONFLICT, f"{exc}: no evaluation was created.")
        return
    if created:
        rt.emit(ref_of(job), EventType.NORMAL, Reason.EVALUATION_CREATED, f"Created EvalJob "
                f"{job.status.children.eval_job}: the best checkpoint against {base} few-shot.")


# -- suspend ---------------------------------------------------------------------------------------


async def set_suspend(rt: Runtime, job: FineTuneJob) -> None:
    """Pass spec.suspend on to the RayJob (KubeRay deletes or recreates the Ray cluster); for a queued job,
    delete or re-create its RayJob (`suspend_queued`)."""
    names = builders.children(job)  # never a name from status: anything in the job's pods can write that
    if names.ray_job is None or job.metadata.uid is None:
        return
    if builders.queued(job):
        await suspend_queued(rt, job, names)
        return
    ref = kube.rayjob_ref(job.metadata.namespace, names.ray_job)
    try:
        if not await rt.kube.patch_owned(ref, job.metadata.uid, {"spec": {"suspend": job.spec.suspend}}):
            return  # not created yet: launch builds it with the current spec.suspend
    except kube.NotOwned as exc:
        rt.emit(ref_of(job), EventType.WARNING, Reason.NOT_OWNED, f"{exc}: left as it is.")
        return
    reason = Reason.SUSPENDING if job.spec.suspend else Reason.RESUMING
    rt.emit(ref_of(job), EventType.NORMAL, reason, f"{reason} RayJob {names.ray_job}.")


async def suspend_queued(rt: Runtime, job: FineTuneJob, names: Children) -> None:
    """spec.suspend of a queued job. Kueue owns a queued RayJob's spec.suspend (it unsuspends what it admits and
    suspends again what it preempts), so kubetune never writes it: suspending deletes the RayJob (Kueue's
    Workload goes with it and the quota is freed), resuming creates it again, suspended, at the back of the
    queue. A suspended RayJob restarts its Ray job from the beginning anyway; nothing else is lost."""
    assert names.ray_job and job.metadata.uid
    ref = kube.rayjob_ref(job.metadata.namespace, names.ray_job)
    queue = job.spec.queue_name
    if job.spec.suspend:
        try:
            deleted = await rt.kube.delete_owned(ref, job.metadata.uid)
        except kube.NotOwned as exc:
            rt.emit(ref_of(job), EventType.WARNING, Reason.NOT_OWNED, f"{exc}: left as it is.")
            return
        if deleted:
            rt.emit(ref_of(job), EventType.NORMAL, Reason.SUSPENDING, f"Deleted RayJob {names.ray_job}, leaving "
                    f"Kueue LocalQueue {queue}; resuming queues it again.")
        verdict = ready(job.status.conditions)
        if job.status.phase != Phase.SUSPENDED or verdict is None or verdict.reason != Reason.SUSPENDED:
            await write_status(rt, job, State(Phase.SUSPENDED, Reason.SUSPENDED, f"Suspended: RayJob "
                                              f"{names.ray_job} is deleted (out of Kueue LocalQueue {queue})."))
        return
    existing = await rt.kube.get_owned(ref, job.metadata.uid)
    if existing is not None and (existing.get("metadata") or {}).get("deletionTimestamp"):
        raise WaitFor(f"RayJob {names.ray_job} of the suspension is still being deleted.", 2.0)
    base_model_uri = job.status.resolved_base_model_uri
    async with api_verdicts(lambda reason, message: _fail(rt, job, reason, message)):
        await ensure_all_owned(rt, [*builders.trainer_identity(job, names),
                                    builders.config_map(job, names, base_model_uri), *_network_policy(rt, job, names)],
                               read_first=True)
        created = await rt.kube.ensure_owned(builders.ray_job(job, names, base_model_uri), read_first=True)
        await write_status(rt, job, State(Phase.QUEUED, Reason.QUEUED, f"RayJob {names.ray_job} waits in Kueue "
                                          f"LocalQueue {queue} for admission."), event=False)
    if created:
        rt.emit(ref_of(job), EventType.NORMAL, Reason.RESUMING, f"Created RayJob {names.ray_job} again in Kueue "
                f"LocalQueue {queue}.")


# -- the timer: level-triggered repair and ttlSecondsAfterFinished ---------------------------------


async def recreate(rt: Runtime, job: FineTuneJob) -> None:
    """The job's RayJob is gone while the job runs (deleted by hand, by a namespace cleanup, ...): create it
    again while spec.backoffLimit allows, counting in status.retries, else fail with RayJobDeleted."""
    names = builders.children(job)
    retries = (job.status.retries or 0) + 1
    if retries > job.spec.backoff_limit:
        await _fail(rt, job, Reason.RAYJOB_DELETED, f"RayJob {names.ray_job} was deleted while the job was "
                    f"{job.status.phase or Phase.PENDING}, and backoffLimit ({job.spec.backoff_limit}) allows "
                    "no more attempts.")
    base_model_uri = job.status.resolved_base_model_uri
    async with api_verdicts(lambda reason, message: _fail(rt, job, reason, message)):
        await ensure_all_owned(rt, [*builders.trainer_identity(job, names),  # still there, most likely
                                    builders.config_map(job, names, base_model_uri), *_network_policy(rt, job, names)],
                               read_first=True)
        await rt.kube.ensure_owned(builders.ray_job(job, names, base_model_uri))
        state = State(Phase.PENDING, Reason.INITIALIZING,
                      f"Re-created RayJob {names.ray_job} (attempt {retries + 1}).")
        await write_status(rt, job, state, event=False, retries=retries)
    rt.emit(ref_of(job), EventType.WARNING, Reason.CHILD_RECREATED, f"RayJob {names.ray_job} was deleted "
            f"while the job ran; re-created it (retry {retries} of {job.spec.backoff_limit}).")


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
            kube.Ref("networking.k8s.io/v1", "NetworkPolicy", namespace, names.ray_job) if names.ray_job else None,
            kube.rayjob_ref(namespace, names.ray_job) if names.ray_job else None]
    gone = await delete_children(rt, ref_of(job), job.metadata.uid, [ref for ref in refs if ref is not None])
    deleted = [ref.kind for ref in gone]
    if deleted:
        rt.emit(ref_of(job), EventType.NORMAL, Reason.CHILDREN_DELETED,
                f"ttlSecondsAfterFinished passed: deleted {', '.join(deleted)} of {job.metadata.name}.")
    return bool(deleted)
