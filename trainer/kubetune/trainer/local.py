"""`kubetune run FILE.yaml ...`: the same FineTuneJobs, the same trainer, on local Ray (no cluster)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kubetune.api.finetunejob import BaseModelSource, EpochResult, FineTuneJob, Phase
from kubetune.trainer.data import Preflight

LOCAL_CPU_WORKERS = 2


def local_workers(job: FineTuneJob, gpus: int, requested: int | None) -> tuple[int, bool, str | None]:
    """(workers, use_gpu, note): cluster-sized resources mapped onto this machine, said out loud."""
    res = job.spec.resources
    if requested:
        workers = requested
    elif gpus:
        workers = min(res.workers, max(1, gpus // max(res.gpus_per_worker, 1)))
    else:
        workers = min(res.workers, LOCAL_CPU_WORKERS)
    use_gpu = gpus > 0
    note = None
    if workers != res.workers or (res.gpus_per_worker > 0) != use_gpu:
        where = f"{workers} local {'GPU' if use_gpu else 'CPU'} worker{'s' if workers > 1 else ''}"
        note = (f"spec.resources asks for {res.workers} workers x {res.gpus_per_worker} {res.gpu_type}; "
                f"running {where} instead (nodeSelector, tolerations and pod resources apply on a cluster only)")
    return workers, use_gpu, note


def output_dir(job: FineTuneJob, output_root: Path, allow_outside: bool = False) -> Path:
    """Where a job trains locally: its `spec.output.uri` when that is a local path (which must resolve under
    `output_root` unless `allow_outside`: OutputOutsideRoot), else `output_root/<name>`."""
    from kubetune.contract.storage import local_output

    return local_output(job.spec.output.uri, output_root, allow_outside=allow_outside) or \
        output_root / job.metadata.name


def run_local(jobs: list[FineTuneJob], output_root: Path, workers: int | None = None,
              trained: dict[str, FineTuneJob] | None = None, allow_outside: bool = False) -> int:
    """Train each job in order; a fineTuneJobRef to an earlier job here uses its local best checkpoint.

    Each job writes to `output_dir` (under `output_root`, unless `allow_outside`). `trained` (if given)
    receives each finished job with its status filled in (epochs, best checkpoint), for the evaluations
    that follow in the same `kubetune run`.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 busy cores with torch's default threads: ~20x slower
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "kubetune" / "torch_extensions"))
    import ray
    import torch

    from kubetune.contract.storage import OutputOutsideRoot
    from kubetune.trainer.config import from_finetunejob
    from kubetune.trainer.data import DataError
    from kubetune.trainer.driver import run

    gpus = torch.cuda.device_count()
    if not gpus:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    bests: dict[str, str] = {}
    for job in jobs:
        ref = job.spec.base_model.fine_tune_job_ref
        if ref is not None:
            if ref.name not in bests:
                print(f"error: {job.metadata.name}: spec.baseModel.fineTuneJobRef {ref.name!r} must be an "
                      "earlier FineTuneJob in the same `kubetune run`", file=sys.stderr)
                return 2
            job.spec.base_model = BaseModelSource(uri=bests[ref.name])
        n, use_gpu, note = local_workers(job, gpus, workers)
        if note:
            print(f"note: {note}")
        try:
            output = output_dir(job, output_root, allow_outside)
        except OutputOutsideRoot as exc:
            print(f"error: {job.metadata.name}: {exc}", file=sys.stderr)
            return 2
        env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR",
                                          "HF_HUB_OFFLINE", "HF_TOKEN") if k in os.environ}
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls every second.
        ray.init(num_cpus=max(n + 2, os.cpu_count() or 2), include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True,
                 runtime_env={"env_vars": env}, ignore_reinit_error=True)
        cfg = from_finetunejob(job, output, workers=n, use_gpu=use_gpu)
        print(f"== {job.metadata.name}: {job.spec.hyperparameters.epochs} epochs, {n} worker(s), "
              f"ZeRO-{job.spec.deepspeed.zero_stage}, outputs in {output}")
        try:
            result = run(cfg, on_preflight=print_preflight)
        except DataError as exc:
            print(f"error: pre-flight: {exc}", file=sys.stderr)
            return 3
        finally:
            ray.shutdown()
        print_table(result.epochs, output)
        if result.best:
            bests[job.metadata.name] = result.best.uri
        if trained is not None:
            job.status.phase = Phase.SUCCEEDED if result.best else Phase.FAILED
            job.status.epochs, job.status.best_checkpoint = list(result.epochs), result.best
            job.status.base_val_perplexity = result.base_val_perplexity
            trained[job.metadata.name] = job
    return 0


def print_preflight(data: Preflight) -> None:
    for split in ("train", "validation"):
        st = data.stats[split]
        print(f"pre-flight {split}: {st['rows']} rows, {st['tokens']} tokens (mean {st['mean_tokens']:.0f}, "
              f"max {st['max_tokens']}), {st['truncated']} truncated")
    for warning in data.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def print_table(epochs: list[EpochResult], output: Path) -> None:
    import json

    summary = json.loads((output / "result.json").read_text())
    print(f"{'epoch':>5}  {'train loss':>10}  {'val loss':>9}  {'val ppl':>9}")
    for e in epochs:
        print(f"{e.epoch:>5}  {e.train_loss:>10.4f}  {e.val_loss:>9.4f}  {e.val_perplexity:>9.4f}")
    best, base = summary.get("best"), summary.get("baseValPerplexity")
    if best:
        line = f"best: epoch {best['epoch']}, val perplexity {best['valPerplexity']:.4f}"
        if base:
            line += f"  (base model: {base:.4f})"
        print(line)
        print(f"best checkpoint: {best['uri']}")
    print(f"learning curve: {output / 'learning_curve.png'}; metrics: {output / 'metrics.jsonl'}")
