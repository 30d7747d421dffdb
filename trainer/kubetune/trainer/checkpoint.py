"""Epoch checkpoints: DeepSpeed's own sharded ones, each rank writing (and reading back) only its part.

An epoch checkpoint directory (`<output>/checkpoints/epoch-NNNN`) holds

    kubetune_state.json      rank 0: epoch, optimizer step, best epoch, history, world size, ...
    deepspeed/...            `engine.save_checkpoint(dir, tag="deepspeed")`: the module (ZeRO-0/1/2: one
                             16-bit or fp32 copy by rank 0; ZeRO-3: each rank's partition), the optimizer
                             state partitioned by rank (fp32 master weights, Adam moments), the LR
                             scheduler and DeepSpeed's step counters
    ranks/rank-NNNNN.json    each rank: the files it wrote and their sizes

so a retry restores the weights, the optimizer and the schedule exactly (`load`), and a checkpoint is
complete only when every rank's list is there and every listed file has its size (`missing`): a rank
killed in the middle of writing leaves a checkpoint that is never resumed from.

A rank needs only its own files plus the shared ones (`files_for_rank`): `fetch` copies just those out of
an object store. No Ray here (the GPU check runs it too); the train loop reports the directory to Ray Train.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

STATE_FILE = "kubetune_state.json"  # inside every checkpoint: epoch, step, val perplexity, ...
TAG = "deepspeed"
RANKS_DIR = "ranks"
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank files (optimizer, ZeRO-3 module)


def rank_manifest(rank: int) -> str:
    return f"{RANKS_DIR}/rank-{rank:05d}.json"


def new_state(world_size: int) -> dict[str, Any]:
    """The state of a run that has not finished an epoch yet (`base_val_perplexity` is added once known)."""
    return {"epoch": 0, "step": 0, "best": None, "history": [], "stopped": False, "world_size": world_size}


def file_rank(name: str) -> int | None:
    """The rank a DeepSpeed checkpoint file belongs to, or None for a file every rank reads."""
    match = _RANK_FILE.search(PurePosixPath(name).name)
    return int(match.group(1)) if match else None


def files_for_rank(names: list[str], rank: int) -> list[str]:
    """The files of a checkpoint that `rank` reads: its own and the shared ones (not the state file)."""
    return [n for n in names if file_rank(n) in (None, rank) and n != STATE_FILE
            and not n.startswith(f"{RANKS_DIR}/") and not PurePosixPath(n).name.startswith(".")]


def save(engine: Any, directory: Path, state: dict[str, Any], rank: int) -> None:
    """Every rank: write this rank's part of the epoch checkpoint into `directory` (local; the same
    shared directory for all ranks, or one of its own that Ray Train then merges). Rank 0 writes the
    state file. Returns when every rank's part is on disk."""
    import torch.distributed as dist

    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)  # ends with a barrier
    written: dict[str, int] = {}
    for file in sorted((directory / TAG).rglob("*")):
        if file.is_file():
            rel = file.relative_to(directory).as_posix()
            if file_rank(rel) == rank or (rank == 0 and file_rank(rel) is None):
                written[rel] = file.stat().st_size
    if rank == 0:
        for file in sorted(directory.glob("*")):  # DeepSpeed's recovery script, next to the tag dir
            if file.is_file() and file.name != STATE_FILE:
                written[file.name] = file.stat().st_size
        (directory / STATE_FILE).write_text(json.dumps(state))
    manifest = directory / rank_manifest(rank)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"rank": rank, "files": written}, sort_keys=True))
    dist.barrier()


def read_state(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(f"{path}/{STATE_FILE}", "r") as f:
            state: dict[str, Any] = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return state


def missing(fs: Any, path: str) -> list[str]:
    """What keeps the checkpoint at `path` (on fsspec `fs`) from being complete; [] when it is."""
    state = read_state(fs, path)
    if state is None:
        return [STATE_FILE]
    sizes = {_relative(fs, path, name): int(info.get("size") or 0)
             for name, info in fs.find(path, detail=True).items()}
    problems: list[str] = []
    for rank in range(int(state.get("world_size", 1))):
        name = rank_manifest(rank)
        if name not in sizes:
            problems.append(name)
            continue
        with fs.open(f"{path}/{name}", "r") as f:
            listed: dict[str, int] = json.loads(f.read())["files"]
        problems += [file for file, size in listed.items() if sizes.get(file) != size]
    return problems


def fetch(fs: Any, path: str, rank: int, dest: Path) -> Path:
    """Copy what `rank` needs of the checkpoint at `path` (on `fs`) into `dest`; returns `dest`.

    `dest` may be shared by the ranks of a node: each file is copied once (under a file lock, next to its
    place then renamed), and a file already there with the right size is kept."""
    from kubetune.contract.storage import file_lock

    root = path.rstrip("/")
    sizes = {_relative(fs, root, name): int(info.get("size") or 0)
             for name, info in fs.find(root, detail=True).items()}
    if STATE_FILE not in sizes:
        raise FileNotFoundError(f"{root}: no {STATE_FILE}")
    for name in [STATE_FILE, *files_for_rank(sorted(sizes), rank)]:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(target.parent / f".{target.name}.lock"):
            if target.exists() and target.stat().st_size == sizes[name]:
                continue
            partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
            fs.get_file(f"{root}/{name}", str(partial))
            os.replace(partial, target)
    return dest


def _relative(fs: Any, root: str, name: str) -> str:
    """`name` (as fsspec's find returns it) relative to `root`."""
    base = str(fs._strip_protocol(root)).rstrip("/")
    if not name.startswith(f"{base}/"):
        raise ValueError(f"{name} is not under {base}")
    return name[len(base) + 1:]


def load(engine: Any, directory: Path, world_size: int) -> dict[str, Any]:
    """Restore the engine (module, optimizer, LR scheduler, DeepSpeed's counters) from the epoch checkpoint
    in local `directory` and return the run state saved with it. Call right after `deepspeed.initialize`
    (ZeRO-3 loads into a freshly partitioned module)."""
    state: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    if int(state.get("world_size", world_size)) != world_size:
        raise RuntimeError(
            f"checkpoint {directory.name} was written by {state['world_size']} workers, this run has "
            f"{world_size}: DeepSpeed's partitioned optimizer state cannot be re-partitioned on load")
    path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {directory / TAG}")
    return state


def remove(directory: Path) -> None:
    """Rank 0, before a retried epoch writes its checkpoint again: what a killed attempt left there."""
    if directory.exists():
        shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
