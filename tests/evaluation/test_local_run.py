"""`kubetune run finetunejob.yaml evaljob.yaml`: train, serve locally with Ray Serve, evaluate, report.

The command a user types, as a subprocess, once for the module: a tiny Llama is fine-tuned for one epoch
(2 Ray Train workers, DeepSpeed ZeRO-0 on CPU), then the EvalJob serves the best checkpoint and the base
model side by side on local Ray Serve and scores both on held-out rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from factories import evj_manifest, ftj_manifest
from support.workspace import write_workspace
from viggo_like import viggo_like_rows

# By name (make test-slow): four minutes; `kubetune run` end to end is in make test through
# tests/test_reproduce.py (make reproduce TASK=viggo SCALE=smoke: SmolLM2 trained, served and scored).
pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "kubetune" / "torch_extensions")}
ROWS = viggo_like_rows(136, seed=4)
TEST_ROWS = ROWS[120:]


@dataclass
class LocalRun:
    out: subprocess.CompletedProcess[str]
    runs: Path
    workspace: Path


def manifests(ws: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    finetune = ftj_manifest(
        "cli", spec__baseModel={"uri": str(ws / "base")},
        spec__dataset__train={"uri": str(ws / "train.jsonl")},
        spec__dataset__validation={"uri": str(ws / "valid.jsonl")}, spec__dataset__maxLength=96,
        spec__hyperparameters={"epochs": 1, "learningRate": 3e-3, "perDeviceBatchSize": 16, "warmupRatio": 0.0,
                               "scheduler": "constant"},
        spec__deepspeed={"zeroStage": 0, "offloadOptimizer": "none", "precision": "fp32",
                         "gradientCheckpointing": False},
        spec__resources={"workers": 2, "gpusPerWorker": 0},
        spec__output={"uri": str(ws / "runs" / "cli"), "keepCheckpoints": 1})
    base = {"name": "base-few-shot", "model": {"uri": str(ws / "base")},
            "prompt": {"template": "Sentence: {ref}\nMeaning representation:", "answer": " {mr}",
                       "fewShot": {"k": 2, "source": {"uri": str(ws / "train.jsonl")}}},
            "generation": {"maxTokens": 24, "stop": ["\n"]}}
    evaluation = evj_manifest(
        "cli-eval", spec__candidates=[{"name": "fine-tuned", "model": {"fineTuneJobRef": {"name": "cli"}},
                                       "generation": {"maxTokens": 24}}, base],
        spec__dataset={"uri": str(ws / "test.jsonl"), "reference": "{mr}"},
        spec__serving={"engine": "transformers", "gpusPerReplica": 0, "maxBatchSize": 16},
        spec__concurrency=16, spec__output={"uri": str(ws / "runs" / "report")})  # under --output
    for doc in (finetune, evaluation):
        doc["metadata"].pop("namespace")
    return finetune, evaluation


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> LocalRun:
    ws = write_workspace(tmp_path_factory.mktemp("local-run"), ROWS[:120], n_train=96)
    (ws / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST_ROWS))
    finetune, evaluation = manifests(ws)
    (ws / "ftj.yaml").write_text(yaml.safe_dump(finetune))
    (ws / "evj.yaml").write_text(yaml.safe_dump(evaluation))
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", str(ws / "ftj.yaml"), str(ws / "evj.yaml"),
                          "--output", str(ws / "runs")], capture_output=True, text=True, timeout=900,
                         check=False, env={**os.environ, **ENV}, cwd=ws)
    return LocalRun(out, ws / "runs", ws)


def test_the_run_exits_0(local_run: LocalRun) -> None:
    assert local_run.out.returncode == 0, local_run.out.stdout[-3000:] + local_run.out.stderr[-3000:]


def test_training_writes_result_and_learning_curve(local_run: LocalRun) -> None:
    assert (local_run.runs / "cli" / "result.json").exists()
    assert (local_run.runs / "cli" / "learning_curve.png").exists()
    assert "best checkpoint:" in local_run.out.stdout and "base model:" in local_run.out.stdout


def test_the_table_compares_the_fine_tuned_model_with_the_base_model(local_run: LocalRun) -> None:
    lines = local_run.out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("candidate "))
    assert "exactMatch" in lines[header] and "prompt tok/req" in lines[header]
    assert [line.split()[0] for line in lines[header + 2:header + 4]] == ["fine-tuned", "base-few-shot"]


def test_the_report_path_is_printed_and_the_report_has_the_learning_curve(local_run: LocalRun) -> None:
    report = local_run.runs / "report" / "report.html"
    assert f"report: {report}" in local_run.out.stdout
    page = report.read_text()
    assert "alt='learning_curve.png'" in page and "alt='metrics.png'" in page


def test_the_fine_tuned_candidate_is_the_best_checkpoint_in_its_own_format(local_run: LocalRun) -> None:
    results = json.loads((local_run.runs / "report" / "results.json").read_text())
    tuned = next(c for c in results["candidates"] if c["name"] == "fine-tuned")
    assert tuned["model"] == str(local_run.runs / "cli" / "best")
    assert tuned["prompt"] == f"<START_Q>{TEST_ROWS[0]['ref']}<END_Q><START_A>"
    assert results["learningCurve"][0]["epoch"] == 1 and results["baseValPerplexity"] > 1
    assert len(results["examples"]) == len(TEST_ROWS)
