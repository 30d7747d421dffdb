"""The trainer end to end on CPU: a tiny random Llama, 2 Ray Train workers over gloo, real DeepSpeed.

Each run is a real `TorchTrainer.fit()`: DDP (ZeRO-0), ZeRO-2, ZeRO-3 with CPU optimizer offload.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from factories import ftj_manifest
from kubetune.api.finetunejob import FineTuneJob
from kubetune.trainer.config import TrainConfig, from_finetunejob
from kubetune.trainer.data import DataError
from kubetune.trainer.driver import RunResult, run
from kubetune.trainer.local import local_plan
from support.workspace import VIGGO_SPECIAL_TOKENS, write_workspace
from viggo_like import viggo_like_rows

ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "kubetune" / "torch_extensions")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base model (random Llama + BPE tokenizer, no ViGGO special tokens) and ViGGO-style data."""
    root = tmp_path_factory.mktemp("trainer")
    rows = viggo_like_rows(160, seed=1)
    write_workspace(root, rows, n_train=128)
    for name, part in (("train", rows[:128]), ("valid", rows[128:])):
        # The dialogue act alone ("inform", "give_opinion", ...): short enough for the tiny model to
        # learn answer-then-stop in a few seconds.
        acts = [{"ref": r["ref"], "mr": r["mr"].split("(")[0]} for r in part]
        (root / f"{name}-acts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in acts))
    return root


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    import ray

    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": ENV}, log_to_driver=False)
    yield
    ray.shutdown()


def job(workspace: Path, name: str, **paths: Any) -> FineTuneJob:
    defaults: dict[str, Any] = {
        "spec__baseModel": {"uri": str(workspace / "base")},
        "spec__dataset__train": {"uri": str(workspace / "train.jsonl")},
        "spec__dataset__validation": {"uri": str(workspace / "valid.jsonl")},
        "spec__dataset__maxLength": 96,
        "spec__hyperparameters": {"epochs": 2, "learningRate": 3e-3, "perDeviceBatchSize": 16,
                                  "warmupRatio": 0.0, "scheduler": "constant"},
        "spec__deepspeed": {"zeroStage": 0, "offloadOptimizer": "none", "precision": "fp32",
                            "gradientCheckpointing": False},
        "spec__resources": {"workers": 2, "gpusPerWorker": 0},
        "spec__output": {"uri": str(workspace / "runs" / name), "keepCheckpoints": 1},
    }
    body = ftj_manifest(name, **{**defaults, **paths})
    body["metadata"]["uid"] = f"uid-{name}"
    return FineTuneJob.from_body(body)


def config(workspace: Path, name: str, **paths: Any) -> TrainConfig:
    return from_finetunejob(job(workspace, name, **paths), workspace / "runs" / name, workers=2, use_gpu=False)


@pytest.fixture(scope="module")
def ddp_run(workspace: Path, local_ray: None) -> RunResult:
    # Enough optimizer steps (5 epochs x 8 per worker) for the tiny model to learn the format and stop token.
    return run(config(workspace, "ddp", spec__hyperparameters={
        "epochs": 5, "learningRate": 5e-3, "perDeviceBatchSize": 8, "warmupRatio": 0.0, "scheduler": "constant"}),
        echo=False)


def assert_learned(result: RunResult) -> None:
    summary = json.loads((result.output_dir / "result.json").read_text())
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss
    assert result.best is not None
    assert result.best.val_perplexity < summary["baseValPerplexity"]


def test_ddp_trains_and_loss_falls(ddp_run: RunResult) -> None:
    assert [e.epoch for e in ddp_run.epochs] == [1, 2, 3, 4, 5]
    assert_learned(ddp_run)


def test_kept_checkpoint_is_the_argmin_of_val_perplexity(ddp_run: RunResult) -> None:
    best_epoch = min(ddp_run.epochs, key=lambda e: e.val_perplexity)
    assert ddp_run.best is not None
    assert (ddp_run.best.epoch, ddp_run.best.val_perplexity) == (best_epoch.epoch, best_epoch.val_perplexity)
    kept = sorted(p.name for p in (ddp_run.output_dir / "checkpoints").glob("epoch-*"))
    assert kept == [f"epoch-{best_epoch.epoch:04d}"]  # keepCheckpoints: 1


def test_outputs_are_written(ddp_run: RunResult) -> None:
    out = ddp_run.output_dir
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    assert json.loads((out / "result.json").read_text())["best"]["epoch"] == ddp_run.best.epoch  # type: ignore[union-attr]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "best" / "model.safetensors").exists() and (out / "best" / "config.json").exists()


def test_saved_tokenizer_holds_the_special_tokens_above_the_base_vocab(ddp_run: RunResult, workspace: Path) -> None:
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(workspace / "base")
    tuned = AutoTokenizer.from_pretrained(ddp_run.output_dir / "best")
    ids = tuned.convert_tokens_to_ids(VIGGO_SPECIAL_TOKENS)
    assert min(ids) >= len(base)
    assert set(VIGGO_SPECIAL_TOKENS) <= set(tuned.all_special_tokens)


def test_checkpoint_reloads_with_plain_transformers_and_stops_at_the_stop_token(
        workspace: Path, local_ray: None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The loss on the answer alone (lossOn: completion): the act and its stop token, learnt in a few epochs by a
    # tiny model whatever order its batches come in (with the sentence in the loss it is on the edge).
    acts = run(config(workspace, "acts", spec__dataset__train={"uri": str(workspace / "train-acts.jsonl")},
                      spec__dataset__validation={"uri": str(workspace / "valid-acts.jsonl")},
                      spec__dataset__lossOn="completion",
                      spec__hyperparameters={"epochs": 4, "learningRate": 5e-3, "perDeviceBatchSize": 8,
                                             "warmupRatio": 0.0, "scheduler": "constant"}), echo=False)
    directory = acts.output_dir / "best"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    stop = tokenizer.convert_tokens_to_ids("<END_A>")
    row = json.loads((workspace / "valid-acts.jsonl").read_text().splitlines()[0])
    prompt = tokenizer(f"<START_Q>{row['ref']}<END_Q><START_A>", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False, eos_token_id=stop,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert stop in new, tokenizer.decode(new)
    assert new.index(stop) == len(new) - 1  # generation ended at the stop token
    assert len(new) < 40


# ZeRO-3 with CPU offload through Ray Train by name (make test-slow, a minute and more): `make test` trains ZeRO-3
# on 2 ranks in test_checkpoint.py (DeepSpeed without Ray; exact resume and consolidation too).
@pytest.mark.parametrize("stage, offload", [(2, "none"), pytest.param(3, "cpu", marks=pytest.mark.slow)],
                         ids=["zero2", "zero3-cpu-offload"])
def test_deepspeed_zero_trains(workspace: Path, local_ray: None, stage: int, offload: str) -> None:
    result = run(config(workspace, f"zero{stage}", spec__deepspeed={
        "zeroStage": stage, "offloadOptimizer": offload, "precision": "fp32", "gradientCheckpointing": False}),
        echo=False)
    assert [e.epoch for e in result.epochs] == [1, 2]
    assert_learned(result)


def test_the_local_plan_trains_in_one_worker_with_every_core_and_the_specs_optimizer_steps(
        workspace: Path, local_ray: None) -> None:
    ftj = job(workspace, "local", spec__deepspeed={  # the demo's ZeRO-2; 2 workers x 16: a global batch of 32
        "zeroStage": 2, "offloadOptimizer": "none", "precision": "fp32", "gradientCheckpointing": False})
    plan = local_plan(ftj, gpus=0, cpus=2)
    assert (plan.workers, plan.threads_per_worker, plan.accumulation) == (1, 2, 2)
    result = run(plan.config(ftj, workspace / "runs" / "local"), echo=False)
    assert_learned(result)
    steps = [json.loads(line)["step"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8]  # 128 rows / 32 per optimizer step, as 2 workers would take them


@pytest.mark.slow  # exact resume is in make test: test_checkpoint.py (2 ranks, optimizer state, loss curve)
def test_resume_continues_after_the_last_epoch(ddp_run: RunResult, workspace: Path, local_ray: None) -> None:
    output = workspace / "runs" / "resume"
    shutil.copytree(ddp_run.output_dir, output)  # an attempt that finished 5 epochs, as a retry finds it
    for extra in ("best", "result.json", "learning_curve.png"):
        shutil.rmtree(output / extra) if (output / extra).is_dir() else (output / extra).unlink()
    cfg = config(workspace, "resume", spec__hyperparameters={
        "epochs": 6, "learningRate": 5e-3, "perDeviceBatchSize": 8, "warmupRatio": 0.0, "scheduler": "constant"})
    assert cfg.output_dir == output.resolve() and cfg.resume_from is None  # the driver finds the checkpoint
    result = run(cfg, echo=False)
    assert [e.epoch for e in result.epochs] == [1, 2, 3, 4, 5, 6]
    assert [e.val_perplexity for e in result.epochs[:5]] == [e.val_perplexity for e in ddp_run.epochs]


def _kill_a_train_worker_once_epoch_1_is_saved(output: Path, done: threading.Event) -> None:
    """SIGKILL one Ray Train worker of this test's own Ray (a descendant of this process) as soon as the
    epoch-1 checkpoint is complete: a node lost in the middle of epoch 2."""
    import psutil

    from kubetune.trainer import checkpoint
    from kubetune.trainer.output import local_filesystem

    saved = output / "checkpoints" / "epoch-0001"
    while not done.is_set():
        if saved.is_dir() and checkpoint.missing(local_filesystem(), str(saved)) == []:
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if any("RayTrainWorker" in part for part in proc.cmdline()):
                        proc.kill()
                        return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three runs of 3 epochs
def test_a_run_killed_mid_epoch_resumes_exactly_where_an_uninterrupted_one_would_be(
        workspace: Path, local_ray: None) -> None:
    from ray.train import TrainingFailedError

    hyper = {"epochs": 3, "learningRate": 5e-3, "perDeviceBatchSize": 8, "warmupRatio": 0.3, "scheduler": "cosine"}
    zero2 = {"zeroStage": 2, "offloadOptimizer": "none", "precision": "fp32", "gradientCheckpointing": False}
    uninterrupted = run(config(workspace, "whole", spec__hyperparameters=hyper, spec__deepspeed=zero2), echo=False)

    cfg = config(workspace, "killed", spec__hyperparameters=hyper, spec__deepspeed=zero2)
    done = threading.Event()
    killer = threading.Thread(target=_kill_a_train_worker_once_epoch_1_is_saved, args=(cfg.output_dir, done))
    killer.start()
    try:
        with pytest.raises(TrainingFailedError):
            run(cfg, echo=False)
    finally:
        done.set()
        killer.join()
    resumed = run(cfg, echo=True)  # the RayJob's retry: same spec, same output

    log = (cfg.output_dir / "driver.log").read_text()
    assert re.search(r"resuming after epoch [12] from ", log)
    curve = [(e.epoch, e.train_loss, e.val_loss, e.val_perplexity) for e in resumed.epochs]
    assert curve == [(e.epoch, e.train_loss, e.val_loss, e.val_perplexity) for e in uninterrupted.epochs]
    assert resumed.best is not None and uninterrupted.best is not None
    assert resumed.best.epoch == uninterrupted.best.epoch


def test_preflight_error_names_the_row_before_training(workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ref": "a", "mr": "b"}\n{"ref": "only the sentence"}\n')
    cfg = config(workspace, "bad", spec__dataset__train={"uri": str(bad)})
    with pytest.raises(DataError, match=r"bad.jsonl row 2: .*'mr'"):
        run(cfg, echo=False)


def test_reported_uris_are_in_the_users_terms_not_pod_paths(tmp_path: Path) -> None:
    cfg = from_finetunejob(FineTuneJob.from_body(ftj_manifest("pvc", spec__output__uri="pvc://runs/viggo")),
                           tmp_path / "mnt" / "runs" / "viggo", workers=2, use_gpu=False)
    assert cfg.uri_of(tmp_path / "mnt" / "runs" / "viggo" / "best") == "pvc://runs/viggo/best"
    assert cfg.uri_of(tmp_path / "mnt" / "runs" / "viggo" / "checkpoints" / "epoch-0003") == (
        "pvc://runs/viggo/checkpoints/epoch-0003")


@pytest.mark.parametrize("workers, gpus, expected", [(16, 1, 16), (4, 8, 32), (3, 0, 3)])
def test_one_ray_train_worker_per_gpu_on_a_cluster(workers: int, gpus: int, expected: int, tmp_path: Path) -> None:
    job = FineTuneJob.from_body(ftj_manifest("scale", spec__resources={"workers": workers, "gpusPerWorker": gpus}))
    cfg = from_finetunejob(job, tmp_path)
    assert (cfg.workers, cfg.use_gpu) == (expected, gpus > 0)


def test_the_config_is_the_validated_spec_and_survives_the_trip_to_the_workers(
        workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("KUBETUNE_DEEPSPEED_CONFIG", str(tmp_path / "ds.json"))
    ftj = job(workspace, "trip", spec__baseModel={"uri": "base"}, spec__dataset__train={"uri": "file://train.jsonl"})
    cfg = from_finetunejob(ftj, Path("runs/trip"))
    assert cfg.job == "default/trip" and (cfg.workers, cfg.use_gpu) == (2, False)
    # Local paths absolute (workers run elsewhere); the job's own spec untouched.
    assert cfg.spec.base_model.uri == str(workspace / "base") and ftj.spec.base_model.uri == "base"
    assert cfg.spec.dataset.train.uri == str(workspace / "train.jsonl")
    assert cfg.spec.model_copy(update={"base_model": ftj.spec.base_model, "dataset": ftj.spec.dataset}) == ftj.spec
    assert cfg.output_dir == workspace / "runs" / "trip" and cfg.cache_dir == cfg.output_dir / ".cache"
    assert cfg.output_uri == str(cfg.output_dir) and cfg.deepspeed_config_file == tmp_path / "ds.json"

    wire = cfg.model_dump(mode="json")  # Ray Train's train_loop_config
    json.dumps(wire)
    assert TrainConfig.model_validate(wire) == cfg
    resumed = cfg.model_copy(update={"resume_from": "s3://bucket/run/checkpoints/epoch-0003"})
    assert TrainConfig.model_validate(resumed.model_dump(mode="json")).resume_from == (
        "s3://bucket/run/checkpoints/epoch-0003")
    with pytest.raises(ValidationError, match="extra_forbidden"):  # no untyped side channel
        TrainConfig.model_validate({**wire, "extra": {"resume_from": "x"}})
    with pytest.raises(ValidationError, match="learning_rate"):  # the API's rules hold in the worker too
        TrainConfig.model_validate({**wire, "spec": {**wire["spec"], "hyperparameters": {
            **wire["spec"]["hyperparameters"], "learning_rate": -1}}})
    with pytest.raises(ValueError, match="fineTuneJobRef must be resolved"):
        from_finetunejob(job(workspace, "ref", spec__baseModel={"fineTuneJobRef": {"name": "first"}}), tmp_path)
