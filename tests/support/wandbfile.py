"""Read a W&B offline run back: the records of its `run-<id>.wandb` transaction log.

wandb 0.31 ships no Python reader for these files any more (`wandb sync` reads them in its Go core). The
file is a LevelDB-style log (W&B's own header, then 32 KiB blocks of length-prefixed, possibly split
records); each record is a `wandb.proto.wandb_internal_pb2.Record`, parsed here with W&B's own protobuf
classes.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B"
BLOCK = 32768
RECORD_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    """The raw records of a .wandb file, split records joined, each record's checksum verified."""
    data = path.read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path}: not a W&B transaction log")
    out: list[bytes] = []
    pending: list[bytes] = []
    pos = 7  # ":W&B", magic (2 bytes), version (1 byte)
    while pos + RECORD_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: bad checksum at offset {pos}")
        pos += RECORD_HEADER + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            pending = [payload]
        elif kind == MIDDLE:
            pending.append(payload)
        elif kind == LAST:
            out.append(b"".join([*pending, payload]))
            pending = []
    return out


@dataclass
class OfflineRun:
    """What an offline run recorded: its identity, config, history rows and final summary."""

    run_id: str = ""
    project: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str, step: str = "trainer/step") -> list[tuple[int, float]]:
        """(step, value) of every history row holding `key`."""
        return [(int(row[step]), row[key]) for row in self.history if key in row]


def _items(items: Any) -> dict[str, Any]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_offline_run(path: Path) -> OfflineRun:
    """The run in a `run-<id>.wandb` file (or the one file in an offline-run folder)."""
    from wandb.proto import wandb_internal_pb2

    if path.is_dir():
        (path,) = path.glob("run-*.wandb")
    run = OfflineRun()
    for raw in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project, run.name = record.run.run_id, record.run.project, record.run.display_name
            run.tags = list(record.run.tags)
            run.config |= {k: v.get("value", v) if isinstance(v, dict) else v
                           for k, v in _items(record.run.config.update).items() if k != "_wandb"}
        elif kind == "config":
            run.config |= {k: v for k, v in _items(record.config.update).items() if k != "_wandb"}
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary |= _items(record.summary.update)
    return run
