"""kopf handlers: parse the body once and route to `reconcile` (FineTuneJobs) or `evalreconcile` (EvalJobs).

Nothing is decided here.

All handlers are coroutines on kopf's event loop (no thread pool): the API calls are async.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any, cast

import aiohttp
import kopf
from pydantic import ValidationError

from kubetune.api import evaljob, finetunejob
from kubetune.api.common import GROUP, VERSION
from kubetune.api.errors import describe_validation_error
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import PLURAL, FineTuneJob
from kubetune.operator import evalreconcile, kube, reconcile, verdicts
from kubetune.operator.metrics import Metrics
from kubetune.operator.status import TERMINAL_PHASES
from kubetune.operator.verdicts import Rejected, WaitFor

log = logging.getLogger(__name__)

FTJ = (GROUP, VERSION, PLURAL)
EVJ = (GROUP, VERSION, evaljob.PLURAL)
RAYJOB = ("ray.io", "v1", "rayjobs")
RAYSERVICE = ("ray.io", "v1", "rayservices")
SWEEP_INTERVAL = float(os.environ.get("KUBETUNE_SWEEP_INTERVAL", "5"))


class _State:
    runtime: reconcile.Runtime | None = None
    metrics: Metrics | None = None
    sweeper: asyncio.Task[None] | None = None


STATE = _State()


def runtime() -> reconcile.Runtime:
    assert STATE.runtime is not None, "the operator's startup handler has not run"
    return STATE.runtime


@contextlib.contextmanager
def _timed(handler: str) -> Iterator[None]:
    if STATE.metrics is None:
        yield
        return
    with STATE.metrics.reconcile_seconds.labels(handler=handler).time():
        yield


def _emit(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(cast(kopf.Body, obj), type=type_, reason=reason, message=message[:1024])


@kopf.on.startup(id="configure")
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
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

    jobs: dict[reconcile.Key, dict[str, Any]] = {}
    evaljobs: dict[reconcile.Key, dict[str, Any]] = {}
    metrics = Metrics(lambda: [(b.get("status") or {}).get("phase") for b in list(jobs.values())],
                      lambda: [(b.get("status") or {}).get("phase") for b in list(evaljobs.values())])
    client = kube.Kube.from_environment(on_error=metrics.api_error, on_request=metrics.api_request)
    runtime_ = reconcile.Runtime(kube=client, emit=_emit, jobs=jobs, evaljobs=evaljobs,
                                 on_transition=metrics.transition)
    STATE.runtime, STATE.metrics = runtime_, metrics
    port = int(os.environ.get("KUBETUNE_METRICS_PORT", "8080"))
    if port:
        metrics.serve(port)


@kopf.on.cleanup(id="stop")
async def stop(**_: Any) -> None:
    if STATE.sweeper is not None:
        STATE.sweeper.cancel()
    if STATE.runtime is not None:
        await STATE.runtime.kube.close()


async def _sweep_forever(rt: reconcile.Runtime) -> None:
    """The ttlSecondsAfterFinished controller and the EvalJob deadline check: a periodic sweep, off the
    handlers' path (an EvalJob waiting for a RayService that never becomes ready gets no event)."""
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        for sweep in (reconcile.sweep, evalreconcile.sweep):
            try:
                await sweep(rt)
            except kube.KubeError as exc:
                log.warning("sweep failed, will retry: %s", exc)
            except Exception:  # the sweeper must outlive any one bad object
                log.exception("sweep failed, will retry")


def _start_sweeper(rt: reconcile.Runtime) -> None:
    if STATE.sweeper is None:
        # Started from a resource handler, not at startup: kopf's Event poster (which the sweeper's
        # Events go through) is set up only after the startup activities.
        STATE.sweeper = asyncio.create_task(_sweep_forever(rt))


@kopf.on.event(*FTJ, id="cache")
async def cache(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
    rt = runtime()
    _start_sweeper(rt)
    key = (namespace or "", name)
    if event.get("type") == "DELETED":
        rt.jobs.pop(key, None)
        return
    first_sight = key not in rt.jobs
    rt.jobs[key] = dict(body)
    status = body.get("status") or {}
    if first_sight and status.get("phase") in TERMINAL_PHASES:
        with contextlib.suppress(ValidationError):
            reconcile.schedule_cleanup(rt, FineTuneJob.from_body(body))


async def _parse_or_reject(body: kopf.Body) -> FineTuneJob:
    try:
        return FineTuneJob.from_body(body)
    except ValidationError as exc:
        message = describe_validation_error(exc)
        await reconcile.reject(runtime(), dict(body), message)
        raise kopf.PermanentError(f"invalid FineTuneJob: {message}") from None


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


async def _launch(job: FineTuneJob, retry: int) -> None:
    with _as_kopf_verdicts(retry):
        await reconcile.launch(runtime(), job)


@kopf.on.resume(*FTJ, id="launch")
@kopf.on.create(*FTJ, id="launch")
async def launch(body: kopf.Body, retry: int, **_: Any) -> None:
    with _timed("launch"):
        await _launch(await _parse_or_reject(body), retry)


@kopf.on.update(*FTJ, field="spec", id="update")
async def update(body: kopf.Body, old: Any, new: Any, retry: int, **_: Any) -> None:
    with _timed("update"):
        job = await _parse_or_reject(body)
        if reconcile.started(job):
            if (old or {}).get("suspend") != (new or {}).get("suspend"):
                with _as_kopf_verdicts(retry):
                    await reconcile.set_suspend(runtime(), job)
            return
        # Not started yet (was invalid, or waiting for its base model): try again with the new spec.
        await _launch(reconcile.restart_after_fix(job), retry)


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


@kopf.on.event(*RAYJOB, when=_controlled_by_finetunejob, id="follow-rayjob")
async def follow_rayjob(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    owner = _controller(body, finetunejob.KIND)
    if event.get("type") == "DELETED" or not owner or not namespace or not (body.get("status") or {}).get("jobDeploymentStatus"):
        return  # a RayJob KubeRay has not picked up yet says nothing the launch did not already write
    with _timed("follow-rayjob"):
        rt = runtime()
        name, uid = owner
        job_body = rt.jobs.get((namespace, name))
        if job_body is None:
            try:
                job_body = await rt.kube.get(kube.ftj_ref(namespace, name))
            except kube.NotFound:
                return
        try:
            job = FineTuneJob.from_body(job_body)
        except ValidationError:
            return
        if job.metadata.uid == uid:  # reconcile.follow checks the RayJob's name too
            await reconcile.follow(rt, job, dict(body))


# -- EvalJob ---------------------------------------------------------------------------------------


@kopf.on.event(*EVJ, id="eval-cache")
async def eval_cache(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str,
                     **_: Any) -> None:
    rt = runtime()
    _start_sweeper(rt)
    key = (namespace or "", name)
    if event.get("type") == "DELETED":
        rt.evaljobs.pop(key, None)
        rt.eval_locks.pop(key, None)
        return
    rt.evaljobs[key] = dict(body)


async def _parse_evj_or_reject(body: kopf.Body) -> EvalJob:
    try:
        return EvalJob.from_body(body)
    except ValidationError as exc:
        message = describe_validation_error(exc)
        await evalreconcile.reject(runtime(), dict(body), message)
        raise kopf.PermanentError(f"invalid EvalJob: {message}") from None


async def _advance(job: EvalJob, retry: int, after_fix: bool = False) -> None:
    with _as_kopf_verdicts(retry):
        await evalreconcile.advance(runtime(), job.metadata.namespace, job.metadata.name, after_fix=after_fix)


@kopf.on.resume(*EVJ, id="eval-launch")
@kopf.on.create(*EVJ, id="eval-launch")
async def eval_launch(body: kopf.Body, retry: int, **_: Any) -> None:
    with _timed("eval-launch"):
        await _advance(await _parse_evj_or_reject(body), retry)


@kopf.on.update(*EVJ, field="spec", id="eval-update")
async def eval_update(body: kopf.Body, retry: int, **_: Any) -> None:
    with _timed("eval-update"):
        job = await _parse_evj_or_reject(body)
        if evalreconcile.started(job):
            return  # serving has started: the spec is frozen (CEL), there is nothing to redo
        # Not started yet (was invalid, or waiting for a model or a Secret): try again with the new spec.
        await _advance(job, retry, after_fix=True)


async def _follow_evaljob(handler: str, namespace: str | None, body: kopf.Body) -> None:
    """Advance the EvalJob that controls `body`; `advance` reads only the job's own children (by their
    deterministic names and its uid), so an object that merely claims an owner changes nothing."""
    owner = _controller(body, evaljob.KIND)
    if not namespace or not owner:
        return
    with _timed(handler):
        try:
            await evalreconcile.advance(runtime(), namespace, owner[0], uid=owner[1])
        except (WaitFor, Rejected):
            pass  # recorded in the EvalJob's status; its own handler retries waiting
        except (TimeoutError, kube.KubeError, aiohttp.ClientError) as exc:
            log.warning("following %s for EvalJob %s/%s failed, the next event retries: %s", handler,
                        namespace, owner[0], exc)


@kopf.on.event(*RAYSERVICE, when=_controlled_by_evaljob, id="follow-rayservice")
async def follow_rayservice(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    # Every event counts, ADDED and DELETED included: readiness is read from the API, not from the event.
    await _follow_evaljob("follow-rayservice", namespace, body)


@kopf.on.event(*RAYJOB, when=_controlled_by_evaljob, id="follow-eval-rayjob")
async def follow_eval_rayjob(event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    if event.get("type") == "DELETED" or not (body.get("status") or {}).get("jobDeploymentStatus"):
        return  # a RayJob KubeRay has not picked up yet says nothing the launch did not already write
    await _follow_evaljob("follow-eval-rayjob", namespace, body)
