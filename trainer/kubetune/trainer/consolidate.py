"""One Hugging Face checkpoint of a (possibly ZeRO-3-partitioned) model, streamed: no process holds it all.

`write_consolidated` writes the model's weights as safetensors files of at most `max_shard_bytes` each
(`model.safetensors`, or `model-00001-of-0000N.safetensors` + `model.safetensors.index.json`: Hugging
Face's sharded format, which `from_pretrained`, vLLM and the serving app read):

1. The plan comes from the parameters' metadata alone (names, full shapes, dtypes; a ZeRO-3 parameter's
   `ds_shape`), before any weight is gathered: which tensor goes into which file at which offset.
2. Each file's safetensors header is written first, then the tensors' bytes in header order, a group
   of consecutive tensors at a time: under ZeRO-3 every rank gathers the group
   (`deepspeed.zero.GatheredParameters`, an all-gather), the writer (rank 0) streams its bytes to the file
   and the group is released before the next. Without ZeRO-3 each rank already holds the whole model and
   the writer streams it directly.

So the extra memory of a consolidation is one gathered group (at most `gather_bytes`, or one tensor when a
tensor is larger) plus one tensor's host copy when training on a GPU: independent of the model's size.
Parameters shared by several modules (tied input/output embeddings) are written once, under their first
name, as `save_pretrained` does. Keys are the module's own state-dict names: right for the model families
whose checkpoints use them unchanged (Llama, Mistral, Qwen, ...).

`publish_model` puts such a checkpoint (plus config, generation config and tokenizer) at a fixed place and
marks it complete (`kubetune_best.json` written last; a local directory is swapped in by renames).

No Ray here: the trainer's workers and the GPU check (`make gpu-check`) both run this code.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MARKER = "kubetune_best.json"  # written last: the directory is complete (epoch, val perplexity, files)
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
DEFAULT_GATHER_BYTES = 256 * 2**20

_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


@dataclass(frozen=True)
class Entry:
    """One tensor of the checkpoint: its name, full shape and dtype (known without gathering it)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name without "torch.", e.g. "bfloat16"
    nbytes: int
    tensor: Any = field(compare=False, repr=False)  # the Parameter or buffer (maybe ZeRO-3-partitioned)

    @property
    def partitioned(self) -> bool:
        return hasattr(self.tensor, "ds_id")


@dataclass
class Shard:
    file: str
    entries: list[Entry]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass
class Consolidation:
    """What `write_consolidated` wrote (on every rank; only the writer wrote files)."""

    files: list[str]
    tensors: int
    total_bytes: int
    largest_shard_bytes: int
    largest_tensor_bytes: int
    seconds: float


def model_entries(module: torch.nn.Module) -> list[Entry]:
    """The module's parameters and persistent buffers in state-dict order, each shared tensor once."""
    import torch

    entries: list[Entry] = []
    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        tensors = [*sub._parameters.items(),
                   *((n, b) for n, b in sub._buffers.items() if n not in sub._non_persistent_buffers_set)]
        for name, tensor in tensors:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            shape = tuple(int(d) for d in getattr(tensor, "ds_shape", tensor.shape))
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in _SAFETENSORS_DTYPES:
                raise TypeError(f"{dot}{name}: dtype {tensor.dtype} has no safetensors encoding")
            numel = 1
            for d in shape:
                numel *= d
            itemsize = torch.empty((), dtype=tensor.dtype).element_size()
            entries.append(Entry(f"{dot}{name}", shape, dtype, numel * itemsize, tensor))
    return entries


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int) -> list[Shard]:
    """Consecutive entries packed into files of at most `max_shard_bytes` (a larger tensor gets a file of
    its own), named as Hugging Face names them."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups: list[list[Entry]] = []
    size = 0
    for entry in entries:
        if not groups or (groups[-1] and size + entry.nbytes > max_shard_bytes):
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    if len(groups) <= 1:
        return [Shard(SINGLE_FILE, groups[0] if groups else [])]
    n = len(groups)
    return [Shard(f"model-{i:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups, start=1)]


def safetensors_header(entries: Sequence[Entry]) -> bytes:
    """The safetensors prefix of a file holding `entries` in this order: 8-byte little-endian length, then
    the JSON header (padded with spaces to a multiple of 8 bytes, as the safetensors library does)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _groups(entries: Sequence[Entry], gather_bytes: int) -> Iterator[list[Entry]]:
    """Consecutive entries of at most `gather_bytes` together (a larger tensor alone)."""
    group: list[Entry] = []
    size = 0
    for entry in entries:
        if group and size + entry.nbytes > gather_bytes:
            yield group
            group, size = [], 0
        group.append(entry)
        size += entry.nbytes
    if group:
        yield group


@contextlib.contextmanager
def gathered(group: Sequence[Entry]) -> Iterator[None]:
    """The group's ZeRO-3-partitioned tensors whole on every rank for the block (collective), then released."""
    partitioned = [e.tensor for e in group if e.partitioned]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _write_tensor(out: Any, entry: Entry) -> None:
    import torch

    tensor = entry.tensor.detach()
    if tuple(tensor.shape) != entry.shape:
        raise RuntimeError(f"{entry.name}: shape {tuple(tensor.shape)} after gathering, expected {entry.shape}")
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")  # one tensor's host copy at a time
    tensor = tensor.contiguous().reshape(-1)
    out.write(memoryview(tensor.view(torch.uint8).numpy()))


def write_consolidated(module: torch.nn.Module, fs: Any, directory: str, *, writer: bool,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       gather_bytes: int = DEFAULT_GATHER_BYTES) -> Consolidation:
    """Write `module`'s weights into `directory` on `fs` (an fsspec filesystem) as size-limited safetensors
    files (+ an index when there are several). Every rank calls it when the model is ZeRO-3-partitioned
    (the gathers are collective); only the `writer` writes. Returns what was (or would be) written."""
    started = time.monotonic()
    entries = model_entries(module)
    shards = plan_shards(entries, max_shard_bytes)
    for shard in shards:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(fs.open(f"{directory}/{shard.file}", "wb")) if writer else None
            if out is not None:
                out.write(safetensors_header(shard.entries))
            for group in _groups(shard.entries, gather_bytes):
                with gathered(group):
                    for entry in group if out is not None else ():
                        _write_tensor(out, entry)
    if writer and len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: s.file for s in shards for e in s.entries}}
        with fs.open(f"{directory}/{INDEX_FILE}", "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    files = [s.file for s in shards] + ([INDEX_FILE] if len(shards) > 1 else [])
    return Consolidation(files=files, tensors=len(entries), total_bytes=sum(e.nbytes for e in entries),
                         largest_shard_bytes=max(s.nbytes for s in shards),
                         largest_tensor_bytes=max((e.nbytes for e in entries), default=0),
                         seconds=time.monotonic() - started)


# ------------------------------------------------------------------------------------------- publishing

def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def read_marker(fs: Any, directory: str) -> dict[str, Any] | None:
    """The completion marker of a published model (epoch, val_perplexity, files), or None."""
    try:
        with fs.open(f"{directory}/{MARKER}", "r") as f:
            marker: dict[str, Any] = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return marker


def publish_model(module: torch.nn.Module, tokenizer: Any, fs: Any, directory: str, *, rank: int,
                  metadata: dict[str, Any], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  gather_bytes: int = DEFAULT_GATHER_BYTES) -> Consolidation:
    """A complete Hugging Face checkpoint of `module` (weights streamed by `write_consolidated`, config,
    generation config, tokenizer) at `directory`, replacing what was there; every rank calls it.

    Complete or marked incomplete: a local directory is written next to its place and swapped in by
    renames; in an object store (no renames) the old marker is deleted first and the new one, holding
    `metadata` and the file list, written last. `read_marker` tells which model a directory holds.
    """
    writer = rank == 0
    local = _is_local(fs)
    target = f"{directory}.partial" if local else directory
    if writer:
        if fs.exists(target):
            fs.rm(target, recursive=True)
        fs.makedirs(target, exist_ok=True)
    result = write_consolidated(module, fs, target, writer=writer, max_shard_bytes=max_shard_bytes,
                                gather_bytes=gather_bytes)
    if writer:
        with tempfile.TemporaryDirectory() as tmp:
            config = getattr(module, "config", None)
            if config is not None:
                config.save_pretrained(tmp)
            generation = getattr(module, "generation_config", None)
            if generation is not None:
                generation.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            extra = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
            for file in extra:
                fs.put_file(str(file), f"{target}/{file.relative_to(tmp).as_posix()}")
        marker = {**metadata, "files": sorted([*result.files, *(f.relative_to(tmp).as_posix() for f in extra)])}
        with fs.open(f"{target}/{MARKER}", "w") as f:
            f.write(json.dumps(marker, indent=2) + "\n")
        if local:
            _swap_in(Path(target), Path(directory))
    return result


def _swap_in(new: Path, final: Path) -> None:
    old = final.with_name(f"{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    new.rename(final)
    if old.exists():
        shutil.rmtree(old)
