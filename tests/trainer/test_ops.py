"""kubetune.trainer.ops: DeepSpeed's CPU ops built once by the driver; a lock file a killed build left behind
never makes a run wait forever (it did: a stale cpu_adam lock hung every later CPU-offload run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from factories import ftj
from kubetune.trainer import ops
from kubetune.trainer.config import TrainConfig, from_finetunejob

pytest.importorskip("deepspeed")


def config(use_gpu: bool, offload: str) -> TrainConfig:
    job = ftj(spec__deepspeed={"zeroStage": 2, "offloadOptimizer": offload})
    return from_finetunejob(job, Path("/tmp/ops"), workers=1, use_gpu=use_gpu)


def test_cpu_runs_build_the_shared_memory_all_reduce_and_cpu_adam_only_with_offload() -> None:
    assert ops.needed(config(use_gpu=False, offload="none")) == [ops.SHARED_MEMORY_COMM]
    assert ops.needed(config(use_gpu=False, offload="cpu")) == [
        ops.SHARED_MEMORY_COMM, ops.CPU_ADAM]
    assert ops.needed(config(use_gpu=True, offload="cpu")) == []


def test_a_lock_file_left_by_a_killed_build_is_removed_and_the_op_loads(tmp_path: Path) -> None:
    """In a subprocess with a deadline: were the stale lock kept, torch would wait on it forever."""
    root = ops.extensions_root()  # the session's extensions cache (make test sets TORCH_EXTENSIONS_DIR)
    ops.build([ops.SHARED_MEMORY_COMM])  # built (or loaded) once, so that the check below is quick
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().create_op_builder(ops.SHARED_MEMORY_COMM).NAME
    stale = root / name / "lock"
    stale.touch()  # what a build killed between creating its lock and removing it leaves
    code = ("import logging, sys; logging.basicConfig(stream=sys.stdout); "
            "from kubetune.trainer import ops; ops.build([ops.SHARED_MEMORY_COMM]); print('loaded')")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=False,
                              env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"ops.build waited on the stale {stale} (the run would hang forever)")
    finally:
        stale.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded" in done.stdout and "did not finish" in done.stdout
