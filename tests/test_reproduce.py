"""`make reproduce TASK=... SCALE=...` (scripts/reproduce.py): the seed's table on real data.

The ViGGO smoke run is real end to end (SmolLM2-135M-Instruct fine-tuned on real rows, served, scored
against its few-shot self); the other tasks' and scales' manifests are validated against the CRD models and
their data splits checked for held-out groups, which costs seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import reproduce
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob
from support.shared import DATASETS, ROOT, require


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


@pytest.mark.parametrize("scale", ["smoke", "cpu", "full"])
@pytest.mark.parametrize("task", sorted(reproduce.RECIPES))
def test_every_task_and_scale_makes_a_valid_finetunejob_and_evaljob(task: str, scale: str, tmp_path: Path) -> None:
    recipe = reproduce.RECIPES[task]
    ftj, evj = reproduce.manifests(task, scale, recipe, recipe.sizes[scale], tmp_path)
    job = FineTuneJob.model_validate(ftj)
    evaluation = EvalJob.model_validate(evj)
    assert job.spec.dataset.truncation == "dropTruncated"  # a cut answer never teaches stopping mid-answer
    assert [c.name for c in evaluation.spec.candidates] == ["fine-tuned", "base-few-shot"]
    assert Path(evaluation.spec.dataset.uri).name == "test.jsonl" != Path(job.spec.dataset.train.uri).name


def test_samples_are_seeded_and_keep_the_rows_order() -> None:
    rows = [{"i": i} for i in range(100)]
    first = reproduce.sample(rows, 10, seed=3)
    assert first == reproduce.sample(rows, 10, seed=3) != reproduce.sample(rows, 10, seed=4)
    assert [r["i"] for r in first] == sorted(r["i"] for r in first)
    assert reproduce.sample(rows, None, seed=3) == rows


@pytest.mark.parametrize(("task", "group"), [("viggo", "mr"), ("gsm8k", "question"), ("sql", "db_id")])
def test_test_rows_share_no_group_with_training_or_validation(task: str, group: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    source = require(DATASETS / reproduce.SOURCE[task], f"the {task} held-out split is not checked on real data")
    monkeypatch.chdir(ROOT)
    size = reproduce.RECIPES[task].sizes["cpu"]
    info = reproduce.prepare_data(task, source, size, tmp_path, seed=0)
    seen = {r[group] for split in ("train", "valid") for r in read(tmp_path / f"{split}.jsonl")}
    test = read(tmp_path / "test.jsonl")
    assert test and not {r[group] for r in test} & seen
    assert {s: c["rows"] for s, c in info["rows"].items()} == {s: len(read(tmp_path / f"{s}.jsonl"))
                                                               for s in ("train", "valid", "test")}
    if task == "viggo":  # train.csv and valid.csv share meaning representations: those rows left training
        assert info["rows"]["train"]["sharedWithTest"] > 0


def test_the_make_target_runs_the_script() -> None:
    make = subprocess.run(["make", "-n", "reproduce", "TASK=sql", "SCALE=cpu", "REPRODUCE_OUT=/x"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    assert "scripts/reproduce.py sql cpu --output /x" in make


def test_viggo_smoke_fine_tunes_serves_scores_and_prints_the_seed_table(tmp_path: Path) -> None:
    """`make reproduce TASK=viggo SCALE=smoke` for real: ~3 minutes on 2 cores."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "scripts"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "scripts/reproduce.py", "viggo", "smoke", "--output", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "viggo-smoke" / "reproduce.json").read_text())
    size = reproduce.RECIPES["viggo"].sizes["smoke"]
    assert summary["data"]["train"]["rows"] == size.train and summary["data"]["test"]["rows"] == size.test
    assert summary["epochs"] == size.epochs and summary["learningCurve"]
    by_name = {c["name"]: c for c in summary["candidates"]}
    assert set(by_name) == {"fine-tuned", "base-few-shot"}
    for candidate in by_name.values():
        assert {"exactMatch", "exactMatchUnordered"} <= set(candidate["metrics"])
        assert candidate["examples"] == size.test and candidate["promptTokensPerRequest"] > 0
    # The few-shot prompt is what fine-tuning saves: far more prompt tokens per request.
    assert by_name["base-few-shot"]["promptTokensPerRequest"] > 5 * by_name["fine-tuned"]["promptTokensPerRequest"]
    assert "seed (Anyscale, Llama-2)" in run.stdout and "exactMatchUnordered" in run.stdout
    assert (tmp_path / "viggo-smoke" / "eval" / "report.html").is_file()
