"""kopf handlers: parse the body once and route to `reconcile` (FineTuneJobs) or `evalreconcile` (EvalJobs).

Nothing is decided here. kopf's own primitives carry the state: `memo` holds the runtime (API client,
metrics), `@kopf.index` keeps the jobs and the RayJobs/RayServices each job controls (by owner uid, never
by label), and a `@kopf.timer` per job is the level-triggered safety net: it repairs what no watch event
announced (a deleted child), expires finished jobs' children after ttlSecondsAfterFinished, and enforces
EvalJob deadlines.

All handlers are coroutines on kopf's event loop (no thread pool): the API calls are async.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar, cast

import aiohttp
import kopf
from pydantic import ValidationError

from kubetune.api import evaljob, finetunejob
from kubetune.api.common import GROUP, TERMINAL_PHASES, VERSION
from kubetune.api.errors import describe_validation_error
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import PLURAL, FineTuneJob
from kubetune.operator import evalreconcile, jobs, kube, reconcile, verdicts
from kubetune.operator.metrics import Metrics
from kubetune.operator.verdicts import Rejected, WaitFor

log = logging.getLogger(__name__)

FTJ = (GROUP, VERSION, PLURAL)
EVJ = (GROUP, VERSION, evaljob.PLURAL)
RAYJOB = ("ray.io", "v1", "rayjobs")
RAYSERVICE = ("ray.io", "v1", "rayservices")
TIMER_INTERVAL = jobs.TIMER_INTERVAL

Index = Mapping[Any, Iterable[Any]]
Job = TypeVar("Job", FineTuneJob, EvalJob)


def _runtime(memo: kopf.Memo) -> jobs.Runtime:
    runtime: jobs.Runtime = memo.runtime
    return runtime


@contextlib.contextmanager
def _timed(memo: kopf.Memo, handler: str) -> Iterator[None]:
    metrics: Metrics | None = memo.get("metrics")
    if metrics is None:
        yield
        return
    with metrics.reconcile_seconds.labels(handler=handler).time():
        yield


def _emit(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(cast(kopf.Body, obj), type=type_, reason=reason, message=message[:1024])


def _phases(index: Index) -> list[str | None]:
    """The phases in an index of phases, or of bodies."""
    values = [value for store in list(index.values()) for value in store]
    return [(v.get("status") or {}).get("phase") if isinstance(v, dict) else v for v in values]


# -- indexes: what kopf's watches know, by the keys reconcile looks things up by --------------------


def _controller(body: kopf.Body, kind: str) -> tuple[str, str] | None:
    """(name, uid) of `body`'s controller when that is a kubetune job of `kind`; labels prove nothing."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") is True and ref.get("kind") == kind and str(ref.get("apiVersion", "")).startswith(
                f"{GROUP}/") and ref.get("name") and ref.get("uid"):
            return str(ref["name"]), str(ref["uid"])
    return None


def _controlled_by_finetunejob(body: kopf.Body, **_: Any) -> bool:
    return _controller(body, finetunejob.KIND) is not None


def _controlled_by_evaljob(body: kopf.Body, **_: Any) -> bool:
    return _controller(body, evaljob.KIND) is not None


@kopf.index(*FTJ)
def finetunejobs(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Any, Any]:
    """(namespace, name) -> the FineTuneJob: referenced jobs, creation times and the phase gauge without an
    API call."""
    return {(namespace or "", name): dict(body)}


@kopf.index(*EVJ)
def evaljob_phases(namespace: str | None, name: str, status: kopf.Status, **_: Any) -> dict[Any, Any]:
    """(namespace, name) -> phase, for the `kubetune_evaljobs{phase}` gauge."""
    return {(namespace or "", name): status.get("phase")}


@kopf.index(*RAYJOB, when=_controlled_by_finetunejob)
def training_rayjobs(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """The uid of the FineTuneJob that controls a RayJob -> the RayJob's identity and status: the timer
    checks that it exists and mirrors its status where a watch event's status write was lost. Only what
    that needs is kept (not the pod templates; of the spec, the suspend flag Kueue sets), so a thousand jobs
    cost little memory."""
    owner = _controller(body, finetunejob.KIND)
    if owner is None:
        return {}
    meta = body.get("metadata", {})
    slim = {"metadata": {k: meta.get(k) for k in ("name", "namespace", "generation", "uid", "ownerReferences")},
            "spec": {"suspend": bool((body.get("spec") or {}).get("suspend"))},
            "status": dict(body.get("status") or {})}
    return {owner[1]: slim}


def _evaljob_uid(body: kopf.Body, value: Any) -> dict[Any, Any]:
    owner = _controller(body, evaljob.KIND)
    return {owner[1]: value} if owner else {}


@kopf.index(*RAYJOB, when=_controlled_by_evaljob)
def eval_rayjobs(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """The uid of the EvalJob that controls a RayJob -> the RayJob's identity and status (whether a
    finished EvalJob's evaluation still runs; children left for TTL expiry)."""
    meta = body.get("metadata", {})
    return _evaljob_uid(body, {"metadata": {k: meta.get(k) for k in ("name", "generation")},
                               "status": dict(body.get("status") or {})})


@kopf.index(*RAYSERVICE, when=_controlled_by_evaljob)
def eval_rayservices(body: kopf.Body, name: str, **_: Any) -> dict[Any, Any]:
    """The uid of the EvalJob that controls a RayService -> its name (children left for TTL expiry)."""
    return _evaljob_uid(body, name)


# -- lifecycle -------------------------------------------------------------------------------------


@kopf.on.startup(id="configure")
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **indexes: Any) -> None:
    # Progress and diff-base live in annotations under our own prefix; no finalizers are needed
    # (children go with their owner through ownerReferences).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # only explicit events and warnings become Events
    settings.batching.batch_window = float(os.environ.get("KUBETUNE_BATCH_WINDOW", "0.05"))
    settings.watching.server_timeout = int(os.environ.get("KUBETUNE_WATCH_TIMEOUT", "300"))
    # The CRDs (ours and KubeRay's) are installed before the operator (chart prerequisite): no CRD
    # list/watch permission, so no runtime scanning; kopf scans the API groups once at startup.
    settings.scanning.disabled = True
    settings.networking.request_timeout = 60

    # kopf's indexes are live mappings, already here (empty) at startup: the gauges read them at scrape time.
    ftj_phases: Index = indexes["finetunejobs"]
    evj_phases: Index = indexes["evaljob_phases"]
    metrics = Metrics(lambda: _phases(ftj_phases), lambda: _phases(evj_phases))
    client = kube.Kube.from_environment(on_error=metrics.api_error, on_request=metrics.api_request)
    policies = os.environ.get("KUBETUNE_NETWORK_POLICY", "true").lower() not in ("false", "0", "no")
    memo.runtime = jobs.Runtime(kube=client, emit=_emit, finetunejobs=indexes["finetunejobs"],
                                on_transition=metrics.transition,
                                kuberay_namespace=os.environ.get("KUBETUNE_KUBERAY_NAMESPACE", "ray-system")
                                if policies else None)
    memo.metrics = metrics
    port = int(os.environ.get("KUBETUNE_METRICS_PORT", "8080"))
    if port:
        metrics.serve(port)


@kopf.on.cleanup(id="stop")
async def stop(memo: kopf.Memo, **_: Any) -> None:
    runtime: jobs.Runtime | None = memo.get("runtime")
    if runtime is not None:
        await runtime.kube.close()


@contextlib.contextmanager
def _as_kopf_verdicts(retry: int = 0) -> Iterator[None]:
    """The reconcilers' verdicts in kopf's terms: WaitFor -> TemporaryError (kopf retries after its
    delay), Rejected -> PermanentError (kopf stops retrying; the reason is already in status). An API
    refusal that escaped them (the Failed write itself refused) is permanent too; transient API faults
    are retried with capped exponential backoff and jitter, never sooner than Retry-After."""
    try:
        yield
    except WaitFor as wait:
        raise kopf.TemporaryError(str(wait), delay=wait.delay) from None
    except Rejected as rejected:
        raise kopf.PermanentError(str(rejected)) from None
    except kube.KubeError as exc:
        if kube.is_rejection(exc):
            raise kopf.PermanentError(f"the API server refused a request: {exc}") from None
        raise kopf.TemporaryError(str(exc), delay=verdicts.backoff(retry, exc.retry_after)) from None
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise kopf.TemporaryError(f"API unreachable: {exc!r}", delay=verdicts.backoff(retry)) from None


# -- parsing, for both kinds -----------------------------------------------------------------------


async def _parse_or_reject(memo: kopf.Memo, body: kopf.Body, model: type[Job]) -> Job:
    """The job as its model, or Failed/ValidationFailed with the field named (kopf stops retrying)."""
    try:
        return model.from_body(body)
    except ValidationError as exc:
        message = describe_validation_error(exc)
        await jobs.reject(_runtime(memo), dict(body), message)
        raise kopf.PermanentError(f"invalid {body.get('kind')}: {message}") from None


# -- FineTuneJob -----------------------------------------------------------------------------------


async def _reconcile(memo: kopf.Memo, handler: str, body: kopf.Body, trigger: reconcile.Trigger, retry: int,
                     **observed: Any) -> None:
    with _timed(memo, handler):
        job = await _parse_or_reject(memo, body, FineTuneJob)
        with _as_kopf_verdicts(retry):
            await reconcile.reconcile(_runtime(memo), job, trigger, **observed)


@kopf.on.resume(*FTJ, id="launch")
@kopf.on.create(*FTJ, id="launch")
async def launch(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    await _reconcile(memo, "launch", body, reconcile.Trigger.START, retry)


@kopf.on.update(*FTJ, field="spec", id="update")
async def update(body: kopf.Body, old: Any, new: Any, memo: kopf.Memo, retry: int, **_: Any) -> None:
    suspend_changed = (old or {}).get("suspend") != (new or {}).get("suspend")
    await _reconcile(memo, "update", body, reconcile.Trigger.SPEC, retry, suspend_changed=suspend_changed)


def _needs_a_timer(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """Launched jobs (children to watch over) that still run, or finished with children left to expire.

    Not before the launch: kopf's timers put a finalizer on the job, and that write would otherwise sit
    between a new job and its RayJob (the launch handler alone creates the children until then)."""
    if not status.get("startTime"):
        return False
    return status.get("phase") not in TERMINAL_PHASES or spec.get("ttlSecondsAfterFinished") is not None


@kopf.timer(*FTJ, interval=TIMER_INTERVAL, initial_delay=TIMER_INTERVAL, when=_needs_a_timer, id="level")
async def level(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    try:
        job = FineTuneJob.from_body(body)
    except ValidationError:
        return  # rejected by its launch handler; nothing of it exists to repair
    owned: Index = kwargs["training_rayjobs"]  # kopf passes its indexes by name
    rayjob = next(iter(owned.get(job.metadata.uid, ())), None) if job.metadata.uid in owned else None
    with _timed(memo, "level"), _as_kopf_verdicts():
        await reconcile.reconcile(_runtime(memo), job, reconcile.Trigger.TIMER,
                                  rayjob=dict(rayjob) if rayjob is not None else None,
                                  rayjob_indexed=rayjob is not None)


@kopf.on.event(*RAYJOB, when=_controlled_by_finetunejob, id="follow-rayjob")
async def follow_rayjob(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: kopf.Memo,
                        **kwargs: Any) -> None:
    owner = _controller(body, finetunejob.KIND)
    if event.get("type") == "DELETED" or not owner or not namespace or not (body.get("status") or {}).get("jobDeploymentStatus"):
        return  # a RayJob KubeRay has not picked up yet says nothing the launch did not already write
    with _timed(memo, "follow-rayjob"):
        rt = _runtime(memo)
        name, uid = owner
        job_body = jobs.indexed(kwargs["finetunejobs"], (namespace, name))
        if job_body is None:
            try:
                job_body = await rt.kube.get(kube.ftj_ref(namespace, name))
            except kube.NotFound:
                return
        try:
            job = FineTuneJob.from_body(job_body)
        except ValidationError:
            return
        if job.metadata.uid == uid:  # reconcile.observe checks the RayJob's name too
            try:
                await reconcile.reconcile(rt, job, reconcile.Trigger.CHILD, rayjob=dict(body))
            except (Rejected, TimeoutError, kube.KubeError, aiohttp.ClientError) as exc:
                log.warning("following RayJob %s/%s failed; the job's timer repairs: %s", namespace,
                            body.get("metadata", {}).get("name"), exc)


# -- EvalJob ---------------------------------------------------------------------------------------


async def _advance(memo: kopf.Memo, job: EvalJob, retry: int, after_fix: bool = False) -> None:
    with _as_kopf_verdicts(retry):
        await evalreconcile.advance(_runtime(memo), job.metadata.namespace, job.metadata.name,
                                    after_fix=after_fix)


@kopf.on.resume(*EVJ, id="eval-launch")
@kopf.on.create(*EVJ, id="eval-launch")
async def eval_launch(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    with _timed(memo, "eval-launch"):
        await _advance(memo, await _parse_or_reject(memo, body, EvalJob), retry)


@kopf.on.update(*EVJ, field="spec", id="eval-update")
async def eval_update(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    with _timed(memo, "eval-update"):
        job = await _parse_or_reject(memo, body, EvalJob)
        if evalreconcile.started(job):
            return  # serving has started: the spec is frozen (CEL), there is nothing to redo
        # Not started yet (was invalid, or waiting for a model or a Secret): try again with the new spec.
        await _advance(memo, job, retry, after_fix=True)


def _evaljob_needs_a_timer(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """EvalJobs that still run; finished ones whose serving may need tearing down (a crash or a failed
    DELETE may have come after the verdict) or whose children expire."""
    return (status.get("phase") not in TERMINAL_PHASES or not spec.get("keepServing")
            or spec.get("ttlSecondsAfterFinished") is not None)


@kopf.timer(*EVJ, interval=TIMER_INTERVAL, initial_delay=TIMER_INTERVAL, id="eval-level",
            when=_evaljob_needs_a_timer)
async def eval_level(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """The level-triggered pass: the deadline (no event comes for a RayService that never gets ready),
    children deleted behind its back; ttlSecondsAfterFinished once finished."""
    if (body.get("status") or {}).get("phase") in TERMINAL_PHASES:
        uid = body["metadata"]["uid"]
        rayjobs: Index = kwargs["eval_rayjobs"]
        rayjob = next(iter(rayjobs.get(uid, ())), None) if uid in rayjobs else None
        if rayjob is None and uid not in kwargs["eval_rayservices"]:
            return  # nothing of it is left: no request
        try:
            job = EvalJob.from_body(body)
        except ValidationError:
            return
        with _timed(memo, "eval-level"), _as_kopf_verdicts():
            await evalreconcile.after_verdict(_runtime(memo), job, services_left=uid in kwargs["eval_rayservices"],
                                              rayjob=dict(rayjob) if rayjob is not None else None)
        return
    await _follow_evaljob(memo, "eval-level", body.get("metadata", {}).get("namespace"),
                          (body["metadata"]["name"], body["metadata"]["uid"]))


async def _follow_evaljob(memo: kopf.Memo, handler: str, namespace: str | None,
                          owner: tuple[str, str] | None) -> None:
    """Advance the EvalJob `owner` (name, uid); `advance` reads only the job's own children (by their
    deterministic names and its uid), so an object that merely claims an owner changes nothing."""
    if not namespace or not owner:
        return
    with _timed(memo, handler):
        try:
            await evalreconcile.advance(_runtime(memo), namespace, owner[0], uid=owner[1])
        except (WaitFor, Rejected):
            pass  # recorded in the EvalJob's status; its own handler retries waiting
        except (TimeoutError, kube.KubeError, aiohttp.ClientError) as exc:
            log.warning("%s for EvalJob %s/%s failed, the next event or timer retries: %s", handler,
                        namespace, owner[0], exc)


@kopf.on.event(*RAYSERVICE, when=_controlled_by_evaljob, id="follow-rayservice")
async def follow_rayservice(body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    # Every event counts, ADDED and DELETED included: readiness is read from the API, not from the event.
    await _follow_evaljob(memo, "follow-rayservice", namespace, _controller(body, evaljob.KIND))


@kopf.on.event(*RAYJOB, when=_controlled_by_evaljob, id="follow-eval-rayjob")
async def follow_eval_rayjob(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: kopf.Memo,
                             **_: Any) -> None:
    if event.get("type") == "DELETED" or not (body.get("status") or {}).get("jobDeploymentStatus"):
        return  # a RayJob KubeRay has not picked up yet says nothing the launch did not already write
    await _follow_evaljob(memo, "follow-eval-rayjob", namespace, _controller(body, evaljob.KIND))
