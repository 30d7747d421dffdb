"""`kubetune run`'s choice of how a FineTuneJob's resources run on this machine (kubetune.trainer.local)."""

from __future__ import annotations

from pathlib import Path

import pytest

from factories import ftj_manifest
from kubetune.api.finetunejob import FineTuneJob
from kubetune.trainer.local import local_plan


def job(workers: int = 2, gpus_per_worker: int = 0, batch: int = 4, accumulation: int = 1,
        **deepspeed: object) -> FineTuneJob:
    return FineTuneJob.from_body(ftj_manifest(
        spec__resources={"workers": workers, "gpusPerWorker": gpus_per_worker},
        spec__hyperparameters={"perDeviceBatchSize": batch, "gradientAccumulationSteps": accumulation},
        **({"spec__deepspeed": deepspeed} if deepspeed else {})))


def test_without_a_gpu_one_worker_uses_every_core_and_says_why() -> None:
    plan = local_plan(job(workers=2), gpus=0, cpus=8)
    assert (plan.workers, plan.threads_per_worker, plan.use_gpu) == (1, 8, False)
    assert plan.note is not None
    assert "running 1 local CPU worker x 8 threads" in plan.note and "fastest" in plan.note


def test_fewer_local_workers_accumulate_to_keep_the_specs_global_batch() -> None:
    plan = local_plan(job(workers=16, gpus_per_worker=1, batch=16, accumulation=2), gpus=0, cpus=2)
    assert (plan.workers, plan.accumulation) == (1, 32)
    assert plan.note is not None and "gradient accumulation 32 keeps the global batch of 512 sequences" in plan.note


def test_requested_workers_share_the_cores() -> None:
    plan = local_plan(job(workers=2), gpus=0, cpus=8, requested=2)
    assert (plan.workers, plan.threads_per_worker, plan.accumulation) == (2, 4, 1)


def test_requested_workers_never_get_less_than_one_thread() -> None:
    assert local_plan(job(workers=4), gpus=0, cpus=2, requested=4).threads_per_worker == 1


def test_a_global_batch_that_cannot_be_kept_is_said() -> None:
    plan = local_plan(job(workers=3, batch=4), gpus=0, cpus=2, requested=2)
    assert plan.accumulation == 1
    assert plan.note is not None and "the global batch is 8 sequences, not 12" in plan.note


def test_with_gpus_one_worker_per_gpu_the_spec_would_use_and_no_thread_setting() -> None:
    plan = local_plan(job(workers=16, gpus_per_worker=1), gpus=2, cpus=32)
    assert (plan.workers, plan.use_gpu, plan.threads_per_worker, plan.accumulation) == (2, True, None, 8)


def test_a_job_this_machine_runs_as_written_gets_no_note() -> None:
    plan = local_plan(job(workers=1, zeroStage=0, offloadOptimizer="none"), gpus=0, cpus=2)
    assert (plan.workers, plan.threads_per_worker, plan.accumulation, plan.note) == (1, 2, 1, None)
    assert plan.zero_stage is None


def test_one_cpu_worker_trains_without_zero_sharding_or_offload_and_says_why(tmp_path: Path) -> None:
    ftj = job(workers=2, zeroStage=3, offloadOptimizer="cpu")
    plan = local_plan(ftj, gpus=0, cpus=2)
    assert plan.zero_stage == 0
    assert plan.note is not None and "ZeRO stage 0 instead of 3 and no CPU offload" in plan.note
    ds = plan.config(ftj, tmp_path).spec.deepspeed
    assert (ds.zero_stage, ds.offload_optimizer, ds.offload_params) == (0, "none", "none")
    assert (ftj.spec.deepspeed.zero_stage, ftj.spec.deepspeed.offload_optimizer) == (3, "cpu")  # the job as written


def test_several_workers_gpus_or_a_raw_deepspeed_config_keep_the_specs_zero_stage() -> None:
    assert local_plan(job(workers=2, zeroStage=2), gpus=0, cpus=4, requested=2).zero_stage is None
    assert local_plan(job(workers=1, gpus_per_worker=1, zeroStage=3), gpus=1, cpus=4).zero_stage is None
    raw = job(workers=1, zeroStage=2, offloadOptimizer="none", configMapRef={"name": "ds", "key": "ds.json"})
    assert local_plan(raw, gpus=0, cpus=2).zero_stage is None


def test_the_plan_reaches_the_trainer_config_and_leaves_the_job_alone(tmp_path: Path) -> None:
    ftj = job(workers=2, accumulation=3)
    cfg = local_plan(ftj, gpus=0, cpus=4).config(ftj, tmp_path)
    assert (cfg.workers, cfg.use_gpu, cfg.threads_per_worker) == (1, False, 4)
    assert cfg.spec.hyperparameters.gradient_accumulation_steps == 6
    assert ftj.spec.hyperparameters.gradient_accumulation_steps == 3


@pytest.mark.parametrize("cpus", [0, -1])
def test_a_machine_that_reports_no_cpu_still_gets_one_thread(cpus: int) -> None:
    assert local_plan(job(), gpus=0, cpus=cpus).threads_per_worker == 1
