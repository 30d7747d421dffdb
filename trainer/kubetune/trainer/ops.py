"""DeepSpeed's C++ ops that a CPU run compiles on first use, built once by the driver before any worker starts.

Why: without this, every worker compiles them itself on first use (torch's JIT extensions), serialised by a
lock file in the extensions directory (`<TORCH_EXTENSIONS_DIR>/<op>/lock`, torch's FileBaton). A build that
is killed half-way (a worker OOM-killed, Ctrl-C, a timeout) leaves that lock file behind, and every later
run on the machine then waits for it forever, with nothing in any log. The driver builds the ops first,
under an flock of its own in the extensions directory: while it holds that, a lock file of an op it builds
was left by a build that died (kubetune's builds all take the flock first; the workers start afterwards and
find the ops built), so it is removed with a warning. The workers then only load the built ops.

GPU runs are left alone (their images ship the ops prebuilt, or compile CUDA ops per node). Where DeepSpeed
was installed with the ops prebuilt, `load` returns them at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

from kubetune.trainer.config import TrainConfig

log = logging.getLogger(__name__)

BUILD_LOCK = ".kubetune-build.lock"  # the flock kubetune's builds take, in the extensions directory
SHARED_MEMORY_COMM = "ShareMemCommBuilder"  # DeepSpeed's CPU accelerator: its all-reduce, built at init
CPU_ADAM = "CPUAdamBuilder"  # DeepSpeedCPUAdam: the optimizer of ZeRO's optimizer offload


def needed(cfg: TrainConfig) -> list[str]:
    """The op builders `cfg`'s workers would compile on first use (none on GPUs)."""
    if cfg.use_gpu:
        return []
    names = [SHARED_MEMORY_COMM]
    if cfg.spec.deepspeed.offload_optimizer == "cpu":  # else torch's AdamW (deepspeed_config: torch_adam)
        names.append(CPU_ADAM)
    return names


def extensions_root() -> Path:
    """Where torch builds JIT extensions: $TORCH_EXTENSIONS_DIR, else its per-user cache."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def build(names: list[str], timeout: float = 900.0) -> None:
    """Build (or load, when built) each op builder in `names`, removing lock files that dead builds left.

    Waits at most `timeout` seconds for another kubetune process that is building them (TimeoutError).
    """
    if not names:
        return
    from deepspeed.accelerator import get_accelerator

    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with (root / BUILD_LOCK).open("w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building DeepSpeed's ops in {root} for "
                                       f"{timeout:.0f} s") from None
                time.sleep(0.5)
        try:
            for name in names:
                builder = get_accelerator().create_op_builder(name)
                stale = root / builder.NAME / "lock"
                if stale.exists():
                    log.warning("removing %s: a build of DeepSpeed's %s op that did not finish left it, and "
                                "every later run would wait for it forever", stale, builder.NAME)
                    stale.unlink(missing_ok=True)
                builder.load(verbose=False)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
