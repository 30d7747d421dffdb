"""`kubetune run FILE.yaml ...`: the same FineTuneJobs, the same trainer, on local Ray (no cluster)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.api.finetunejob import BaseModelSource, EpochResult, FineTuneJob, Phase
from kubetune.trainer.data import Preflight

if TYPE_CHECKING:
    from kubetune.trainer.config import TrainConfig

@dataclass(frozen=True)
class LocalPlan:
    """How a FineTuneJob's cluster-sized resources run on this machine."""

    workers: int  # Ray Train workers (DeepSpeed's world size)
    use_gpu: bool
    threads_per_worker: int | None  # torch intra-op threads of each CPU worker; None on GPUs
    accumulation: int  # gradientAccumulationSteps to train with: the spec's, times what keeps its global batch
    note: str | None  # what was chosen and why, when it differs from the spec
    zero_stage: int | None = None  # the ZeRO stage to train with, when not the spec's (one CPU worker: 0)

    def config(self, job: FineTuneJob, output: Path) -> TrainConfig:
        """The trainer's config of `job` run this way."""
        from kubetune.trainer.config import from_finetunejob

        cfg = from_finetunejob(job, output, workers=self.workers, use_gpu=self.use_gpu)
        spec = cfg.spec.model_copy(deep=True)
        spec.hyperparameters.gradient_accumulation_steps = self.accumulation
        if self.zero_stage is not None:
            spec.deepspeed = spec.deepspeed.model_copy(update={
                "zero_stage": self.zero_stage, "offload_optimizer": "none", "offload_params": "none"})
        return cfg.model_copy(update={"spec": spec, "threads_per_worker": self.threads_per_worker})


def local_plan(job: FineTuneJob, gpus: int, cpus: int, requested: int | None = None) -> LocalPlan:
    """Map `spec.resources` onto this machine, choosing what trains fastest here.

    With GPUs: one worker per GPU the spec would use. Without: one worker with every core as torch threads
    (`requested` overrides the number of workers; the cores are shared among them). On one machine without
    a GPU, N single-thread workers compute the same products as one N-thread worker, plus a gradient
    all-reduce over gloo and N copies of the weights and optimizer state to update (ZeRO-2 shards only the
    optimizer state): one worker is the fastest (bench/local_train_rate.py measures it).
    The global batch stays the spec's (workers x perDeviceBatchSize x gradientAccumulationSteps): fewer local
    workers accumulate more micro-batches per optimizer step when the spec's workers are a multiple of
    theirs, so the optimizer steps, the learning-rate schedule and the result are the cluster's.
    """
    res, hp = job.spec.resources, job.spec.hyperparameters
    use_gpu = gpus > 0
    cpus = max(1, cpus)
    if requested:
        workers = requested
    elif use_gpu:
        workers = min(res.workers, max(1, gpus // max(res.gpus_per_worker, 1)))
    else:
        workers = 1
    threads = None if use_gpu else max(1, cpus // workers)
    spec_workers = res.workers * (max(1, res.gpus_per_worker) if use_gpu and res.gpus_per_worker else 1)
    fold = spec_workers // workers if spec_workers % workers == 0 else 1
    accumulation = hp.gradient_accumulation_steps * fold
    reasons: list[str] = []
    if workers != spec_workers or (res.gpus_per_worker > 0) != use_gpu:
        where = f"{workers} local {'GPU' if use_gpu else 'CPU'} worker{'s' if workers > 1 else ''}"
        if threads is not None:
            where += f" x {threads} thread{'s' if threads > 1 else ''}"
        reasons.append(f"spec.resources asks for {res.workers} workers x {res.gpus_per_worker} {res.gpu_type}; "
                       f"running {where} instead (nodeSelector, tolerations and pod resources apply on a cluster "
                       "only)")
        if not use_gpu and not requested:
            reasons.append(f"one worker using all {cpus} cores is the fastest on one machine without a GPU: no "
                           "gloo all-reduce and one optimizer update (--workers N to choose)")
        batch = res.workers * hp.per_device_batch_size * hp.gradient_accumulation_steps
        if fold > 1:
            reasons.append(f"gradient accumulation {accumulation} keeps the global batch of {batch} sequences")
        elif spec_workers != workers:
            reasons.append(f"the global batch is {workers * hp.per_device_batch_size * accumulation} sequences, "
                           f"not {batch} ({spec_workers} workers are not a multiple of {workers})")
    # ZeRO shards state over workers and offloads it to CPU memory: with one worker on the CPU there is nothing
    # to shard or offload to, only ZeRO's copies (gradient buckets, flat partitions), a quarter of each step.
    zero_stage = None
    ds = job.spec.deepspeed
    if not use_gpu and workers == 1 and ds.config_map_ref is None and (
            ds.zero_stage > 0 or ds.offload_optimizer != "none" or ds.offload_params != "none"):
        zero_stage = 0
        reasons.append(f"ZeRO stage 0 instead of {ds.zero_stage}"
                       + (" and no CPU offload" if ds.offload_optimizer != "none" or ds.offload_params != "none"
                          else "")
                       + ": one CPU worker has no other worker to shard with and no device to offload from")
    return LocalPlan(workers=workers, use_gpu=use_gpu, threads_per_worker=threads, accumulation=accumulation,
                     note="; ".join(reasons) if reasons else None, zero_stage=zero_stage)


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
        plan = local_plan(job, gpus, len(os.sched_getaffinity(0)), workers)
        if plan.note:
            print(f"note: {plan.note}")
        try:
            output = output_dir(job, output_root, allow_outside)
        except OutputOutsideRoot as exc:
            print(f"error: {job.metadata.name}: {exc}", file=sys.stderr)
            return 2
        env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR",
                                          "HF_HUB_OFFLINE", "HF_TOKEN") if k in os.environ}
        if plan.threads_per_worker:  # OpenMP's threads in the worker: the cores the plan gives it
            env["OMP_NUM_THREADS"] = str(plan.threads_per_worker)
        bar = sys.stdout.isatty()
        if bar:  # Ray Train's print() in workers also logs each tqdm_ray state: a second copy of the last
            env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # one, after the bar closed, would draw a new bar
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls every second.
        n = plan.workers
        ray.init(num_cpus=max(n * (plan.threads_per_worker or 1) + 2, os.cpu_count() or 2), include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=True,
                 runtime_env={"env_vars": env}, ignore_reinit_error=True)
        cfg = plan.config(job, output).model_copy(update={"progress_bar": bar})
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
    policy, max_length = data.stats["truncation"], data.stats["max_length"]
    for split in ("train", "validation"):
        st = data.stats[split]
        long = st["longer_than_max_length"]
        cut = f"{long} longer than maxLength {max_length}: " + (
            "dropped" if policy == "dropTruncated" else "truncated") + f" (truncation: {policy})"
        print(f"pre-flight {split}: {st['rows']} of {st['rows_read']} rows used, {st['tokens']} tokens "
              f"(mean {st['mean_tokens']:.0f}, max {st['max_tokens']}), {cut}")
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
