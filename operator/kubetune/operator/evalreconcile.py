"""Reconcile an EvalJob: resolve its candidates, serve them, run the evaluation, judge the result.

Level-triggered: `advance` looks at the EvalJob and its children as they are now and takes the next
step, whoever calls it (the EvalJob's create/resume/update handlers, its RayServices' and RayJob's
events, its timer). The steps:

1. candidates: a fineTuneJobRef waits (Waiting/WaitingForModel) until that FineTuneJob succeeded and
   serves its best checkpoint; `name` serves a Hub id, `uri` a model directory; an endpoint's API-key
   Secret must exist: Waiting/SecretNotFound for a grace period after the EvalJob's creation
   (`$KUBETUNE_SECRET_WAIT_SECONDS`, 300 s: GitOps tools and secret operators often create the Secret a
   little later), then Failed/SecretNotFound. Where the operator may not read Secrets (cluster-wide
   installs), the evaluator finds the key missing instead and fails naming the same field;
2. the children's names and startTime are recorded (Serving/CreatingServices), then the ConfigMap with
   the resolved plan and one RayService per served candidate are created;
3. once every RayService is ready (Serving/WaitingForServices until then), the evaluation RayJob is
   created (Evaluating); the evaluator writes per-candidate metrics and the gate's verdict into status;
4. the RayJob's end decides: results and a passed gate (or no gate) -> Succeeded; gate not met ->
   Failed/GateFailed; no results or a failed RayJob -> Failed/EvaluationFailed. The RayServices are then
   deleted unless spec.keepServing.

Same rules as `reconcile`: deterministic names recorded before creation, "already exists" is success,
one status write per call, waiting is `WaitFor`, a verdict that stops the job is `Rejected`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from kubetune.api import finetunejob
from kubetune.api.common import TERMINAL_PHASES, now_rfc3339
from kubetune.api.evaljob import EvalChildren, EvalJob, EvalJobStatus, GateResult, Phase
from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract.evalplan import (
    DEFAULT_METRICS,
    EvalPlan,
    cluster_base_url,
    judge_gate,
    plan,
    service_name,
)
from kubetune.operator import evalbuilders, kube
from kubetune.operator.evalstatus import State, observe_rayservice
from kubetune.operator.jobs import (
    WAIT_FOR_MODEL_DELAY,
    Runtime,
    checkpoint_outside_output,
    delete_children,
    ensure_identity,
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
    held_by_kueue,
    kueue_view,
    observe_rayjob,
)
from kubetune.operator.verdicts import Rejected, WaitFor, api_verdicts, too_large

log = logging.getLogger(__name__)

SECRET_WAIT_SECONDS = float(os.environ.get("KUBETUNE_SECRET_WAIT_SECONDS", "300"))


def started(job: EvalJob) -> bool:
    """The operator has recorded the children: from here on the spec is frozen (CEL) and serving is on."""
    return bool(job.status.start_time and job.status.children and job.status.children.config_map)


def restart_after_fix(job: EvalJob) -> EvalJob:
    """A not-yet-started EvalJob whose spec changed: forget an earlier verdict on the spec it had
    (ValidationFailed, or SecretNotFound for a Secret it named)."""
    verdict = ready(job.status.conditions)
    if job.status.phase == Phase.FAILED and verdict and verdict.reason in (Reason.VALIDATION_FAILED,
                                                                             Reason.SECRET_NOT_FOUND):
        job.status.phase = None
    return job


async def _write_if_changed(rt: Runtime, job: EvalJob, state: State, event: bool = True,
                            **facts: Any) -> None:
    """`_write`, unless status already says exactly this (events may repeat; writes should not)."""
    verdict = ready(job.status.conditions)
    recorded = (job.status.phase, verdict.reason, verdict.message) if verdict else (job.status.phase, None, None)
    if recorded == (state.phase, state.reason, state.message) and all(
            job.status.model_dump(by_alias=True).get(k) == v for k, v in facts.items()):
        return
    await write_status(rt, job, state, event=event, **facts)


async def _fail(rt: Runtime, job: EvalJob, reason: str, message: str, stop_evaluation: bool = False) -> None:
    """Record a Failed verdict, tear serving down, and stop this reconcile (`Rejected`)."""
    await write_status(rt, job, State(Phase.FAILED, reason, message), completionTime=now_rfc3339())
    if started(job):
        await _teardown(rt, job, stop_evaluation)
    raise Rejected(message)


# -- the entry point -------------------------------------------------------------------------------


async def advance(rt: Runtime, namespace: str, name: str, *, after_fix: bool = False,
                  uid: str | None = None) -> None:
    """Take the EvalJob's next step, from its current state as the API has it.

    Its own handlers, its timer and its children's events may call this at the same time: every step is
    idempotent (children by deterministic name, "already exists" checked for ownership, status writes
    computed from what is observed), so concurrent calls converge instead of duplicating.
    Raises WaitFor (try again later) and Rejected (the EvalJob has failed).
    """
    try:
        body = await rt.kube.get(kube.evj_ref(namespace, name))
    except kube.NotFound:
        return
    if uid is not None and (body.get("metadata") or {}).get("uid") != uid:
        return  # a child's controller reference names another (e.g. deleted and re-created) EvalJob
    try:
        job = EvalJob.from_body(body)
    except ValidationError:
        return  # the launch handler rejects it
    if after_fix:
        restart_after_fix(job)
    await _advance(rt, job, (body.get("metadata") or {}).get("creationTimestamp"))


async def _advance(rt: Runtime, job: EvalJob, created: str | None) -> None:
    if job.status.phase in TERMINAL_PHASES:
        return
    await _check_deadline(rt, job, created)
    names = evalbuilders.children(job)  # never names from status: anything in the job's pods can write that
    async with api_verdicts(lambda reason, message: _fail(rt, job, reason, message, stop_evaluation=True)):
        if not started(job):
            await _start(rt, job, names, created)
            return
        await _progress(rt, job, names)


async def _check_deadline(rt: Runtime, job: EvalJob, created: str | None) -> None:
    """activeDeadlineSeconds counts from the EvalJob's creation, waiting for its models included."""
    deadline = job.spec.active_deadline_seconds
    if deadline is None or not created:
        return
    if time.time() - datetime.fromisoformat(created).timestamp() > deadline:
        await _fail(rt, job, Reason.DEADLINE_EXCEEDED, f"activeDeadlineSeconds ({deadline}s) passed while "
                    f"{(job.status.phase or 'Pending').lower()}.", stop_evaluation=True)


# -- 1 + 2: resolve the candidates, record the children, create them -------------------------------


async def _start(rt: Runtime, job: EvalJob, names: EvalChildren, created: str | None) -> None:
    resolved = await _resolved_plan(rt, job)
    await _check_secrets(rt, job, created)
    # Record the names before creating anything, so a crash leaves a trail to the children.
    facts: dict[str, Any] = {"children": names.to_wire(), "startTime": job.status.start_time or now_rfc3339(),
                             "candidateCount": len(job.spec.candidates)}
    if names.ray_services:
        creating = State(Phase.SERVING, Reason.CREATING_SERVICES,
                         f"Creating RayServices {', '.join(names.ray_services)}.")
        await write_status(rt, job, creating, event=False, **facts)
    else:  # only external endpoints: nothing to serve, straight to the evaluation
        await write_status(rt, job, _evaluation_created(job, names, f"Creating RayJob {names.ray_job}."),
                           event=False, **facts)
    config_map = evalbuilders.plan_config_map(job, names, resolved)
    if problem := too_large(config_map, job.spec.to_wire):
        await _fail(rt, job, Reason.API_REJECTED, problem)
    await ensure_identity(rt, evalbuilders.evaluator_identity(job, names))
    await _ensure_network_policies(rt, job, names)  # before the pods they protect
    await rt.kube.ensure_owned(config_map)
    await _ensure_services(rt, job, resolved)
    if not names.ray_services:
        await _ensure_evaluation(rt, job, names, resolved)
    # From here the RayServices' (or the RayJob's) events advance the EvalJob.


async def _resolved_plan(rt: Runtime, job: EvalJob) -> EvalPlan:
    """The plan with every candidate resolved; waits for referenced FineTuneJobs to succeed."""
    namespace = job.metadata.namespace
    model_uris: dict[str, str] = {}
    fine_tune_jobs: dict[str, FineTuneJob] = {}
    waiting: list[str] = []
    for i, c in enumerate(job.spec.candidates):
        model = c.model
        if model.fine_tune_job_ref is not None:
            ref = model.fine_tune_job_ref.name
            where = f"spec.candidates[{i}].model.fineTuneJobRef"
            body = await _fine_tune_job(rt, namespace, ref)
            other = finetunejob_status(body)
            if body is None or other.phase not in TERMINAL_PHASES:
                why = "does not exist yet" if body is None else other.phase or finetunejob.Phase.PENDING
                waiting.append(f"{ref} ({why})")
                continue
            if other.phase != finetunejob.Phase.SUCCEEDED:
                await _fail(rt, job, Reason.MODEL_UNAVAILABLE, f"{where}: FineTuneJob {ref} ended {other.phase}.")
            if other.best_checkpoint is None:
                await _fail(rt, job, Reason.MODEL_UNAVAILABLE,
                            f"{where}: FineTuneJob {ref} succeeded but reported no best checkpoint.")
            assert other.best_checkpoint is not None
            if problem := checkpoint_outside_output(body, other.best_checkpoint.uri):
                await _fail(rt, job, Reason.MODEL_UNAVAILABLE, f"{where}: {problem}")
            try:
                fine_tune_jobs[ref] = FineTuneJob.from_body(body)
            except ValidationError:
                await _fail(rt, job, Reason.MODEL_UNAVAILABLE,
                            f"{where}: the spec of FineTuneJob {ref} does not parse.")
            model_uris[c.name] = other.best_checkpoint.uri
        elif model.uri is not None:
            model_uris[c.name] = model.uri
        elif model.name is not None:
            model_uris[c.name] = model.name
    if waiting:
        message = f"Waiting for FineTuneJob {', '.join(waiting)} to succeed."
        await _write_if_changed(rt, job, State(Phase.WAITING, Reason.WAITING_FOR_MODEL, message))
        raise WaitFor(message, WAIT_FOR_MODEL_DELAY)
    name, namespace = job.metadata.name, job.metadata.namespace
    base_urls = {c.name: cluster_base_url(service_name(name, c.name), namespace)
                 for c in job.spec.candidates if c.model.served}
    return plan(job, model_uris, fine_tune_jobs, base_urls)


async def _fine_tune_job(rt: Runtime, namespace: str, name: str) -> Obj | None:
    """The FineTuneJob from the cache when it has finished there, else fresh from the API."""
    body = indexed(rt.finetunejobs, (namespace, name))
    if body is not None and finetunejob_status(body).phase in TERMINAL_PHASES:
        return body
    try:
        return await rt.kube.get(kube.ftj_ref(namespace, name))
    except kube.NotFound:
        return None


async def _check_secrets(rt: Runtime, job: EvalJob, created: str | None) -> None:
    """Every endpoint's API-key Secret and every served candidate's token Secret, and their keys, exist; waits (Waiting/SecretNotFound) until they do, for
    SECRET_WAIT_SECONDS after the EvalJob's creation, then fails (Failed/SecretNotFound).

    A 403 means the operator may not read Secrets here (cluster-wide installs): it cannot verify, and
    goes on; the evaluator then finds the key missing (the pod's secretKeyRef is optional) and fails the
    evaluation with the same field named.
    """
    refs = [(f"spec.candidates[{i}].model.endpoint.apiKeySecretRef", c.model.endpoint.api_key_secret_ref)
            for i, c in enumerate(job.spec.candidates) if c.model.endpoint]
    refs += [(f"spec.candidates[{i}].model.tokenSecretRef", c.model.token_secret_ref)
             for i, c in enumerate(job.spec.candidates)]
    for where, ref in refs:
        if ref is None:
            continue
        try:
            secret = await rt.kube.get(kube.secret_ref(job.metadata.namespace, ref.name))
        except kube.NotFound:
            problem = f'{where}: Secret "{ref.name}" not found'
        except kube.KubeError as exc:
            if exc.status != 403:
                raise
            log.info("cannot read Secret %s/%s to verify %s: %s", job.metadata.namespace, ref.name, where,
                     exc)
            continue
        else:
            if ref.key in (secret.get("data") or {}) or ref.key in (secret.get("stringData") or {}):
                continue
            problem = f'{where}: Secret "{ref.name}" has no key "{ref.key}"'
        waited = time.time() - datetime.fromisoformat(created).timestamp() if created else 0.0
        if waited >= SECRET_WAIT_SECONDS:
            await _fail(rt, job, Reason.SECRET_NOT_FOUND, f"{problem} ({SECRET_WAIT_SECONDS:g}s after the EvalJob was "
                        "created). Create it, then delete and re-create the EvalJob.")
        await _write_if_changed(rt, job, State(Phase.WAITING, Reason.SECRET_NOT_FOUND, problem))
        raise WaitFor(problem, min(WAIT_FOR_MODEL_DELAY, max(1.0, SECRET_WAIT_SECONDS - waited)))


async def _ensure_network_policies(rt: Runtime, job: EvalJob, names: EvalChildren) -> None:
    if rt.kuberay_namespace is not None:
        for policy in evalbuilders.network_policies(job, names, rt.kuberay_namespace):
            await rt.kube.ensure_owned(policy)


async def _ensure_services(rt: Runtime, job: EvalJob, resolved: EvalPlan) -> None:
    created = [p.service for p in resolved.candidates
               if p.served and p.service and await rt.kube.ensure_owned(evalbuilders.ray_service(job, p))]
    if created:
        serving = job.spec.serving
        gpus = f"{serving.gpus_per_replica} {serving.gpu_type}" if serving.gpus_per_replica else "CPU"
        rt.emit(ref_of(job), EventType.NORMAL, Reason.CREATED,
                f"Created RayService {', '.join(created)} ({serving.replicas} replica(s) x {gpus} each).")


async def _plan(rt: Runtime, job: EvalJob, names: EvalChildren) -> EvalPlan:
    """The plan in the EvalJob's ConfigMap (resolved when serving started); resolved again if it is gone."""
    assert names.config_map
    assert job.metadata.uid
    ref = kube.Ref("v1", "ConfigMap", job.metadata.namespace, names.config_map)
    try:
        config = await rt.kube.get_owned(ref, job.metadata.uid)
        if config is not None:
            stored: EvalPlan = EvalPlan.from_wire(json.loads((config.get("data") or {})[evalbuilders.PLAN_KEY]))
            return stored
    except (KeyError, ValueError):
        pass
    resolved = await _resolved_plan(rt, job)
    await rt.kube.ensure_owned(evalbuilders.plan_config_map(job, names, resolved))
    return resolved


async def _ensure_evaluation(rt: Runtime, job: EvalJob, names: EvalChildren, resolved: EvalPlan) -> bool:
    await ensure_identity(rt, evalbuilders.evaluator_identity(job, names))
    await _ensure_network_policies(rt, job, names)
    if not await rt.kube.ensure_owned(evalbuilders.eval_ray_job(job, names, resolved)):
        return False
    rt.emit(ref_of(job), EventType.NORMAL, Reason.CREATED, f"Created RayJob {names.ray_job} to evaluate "
            f"{len(job.spec.candidates)} candidate(s) on {job.spec.scorer.name}.")
    return True


# -- 3 + 4: follow serving and the evaluation: observe -> decide -> act ------------------------------


class Step(StrEnum):
    """What one pass over a started EvalJob does."""

    SERVING_FAILED = "servingFailed"  # a RayService's application failed to deploy: Failed
    SERVICE_DELETED = "serviceDeleted"  # one was deleted after all were ready: count a retry, re-create it
    CREATE_SERVICES = "createServices"  # some do not exist (a crash before creation, a deletion before ready)
    WAIT_FOR_SERVICES = "waitForServices"
    EVALUATION_DELETED = "evaluationDeleted"  # the RayJob KubeRay had reported on is gone: retry, re-create
    CREATE_EVALUATION = "createEvaluation"
    FINISH = "finish"  # the evaluation RayJob succeeded: judge the results
    EVALUATION_FAILED = "evaluationFailed"
    QUEUED = "queued"  # Kueue holds the evaluation RayJob (spec.queueName) and has not admitted it yet
    PREEMPTED = "preempted"  # Kueue suspended the evaluation RayJob again after admitting it
    EVALUATING = "evaluating"
    NOTHING = "nothing"  # the RayJob's status describes an older generation


@dataclass(frozen=True)
class ServiceSeen:
    """One RayService of the EvalJob as observed."""

    name: str
    exists: bool
    ready: bool | None  # observe_rayservice: True serving, False failed for good, None not yet
    message: str


@dataclass(frozen=True)
class Observed:
    """The EvalJob's own children as the API has them (by deterministic name and its uid as controller)."""

    services: list[ServiceSeen]
    rayjob_exists: bool = False  # observed only once every RayService is ready
    rayjob: RayJobObservation | None = None  # None also while its status describes an older generation
    rayjob_held: bool = False  # its spec.suspend: Kueue holds it (a queued RayJob; kubetune never sets it false)


async def _observe(rt: Runtime, job: EvalJob, names: EvalChildren) -> Observed:
    assert names.ray_job and job.metadata.uid
    namespace, uid = job.metadata.namespace, job.metadata.uid
    services = []
    for svc in names.ray_services:
        service = await rt.kube.get_owned(kube.rayservice_ref(namespace, svc), uid)
        if service is None:
            services.append(ServiceSeen(svc, False, None, f"RayService {svc} does not exist yet."))
        else:
            services.append(ServiceSeen(svc, True, *observe_rayservice(service)))
    if not all(s.ready for s in services):
        return Observed(services)
    rayjob = await rt.kube.get_owned(kube.rayjob_ref(namespace, names.ray_job), uid)
    if rayjob is None:
        return Observed(services)
    return Observed(services, True, observe_rayjob(rayjob), held_by_kueue(rayjob))


def decide(job: EvalJob, seen: Observed) -> tuple[Step, str]:
    """The step a started EvalJob needs, with the message that goes with it (pure)."""
    failed = next((s for s in seen.services if s.ready is False), None)
    if failed is not None:
        return Step.SERVING_FAILED, failed.message
    not_ready = [s for s in seen.services if not s.ready]
    if not_ready:
        total = len(seen.services)
        waiting = f"{total - len(not_ready)}/{total} RayServices ready. {not_ready[0].message}"
        if all(s.exists for s in seen.services):
            return Step.WAIT_FOR_SERVICES, waiting
        # Every RayService was ready once the job is Evaluating: a missing one was deleted since. Before, a
        # crash came before it was created, or it was deleted before it was ready: serving is not finished.
        return (Step.SERVICE_DELETED if job.status.phase == Phase.EVALUATING else Step.CREATE_SERVICES), waiting
    if not seen.rayjob_exists:
        # KubeRay had reported on it (rayJobStatus): it was deleted. Else it was never created.
        return (Step.EVALUATION_DELETED if job.status.ray_job_status is not None else Step.CREATE_EVALUATION), ""
    obs = seen.rayjob
    if obs is None:
        return Step.NOTHING, ""
    if obs.state.phase == finetunejob.Phase.SUCCEEDED:
        return Step.FINISH, ""
    if obs.state.terminal:
        return Step.EVALUATION_FAILED, obs.state.message
    name = evalbuilders.children(job).ray_job or ""
    if job.spec.queue_name is not None:
        verdict = ready(job.status.conditions)
        admitted_before = (verdict is not None and verdict.reason in (Reason.ADMITTED, Reason.PREEMPTED)) or (
            job.status.phase == Phase.EVALUATING and job.status.ray_job_status is not None)
        view = kueue_view(seen.rayjob_held, obs.deployment_status, name, job.spec.queue_name, admitted_before,
                          obs.state.message)
        if view is not None and view.held:
            return (Step.PREEMPTED if view.reason == Reason.PREEMPTED else Step.QUEUED), view.message
        if view is not None:
            return Step.EVALUATING, view.message
    return Step.EVALUATING, ("The evaluation is running." if obs.state.phase == finetunejob.Phase.RUNNING
                             else f"RayJob {name}: {obs.state.message}")


async def _progress(rt: Runtime, job: EvalJob, names: EvalChildren) -> None:
    seen = await _observe(rt, job, names)
    step, message = decide(job, seen)
    obs = seen.rayjob
    ray_job_status = ("/".join(s for s in (obs.deployment_status, obs.job_status) if s) or None) if obs else None
    if step is Step.SERVING_FAILED:
        await _fail(rt, job, Reason.SERVING_FAILED, message)
    elif step in (Step.SERVICE_DELETED, Step.CREATE_SERVICES, Step.WAIT_FOR_SERVICES):
        if step is Step.SERVICE_DELETED:
            await _child_deleted(rt, job, Reason.SERVING_DELETED, "a RayService")
        if step is not Step.WAIT_FOR_SERVICES:  # (a crash may also have come before the identity's creation)
            await ensure_identity(rt, evalbuilders.evaluator_identity(job, names))
            await _ensure_network_policies(rt, job, names)
            await _ensure_services(rt, job, await _plan(rt, job, names))
        await _write_if_changed(rt, job, State(Phase.SERVING, Reason.WAITING_FOR_SERVICES, message))
    elif step in (Step.EVALUATION_DELETED, Step.CREATE_EVALUATION):
        if step is Step.CREATE_EVALUATION:
            # Passes run side by side (the EvalJob's timer, its children's events): this one may have read the
            # EvalJob before KubeRay's first report on the RayJob was recorded, and the RayJob after it was
            # deleted. Read the EvalJob again before taking a missing RayJob for one never created.
            fresh = EvalJobStatus.from_wire(dict((await rt.kube.get(
                kube.evj_ref(job.metadata.namespace, job.metadata.name))).get("status") or {}))
            if fresh.ray_job_status is not None:
                job.status, step = fresh, Step.EVALUATION_DELETED
        if step is Step.EVALUATION_DELETED:
            await _child_deleted(rt, job, Reason.RAYJOB_DELETED, f"RayJob {names.ray_job}")
        await _ensure_evaluation(rt, job, names, await _plan(rt, job, names))
        created = _evaluation_created(job, names, f"Created RayJob {names.ray_job}; waiting for its Ray cluster.")
        await _write_if_changed(rt, job, created, event=False)
    elif step is Step.FINISH:
        assert obs is not None
        await _finish(rt, job, ray_job_status, obs.end_time)
    elif step is Step.EVALUATION_FAILED:
        assert obs is not None
        # What the evaluator said (a field or row it could not use) beats the RayJob's generic message.
        error = job.status.evaluation_error or await _evaluation_error(rt, job)
        why = f" ({obs.state.reason})" if obs.state.reason not in ("", Reason.CANCELLED) else ""
        await _fail(rt, job, Reason.EVALUATION_FAILED,
                    f"RayJob {names.ray_job} ended {ray_job_status or 'Failed'}{why}: {error or message}")
    elif step in (Step.QUEUED, Step.PREEMPTED):
        reason = Reason.PREEMPTED if step is Step.PREEMPTED else Reason.QUEUED
        await _write_if_changed(rt, job, State(Phase.QUEUED, reason, message), rayJobStatus=ray_job_status)
    elif step is Step.EVALUATING:
        await _write_if_changed(rt, job, State(Phase.EVALUATING, Reason.EVALUATING, message),
                                rayJobStatus=ray_job_status)


def _evaluation_created(job: EvalJob, names: EvalChildren, message: str) -> State:
    """The state once the evaluation RayJob is (being) created: Queued where Kueue admits it, else Evaluating."""
    if job.spec.queue_name is not None:
        return State(Phase.QUEUED, Reason.QUEUED, f"RayJob {names.ray_job} waits in Kueue LocalQueue "
                     f"{job.spec.queue_name} for admission.")
    return State(Phase.EVALUATING, Reason.EVALUATING, message)


async def _child_deleted(rt: Runtime, job: EvalJob, reason: str, what: str) -> None:
    """A child was deleted while the EvalJob ran: count a retry (the caller re-creates it) while
    spec.backoffLimit allows, else fail with `reason`."""
    retries = (job.status.retries or 0) + 1
    if retries > job.spec.backoff_limit:
        await _fail(rt, job, reason, f"{what} was deleted while the EvalJob was {job.status.phase}, and "
                    f"backoffLimit ({job.spec.backoff_limit}) allows no more attempts.", stop_evaluation=True)
    await write_status(rt, job, State(Phase.SERVING, Reason.WAITING_FOR_SERVICES, f"Re-creating {what} (retry {retries} of "
                                f"{job.spec.backoff_limit})."), event=False, retries=retries)
    job.status.retries = retries
    rt.emit(ref_of(job), EventType.WARNING, Reason.CHILD_RECREATED, f"{what} was deleted while the EvalJob ran; "
            f"re-creating it (retry {retries} of {job.spec.backoff_limit}).")


async def _evaluation_error(rt: Runtime, job: EvalJob) -> str | None:
    """status.evaluationError as the API has it now (the evaluator writes it just before it exits)."""
    fresh = await rt.kube.get(kube.evj_ref(job.metadata.namespace, job.metadata.name))
    error = (fresh.get("status") or {}).get("evaluationError")
    return error if isinstance(error, str) and error else None


async def _finish(rt: Runtime, job: EvalJob, ray_job_status: str | None, end_time: str | None) -> None:
    """The evaluation RayJob succeeded: the results in status decide the verdict."""
    # Read the status again: the evaluator wrote its results before its RayJob ended, but maybe after
    # this reconcile read the EvalJob.
    fresh = await rt.kube.get(kube.evj_ref(job.metadata.namespace, job.metadata.name))
    try:
        job.status = EvalJobStatus.from_wire(dict(fresh.get("status") or {}))
    except ValueError:
        pass  # the results do not parse: judged as none below
    done = end_time or now_rfc3339()
    metrics = {c.name: c.metrics for c in job.status.candidates if c.metrics}
    if not metrics:
        await _fail(rt, job, Reason.EVALUATION_FAILED, "The evaluation finished but reported no results "
                    "(status.candidates[].metrics is empty).")
    # The verdict is the operator's own, from spec.gate and the reported metrics: the evaluator's pod (code
    # of the job author's choosing) may write any status.gate; a disagreeing one is overwritten.
    gate: GateResult | None = judge_gate(job.spec, metrics) if job.spec.gate is not None else None
    if gate is not None and job.status.gate is not None and job.status.gate != gate:
        rt.emit(ref_of(job), EventType.WARNING, Reason.GATE_OVERWRITTEN,
                f"status.gate said passed={job.status.gate.passed}; judged from the metrics: "
                f"passed={gate.passed}.")
    summary = _summary(job, metrics)
    facts: dict[str, Any] = {"completionTime": done, "rayJobStatus": ray_job_status,
                             "gate": gate.to_wire() if gate else None}
    if job.spec.gate is None or gate is None:
        await write_status(rt, job, State(Phase.SUCCEEDED, Reason.SUCCEEDED, summary, gate=Reason.NO_GATE), **facts)
    elif gate.passed:
        await write_status(rt, job, State(Phase.SUCCEEDED, Reason.SUCCEEDED, f"{summary} {gate.message}", gate=Reason.GATE_PASSED,
                                    gate_message=gate.message), **facts)
    else:
        await write_status(rt, job, State(Phase.FAILED, Reason.GATE_FAILED, gate.message, gate=Reason.GATE_FAILED,
                                    gate_message=gate.message), **facts)
    await _teardown(rt, job)


def _summary(job: EvalJob, metrics: dict[str, dict[str, float]]) -> str:
    metric = (job.spec.gate.metric if job.spec.gate else None) or DEFAULT_METRICS[job.spec.scorer.name]
    scores = ", ".join(f"{name} {values[metric]:.4g}" if metric in values else f"{name} n/a"
                       for name, values in metrics.items())
    report = f" Report: {job.status.report.uri}." if job.status.report and job.status.report.uri else ""
    return (f"Evaluated {len(job.spec.candidates)} candidate(s) on {job.spec.scorer.name} "
            f"({metric}: {scores}).{report}")


async def _teardown(rt: Runtime, job: EvalJob, stop_evaluation: bool = False) -> None:
    """Delete the RayServices (unless spec.keepServing) and, when asked, the evaluation RayJob."""
    names = evalbuilders.children(job)  # never names from status: anything in the job's pods can write that
    namespace, uid = job.metadata.namespace, job.metadata.uid
    if uid is None:
        return
    refs = [kube.rayjob_ref(namespace, names.ray_job)] if stop_evaluation and names.ray_job else []
    if not job.spec.keep_serving:
        refs += [kube.rayservice_ref(namespace, svc) for svc in names.ray_services]
    gone = await delete_children(rt, ref_of(job), uid, refs)
    deleted = [ref.name or "" for ref in gone if ref.kind == "RayService"]
    if deleted:
        rt.emit(ref_of(job), EventType.NORMAL, Reason.SERVICES_DELETED, f"Deleted RayService {', '.join(deleted)} "
                "(set spec.keepServing to keep them).")


# -- after the verdict: teardown again, ttlSecondsAfterFinished -------------------------------------


async def after_verdict(rt: Runtime, job: EvalJob, *, services_left: bool, rayjob: Obj | None) -> None:
    """A finished EvalJob (the timer): what its verdict's teardown should have done, done again where a
    crash or a failed DELETE came between the verdict and the teardown; its children's expiry after
    ttlSecondsAfterFinished. `services_left`/`rayjob`: kopf's indexes of the RayServices and RayJob it
    controls; nothing is requested when neither calls for it."""
    if await expire(rt, job):
        return
    obs = observe_rayjob(rayjob) if rayjob is not None else None
    evaluation_running = obs is not None and not obs.state.terminal and job.status.phase == Phase.FAILED
    if (services_left and not job.spec.keep_serving) or evaluation_running:
        await _teardown(rt, job, stop_evaluation=evaluation_running)


# -- ttlSecondsAfterFinished -----------------------------------------------------------------------


async def expire(rt: Runtime, job: EvalJob, now: float | None = None) -> bool:
    """Delete a finished EvalJob's children once ttlSecondsAfterFinished has passed (RayServices kept by
    spec.keepServing included); the EvalJob and its status stay. Only its own children (deterministic names,
    its uid as controller): the ConfigMap first, the RayServices, then the RayJob, which (with the
    RayServices, in kopf's index) marks an EvalJob whose children are not all gone yet."""
    ttl, done, uid = job.spec.ttl_seconds_after_finished, job.status.completion_time, job.metadata.uid
    if ttl is None or not done or uid is None or job.status.phase not in TERMINAL_PHASES:
        return False
    if (time.time() if now is None else now) < datetime.fromisoformat(done).timestamp() + ttl:
        return False
    names = evalbuilders.children(job)  # never names from status: anything in the job's pods can write that
    namespace = job.metadata.namespace
    refs = [kube.Ref("v1", "ConfigMap", namespace, names.config_map)] if names.config_map else []
    refs += [kube.Ref("networking.k8s.io/v1", "NetworkPolicy", namespace, name)
             for name in [*names.ray_services, *([names.ray_job] if names.ray_job else [])]]
    refs += [kube.rayservice_ref(namespace, svc) for svc in names.ray_services]
    refs += [kube.rayjob_ref(namespace, names.ray_job)] if names.ray_job else []
    gone = await delete_children(rt, ref_of(job), uid, refs)
    if gone:
        rt.emit(ref_of(job), EventType.NORMAL, Reason.CHILDREN_DELETED, f"ttlSecondsAfterFinished passed: "
                f"deleted {', '.join(f'{ref.kind} {ref.name}' for ref in gone)}.")
    return bool(gone)
