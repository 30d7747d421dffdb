"""`kubetune run finetunejob.yaml evaljob.yaml`: the same EvalJobs, served by local Ray Serve, no cluster.

Each kubetune-served candidate gets its own local Ray Serve application (the app a RayService runs,
under its own route prefix); endpoint candidates are called as they are. The plan, the evaluator and
the report are the cluster's own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract.evalplan import EvalPlan, plan
from kubetune.contract.storage import OutputOutsideRoot, local_output


class LocalEvalError(ValueError):
    """An EvalJob that cannot run locally as given; the message names the field."""


def model_uris(job: EvalJob, trained: dict[str, FineTuneJob]) -> dict[str, str]:
    """What each served candidate serves locally: a FineTuneJob's best checkpoint, a directory, a Hub id."""
    uris: dict[str, str] = {}
    for i, c in enumerate(job.spec.candidates):
        ref = c.model.fine_tune_job_ref
        if ref is not None:
            ftj = trained.get(ref.name)
            if ftj is None:
                raise LocalEvalError(f"spec.candidates[{i}].model.fineTuneJobRef: FineTuneJob {ref.name!r} must be "
                                     "among the files of the same `kubetune run` (it is trained first)")
            if ftj.status.best_checkpoint is None:
                raise LocalEvalError(f"spec.candidates[{i}].model.fineTuneJobRef: FineTuneJob {ref.name!r} "
                                     "produced no checkpoint")
            uris[c.name] = ftj.status.best_checkpoint.uri
        elif c.model.uri is not None:
            uris[c.name] = str(Path(c.model.uri).resolve()) if "://" not in c.model.uri else c.model.uri
        elif c.model.name is not None:
            uris[c.name] = c.model.name
    return uris


def output_dir(job: EvalJob, output_root: Path, allow_outside: bool = False) -> tuple[Path, str | None]:
    """Where the report goes locally, and a note when that is not spec.output.uri.

    A local `spec.output.uri` (a path or file://) must resolve under `output_root` unless `allow_outside`
    (OutputOutsideRoot); any other (an object store, pvc://) is replaced by `output_root/<name>`.
    """
    uri = job.spec.output.uri
    path = local_output(uri, output_root, allow_outside=allow_outside)
    if path is not None:
        return path, None
    local = output_root / job.metadata.name
    return local, f"spec.output.uri {uri} is not a local path; writing to {local} instead"


def published_to(evaluation: EvalPlan, out: Path) -> EvalPlan:
    """The plan with its output at `out`: a local run publishes nowhere else (not to an object store, not
    to a pvc:// claim's local mount point) than where `output_dir` said it writes."""
    output = evaluation.spec.output.model_copy(update={"uri": str(out)})
    return evaluation.model_copy(update={"spec": evaluation.spec.model_copy(update={"output": output})})


def run_eval_local(jobs: list[EvalJob], trained: dict[str, FineTuneJob], output_root: Path,
                   allow_outside: bool = False) -> int:
    """Serve, evaluate and report each EvalJob in turn; 0 when every gate passed (or there was none).

    Each writes to `output_dir` (under `output_root`, unless `allow_outside`)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from kubetune.serving.evaluate import PlanError, run
    from kubetune.serving.options import ServeOptions
    from kubetune.serving.report import format_table
    from kubetune.serving.server import serve_locally, shutdown_local

    status = 0
    for job in jobs:
        try:
            uris = model_uris(job, trained)
            out, note = output_dir(job, output_root, allow_outside)
        except (LocalEvalError, OutputOutsideRoot) as exc:
            print(f"error: {job.metadata.name}: {exc}", file=sys.stderr)
            return 2
        if note:
            print(f"note: {note}")
        serving = job.spec.serving
        if serving.engine == "vllm" or serving.gpus_per_replica:
            print(f"note: spec.serving asks for {serving.engine} on {serving.replicas} x "
                  f"{serving.gpus_per_replica} {serving.gpu_type}; serving each model with one local replica "
                  "(vLLM where a GPU and vllm are present, transformers otherwise)")
        print(f"== {job.metadata.name}: serving {len(uris)} model(s) locally with Ray Serve", flush=True)
        base_urls: dict[str, str] = {}
        try:
            for name, uri in uris.items():
                opts = ServeOptions(model_uri=uri, served_model_name=name, engine="auto",
                                    max_batch_size=serving.max_batch_size, max_model_len=serving.max_model_len)
                base_urls[name] = serve_locally(opts, name=name)
                print(f"  {name}: {uri} at {base_urls[name]}", flush=True)
            evaluation = published_to(plan(job, uris, trained, base_urls), out)
            try:
                outcome = run(evaluation, out)
            except PlanError as exc:
                print(f"error: {job.metadata.name}: {exc}", file=sys.stderr)
                return 3
        finally:
            shutdown_local()
        print(format_table(outcome.results))
        print(f"report: {(out / 'report.html').resolve()}")
        if outcome.gate is not None and not outcome.gate.passed:
            status = 1
    return status

