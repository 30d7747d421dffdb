"""scripts/gpu_check.py, the check made for a GPU host without Ray: its --dry-run on the CPU, and how it
installs only what such a host lacks from its bundle."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from support.workspace import write_workspace
from viggo_like import viggo_like_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """The script as the GPU host runs it (its own process, no Ray imported), in --dry-run mode on a tiny
    Llama whose tokenizer has no pad token (as SmolLM2's), with ViGGO-style rows as ViGGO's CSV files."""
    root = tmp_path_factory.mktemp("gpu-check")
    rows = viggo_like_rows(120, seed=3)
    write_workspace(root, rows, n_train=96)
    (root / "viggo").mkdir()
    for name, part in (("train", rows[:96]), ("valid", rows[96:])):
        with (root / "viggo" / f"{name}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["mr", "ref"])
            writer.writerows([r["mr"], r["ref"]] for r in part)
    from transformers import AutoTokenizer

    shutil.copytree(root / "base", root / "base-nopad")  # SmolLM2's tokenizer has no pad token either
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    tokenizer.pad_token = None
    tokenizer.save_pretrained(root / "base-nopad")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("api", "contract", "trainer", "serving", "scripts"))}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(root / "out"), "--dry-run",
         "--tokenizer", str(root / "base"), "--base-model", str(root / "base-nopad"), "--viggo", str(root / "viggo")],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    return done, json.loads((root / "out" / "gpu_check.json").read_text())


def test_the_dry_run_passes_and_writes_one_json(dry_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    done, report = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["errors"] == {} and report["host"]["dry_run"] is True
    assert {"gemm", "step", "viggo"} <= report.keys() and report["gemm"]["flops"] > 0


def test_what_the_check_imports_needs_no_ray() -> None:
    probe = subprocess.run([sys.executable, "-c", (
        "import sys; import gpu_check, kubetune.trainer.engine, kubetune.trainer.consolidate, "
        "kubetune.trainer.checkpoint, kubetune.trainer.data, kubetune.serving.scorers; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in (
            "api", "contract", "trainer", "serving", "scripts"))}, capture_output=True, text=True, check=True)
    assert probe.stdout.strip().splitlines()[-1] == "[]"


def test_the_trainer_step_runs_under_zero_2_and_zero_3_with_a_streamed_consolidation(
        dry_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    _, report = dry_run
    for stage in (2, 3):
        result = report["step"][f"zero{stage}"]
        assert result["zero_stage"] == stage and result["tokens_per_s"] > 0 and 0 < result["mfu_vs_measured_gemm"]
        assert result["padding"] < 0.05  # length-grouped batches
        consolidation = result["consolidation"]
        assert consolidation["matches_engine"] is True
        assert consolidation["bytes"] == 4 * result["params"]  # fp32 on the CPU, every parameter once
        assert consolidation["files"] > 2  # shards + index (64 KiB shards in the dry run)


def test_the_viggo_fine_tune_is_decoded_and_scored_by_the_viggo_scorer(
        dry_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    _, report = dry_run
    viggo = report["viggo"]
    assert [e["epoch"] for e in viggo["epochs"]] == [1]
    assert viggo["rows"] == {"train": 48, "validation": 12}
    generation = viggo["generation"]
    assert generation["rows"] == 8 and generation["kept"] == 8
    assert {"exactMatch", "functionAccuracy", "parseRate"} <= generation["metrics"].keys()


def _wheel(folder: Path, dist: str, version: str, module: str) -> Path:
    path = folder / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", f"VERSION = {version!r}\n")
    return path


def test_the_bundle_installs_only_what_the_host_lacks(tmp_path: Path) -> None:
    wheels = tmp_path / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    _wheel(wheels, "kubetune-absent-dist", "1.0", "kubetune_absent_module")
    _wheel(wheels, "pydantic", "99.0", "pydantic_from_bundle")  # installed here (>= 2.0): left alone
    code = ("import sys, json, gpu_check; added = gpu_check.bootstrap(__import__('pathlib').Path(sys.argv[1])); "
            "import kubetune_absent_module; print(json.dumps(added))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bundle")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "scripts")}, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"kubetune-absent-dist": "1.0"}
    assert not (tmp_path / "bundle" / "site" / "pydantic_from_bundle").exists()
