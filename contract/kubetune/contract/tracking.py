"""Which experiment-tracking run a process logs to: the trainer, a retry of it, and the job's evaluation
agree on it without passing ids around.

A run is keyed by the FineTuneJob's uid (an EvalJob's own uid when it evaluates no FineTuneJob). A local
run (`kubetune run`) has no uid: its key is a hash of the job's namespace, name and output URI, so the
evaluation that follows it in the same `kubetune run`, and a rerun that resumes its checkpoints, find it.
MLflow finds the run by its `kubetune.runKey` tag, W&B uses the key as its run id, TensorBoard writes to
`<logUri>/<name>`. Pure data: no I/O.
"""

from __future__ import annotations

import hashlib

from pydantic import Field

from kubetune.api.common import ApiModel
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob
from kubetune.api.tracking import TrackingSpec

RUN_KEY_TAG = "kubetune.runKey"


class TrackingRun(ApiModel):
    """The identity of one tracking run."""

    key: str = Field(description="Deterministic key: the job's uid, or a hash for a local run.", min_length=1,
                     max_length=64)
    kind: str = Field(description="Kind of the job the run belongs to (FineTuneJob or EvalJob).")
    namespace: str = Field(description="The job's namespace.")
    name: str = Field(description="The job's name: the run's display name and TensorBoard folder.")
    uid: str | None = Field(default=None, description="The job's uid (none in a local run).")


class TrackingTarget(ApiModel):
    """Where a process logs: the tracking spec (defaults filled in) and the run."""

    spec: TrackingSpec = Field(description="Backends, with tensorboard.logUri resolved.")
    run: TrackingRun = Field(description="The run to create or continue.")


def run_key(namespace: str, name: str, uid: str | None, output_uri: str) -> str:
    """The job's uid; for a job without one (a local run), a hash of what names it and where it writes."""
    if uid:
        return uid
    digest = hashlib.sha256(f"{namespace}\n{name}\n{output_uri}".encode()).hexdigest()[:32]
    return f"local-{digest}"


def job_run(kind: str, namespace: str, name: str, uid: str | None, output_uri: str) -> TrackingRun:
    return TrackingRun(key=run_key(namespace, name, uid, output_uri), kind=kind, namespace=namespace, name=name,
                       uid=uid)


def training_target(tracking: TrackingSpec | None, namespace: str, name: str, uid: str | None,
                    output_uri: str) -> TrackingTarget | None:
    """A FineTuneJob's run (None when it tracks nothing). `output_uri`: its spec.output.uri as written."""
    if tracking is None:
        return None
    return TrackingTarget(spec=tracking.with_defaults(output_uri),
                          run=job_run("FineTuneJob", namespace, name, uid, output_uri))


def evaluation_target(job: EvalJob, fine_tune_jobs: dict[str, FineTuneJob]) -> TrackingTarget | None:
    """Where an EvalJob logs its scores: the run of its first fineTuneJobRef candidate's FineTuneJob (the
    same run the training logged to), else a run of its own. Defaults (tensorboard.logUri) come from the
    EvalJob's own output; the EvalJob FineTuneJob.spec.evaluation creates carries the training's logUri."""
    spec = job.spec.tracking
    if spec is None:
        return None
    spec = spec.with_defaults(job.spec.output.uri)
    for c in job.spec.candidates:
        ref = c.model.fine_tune_job_ref
        if ref is not None and ref.name in fine_tune_jobs:
            meta, output = fine_tune_jobs[ref.name].metadata, fine_tune_jobs[ref.name].spec.output.uri
            return TrackingTarget(spec=spec, run=job_run("FineTuneJob", meta.namespace, meta.name, meta.uid, output))
    meta = job.metadata
    return TrackingTarget(spec=spec, run=job_run("EvalJob", meta.namespace, meta.name, meta.uid, job.spec.output.uri))
