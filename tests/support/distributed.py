"""Run a function on N ranks of a real process group without Ray: fresh processes (spawn), gloo, CPU.

`run_ranks(target, world, *args)` starts `world` processes, each joins a gloo process group (the env://
variables DeepSpeed reads are set too), calls `target(rank, world, *args)` and hands its picklable return
value back; a rank's exception fails the call with that rank's traceback. DeepSpeed runs on its CPU
accelerator there (DS_ACCELERATOR=cpu, one intra-op thread per process).

Also `allocation_peak()`: the most bytes held at once by what a block of code allocated, counted exactly:
torch's CPU allocations (the profiler's memory events, "Total Allocated") plus Python's (tracemalloc: bytes,
numpy arrays, objects). Deterministic, unlike the resident set (allocator slack, code pages, other threads);
blind to allocations made by other threads (gloo's workers). Once per process: a second profiler session
in the same process crashed here.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import socket
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, target: Callable[..., Any], world: int, port: int, out: str, args: tuple[Any, ...]) -> None:
    os.environ.update(CPU_ENV)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = target(rank, world, *args)
        Path(out, f"rank-{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(target: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """`target(rank, world, *args)` on `world` ranks; their return values, by rank."""
    import torch.multiprocessing as mp

    saved = {k: os.environ.get(k) for k in CPU_ENV}
    os.environ.update(CPU_ENV)  # the children inherit it before importing anything
    try:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(_entry, args=(target, world, _free_port(), out, args), nprocs=world,
                               join=True, start_method="spawn")
            return [pickle.loads(Path(out, f"rank-{r}.pkl").read_bytes()) for r in range(world)]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Peak:
    torch: int = 0  # bytes
    python: int = 0

    @property
    def total(self) -> int:  # an upper bound of what was held at once
        return self.torch + self.python


@contextlib.contextmanager
def allocation_peak() -> Iterator[Peak]:
    """Measure the peak bytes held by allocations made inside the block (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    peak = Peak()
    gc.collect()
    tracemalloc.start()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield peak
        peak.python = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(tmp, "trace.json").read_text())["traceEvents"]
    peak.torch = max((int(e["args"]["Total Allocated"]) for e in events
                      if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), default=0)
