"""`kubetune data prepare`: the public files of the examples' three tasks -> the JSON lines they read.

Each task's rows carry the fields that the examples' templates and references name:

| task  | source files (in `--source`)                            | rows written                          |
| ----- | ------------------------------------------------------- | ------------------------------------- |
| viggo | ViGGO's `train.csv` and `valid.csv` (header `mr,ref`)   | `{"ref", "mr"}`                       |
| gsm8k | GSM8K's `train.jsonl` (`question`, `answer`)            | `{"question", "answer"}`              |
| sql   | every `*.json` / `*.jsonl` file: sql-create-context     | `{"question", "context", "answer"}`   |
|       | rows (a JSON array or JSON lines; Spider rows with a    | (+ `db_id` where the source has it)   |
|       | `db_id` too)                                            |                                       |

Splits (`train.jsonl`, `valid.jsonl`, `test.jsonl`) are deterministic for a given source and `seed`, and
never split a group: rows are grouped (ViGGO: by meaning representation; GSM8K: by question; SQL: by
database, i.e. `db_id`, else the row's CREATE TABLE context), the groups ordered by a seeded hash, and whole
groups taken for test, then validation, until each holds at least its share of the rows. ViGGO's train.csv
is all training data and its valid.csv is divided into validation and a held-out test; ViGGO's own test
split is never looked for. GSM8K's and SQL's held-out rows come from the rows given (GSM8K's test.jsonl,
if present, is not read).

Rows are streamed: memory holds one row, a 16-byte digest and a count per group, never a file. The
source is read twice (count and check every row, then write), so nothing is written from a file with a
bad row. Errors name the file, the row and the field, never the data (`kubetune.contract.redact`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
MAX_ROW_CHARS = 1 << 20  # one row (a JSON line, an array item) larger than this is refused
_CHUNK = 1 << 16


class SourceError(ValueError):
    """A source file that cannot be converted; the message names the file and row, never the data."""


class SourceMissing(SourceError):
    """A source file (or directory) the task needs is not there."""


Fields = dict[str, str]


@dataclass(frozen=True)
class Task:
    """One task: what it reads, what each row must have, how rows are grouped and split."""

    name: str
    fields: tuple[str, ...]  # required fields, in the order they are written
    optional: tuple[str, ...]  # written when present
    group_by: str  # for the manifest and messages
    valid_share: float  # default share of the split rows held out for validation
    test_share: float  # default share held out for test
    sources: Callable[[Path], tuple[list[Path], list[Path]]]  # -> (train-only files, files to split)
    key: Callable[[Fields], str]  # the group of a row
    split_all_held_out: bool = False  # the files to split hold no training rows (ViGGO's valid.csv)


@dataclass
class Prepared:
    """What `prepare` wrote: the files, rows and groups per split, and the manifest."""

    task: str
    files: dict[str, Path]  # split -> file (only splits with rows), plus "manifest"
    rows: dict[str, int]
    groups: dict[str, int]  # split -> whole groups in it (splits made of grouped rows only)
    manifest: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- sources


def _need(path: Path) -> Path:
    if not path.is_file():
        raise SourceMissing(f"{path} not found")
    return path


def _viggo_sources(source: Path) -> tuple[list[Path], list[Path]]:
    # train.csv is all training data; valid.csv becomes validation + a held-out test. ViGGO's test.csv is
    # never opened, even when it is there: its rows stay unseen.
    return [_need(source / "train.csv")], [_need(source / "valid.csv")]


def _gsm8k_sources(source: Path) -> tuple[list[Path], list[Path]]:
    return [], [_need(source / "train.jsonl")]


def _sql_sources(source: Path) -> tuple[list[Path], list[Path]]:
    if source.is_file():
        return [], [source]
    files = sorted(p for p in source.glob("*") if p.suffix in (".json", ".jsonl") and p.is_file()) \
        if source.is_dir() else []
    if not files:
        raise SourceMissing(f"no *.json or *.jsonl file in {source}")
    return [], files


def _normalized(text: str) -> str:
    return " ".join(text.split())


TASKS: dict[str, Task] = {
    "viggo": Task("viggo", ("ref", "mr"), (), "meaning representation (mr)", 0.5, 0.5, _viggo_sources,
                  lambda row: row["mr"], split_all_held_out=True),
    "gsm8k": Task("gsm8k", ("question", "answer"), (), "question", 0.05, 0.1, _gsm8k_sources,
                  lambda row: _normalized(row["question"])),
    "sql": Task("sql", ("question", "context", "answer"), ("db_id",), "database (db_id, else the context)",
                0.05, 0.1, _sql_sources,
                lambda row: "db:" + row["db_id"] if row.get("db_id") else "ctx:" + _normalized(row["context"])),
}


# --------------------------------------------------------------------------------------------- reading


def read_rows(path: Path, task: Task) -> Iterator[tuple[str, Fields]]:
    """(where, fields) for each row of a source file: a CSV with a header, JSON lines, or a JSON array of
    objects (told apart by the first character). `where` is `train.csv row 3` / `x.json item 3`."""
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise SourceMissing(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        try:
            if path.suffix == ".csv":
                yield from _csv_rows(handle, path.name, task)
                return
            first = _first_char(handle)
            handle.seek(0)  # the utf-8-sig decoder starts over: a BOM is skipped again
            rows = _json_array(handle, path.name) if first == "[" else _json_lines(handle, path.name)
            for where, obj in rows:
                yield where, _fields(obj, task, where)
        except UnicodeDecodeError as exc:
            raise SourceError(f"{path.name}: not UTF-8 text ({exc.reason})") from None


def _first_char(handle: IO[str]) -> str:
    while chunk := handle.read(_CHUNK):
        stripped = chunk.lstrip()
        if stripped:
            return stripped[0]
    return ""


def _csv_rows(handle: IO[str], name: str, task: Task) -> Iterator[tuple[str, Fields]]:
    reader = csv.reader(handle)
    try:
        header = next(reader, None)
        if header is None:
            raise SourceError(f"{name}: empty file (expected a header with {', '.join(task.fields)})")
        missing = [f for f in task.fields if f not in header]
        if missing:
            raise SourceError(f"{name}: the header has no column {', '.join(repr(m) for m in missing)} "
                              f"(expected {', '.join(task.fields)})")
        index = {f: header.index(f) for f in (*task.fields, *task.optional) if f in header}
        for number, values in enumerate(reader, start=1):
            where = f"{name} row {number}"
            if not values:
                continue
            if len(values) != len(header):
                raise SourceError(f"{where}: {len(values)} values for {len(header)} columns")
            yield where, _fields({f: values[i] for f, i in index.items()}, task, where)
    except csv.Error as exc:  # an over-long field, a stray quote, a NUL: said without the data
        raise SourceError(f"{name} line {reader.line_num}: not valid CSV ({_csv_reason(exc)})") from None


def _csv_reason(exc: csv.Error) -> str:
    text = str(exc)
    return "a value is too long" if "field larger than" in text else text.split(":")[0][:80]


def _json_lines(handle: IO[str], name: str) -> Iterator[tuple[str, Any]]:
    number = 0
    while True:
        line = handle.readline(MAX_ROW_CHARS + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_ROW_CHARS:
            raise SourceError(f"{name} row {number}: longer than {MAX_ROW_CHARS} characters")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{name} row {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield f"{name} row {number}", obj


def _json_array(handle: IO[str], name: str) -> Iterator[tuple[str, Any]]:
    """The objects of a JSON array `[{...}, {...}]`, decoded one at a time from a bounded buffer."""
    decoder = json.JSONDecoder()
    buf, pos, eof, item = "", 0, False, 0

    def more() -> bool:
        nonlocal buf, pos, eof
        chunk = handle.read(_CHUNK)
        if not chunk:
            eof = True
            return False
        buf, pos = buf[pos:] + chunk, 0
        return True

    def next_char() -> str:  # the next non-whitespace character, without consuming it ("" at the end)
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos] if pos < len(buf) else ""

    if next_char() != "[":
        raise SourceError(f"{name}: expected a JSON array of objects")
    pos += 1
    if next_char() == "]":
        return
    while True:
        item += 1
        where = f"{name} item {item}"
        if next_char() != "{":
            raise SourceError(f"{where}: expected a JSON object")
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)  # an object decodes only once its "}" is read
                break
            except json.JSONDecodeError as exc:
                if len(buf) - pos > MAX_ROW_CHARS:
                    raise SourceError(f"{where}: longer than {MAX_ROW_CHARS} characters") from None
                if not more():
                    raise SourceError(f"{where}: not valid JSON ({exc.msg})") from None
        pos = end
        yield where, obj
        separator = next_char()
        pos += 1
        if separator == "]":
            if next_char():
                raise SourceError(f"{name}: unexpected content after the array")
            return
        if separator != ",":
            raise SourceError(f"{where}: expected ',' or ']' after the object")


def _fields(obj: Any, task: Task, where: str) -> Fields:
    if not isinstance(obj, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    out: Fields = {}
    for name in task.fields:
        value = obj.get(name)
        if value is None:
            raise SourceError(f"{where}: missing field {name!r} (a {task.name} row has {', '.join(task.fields)})")
        if not isinstance(value, str):
            raise SourceError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise SourceError(f"{where}: field {name!r} is empty")
        out[name] = value
    for name in task.optional:
        value = obj.get(name)
        if isinstance(value, str) and value:
            out[name] = value
        elif value is not None:
            raise SourceError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return out


# --------------------------------------------------------------------------------------------- splitting


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def assign_groups(counts: dict[bytes, int], valid_share: float, test_share: float, seed: int) -> dict[bytes, str]:
    """Group digest -> split: groups in a seeded order; whole groups go to test until it holds at least
    `test_share` of the rows, then to valid until it holds `valid_share`, the rest to train."""
    seed_bytes = seed.to_bytes(8, "big", signed=True)
    order = sorted(counts, key=lambda d: hashlib.blake2b(seed_bytes + d, digest_size=16).digest())
    total = sum(counts.values())
    targets = (("test", test_share * total), ("valid", valid_share * total))
    out: dict[bytes, str] = {}
    taken = {"test": 0, "valid": 0}
    stage = 0
    for digest in order:
        while stage < len(targets) and (targets[stage][1] <= 0 or taken[targets[stage][0]] >= targets[stage][1]):
            stage += 1
        split = targets[stage][0] if stage < len(targets) else "train"
        out[digest] = split
        if split != "train":
            taken[split] += counts[digest]
    return out


# --------------------------------------------------------------------------------------------- preparing


def prepare(task_name: str, source: Path, out: Path, *, seed: int = 0, valid_share: float | None = None,
            test_share: float | None = None) -> Prepared:
    """Convert `source` (a directory; for sql also one file) into `out/{train,valid,test}.jsonl` and
    `out/manifest.json`. Raises SourceMissing, SourceError (naming file and row), ValueError (bad shares)."""
    task = TASKS[task_name]
    if task.split_all_held_out:  # ViGGO: valid.csv is all held out; what is not test is validation
        if valid_share is not None:
            raise ValueError("--valid-share does not apply to viggo: the rows of valid.csv not held out for "
                             "test (--test-share) are the validation rows")
        test_share = task.test_share if test_share is None else test_share
        if not 0 < test_share < 1:
            raise ValueError("--test-share must be between 0 and 1 (the share of ViGGO's valid.csv held out)")
        valid_share = 1 - test_share
    else:
        valid_share = task.valid_share if valid_share is None else valid_share
        test_share = task.test_share if test_share is None else test_share
        if not (0 <= valid_share < 1 and 0 <= test_share < 1 and valid_share + test_share < 1):
            raise ValueError("--valid-share and --test-share must be in [0, 1) and sum to less than 1")
    source = Path(source)
    if not source.exists():
        raise SourceMissing(f"{source} not found")
    train_only, to_split = task.sources(source)

    # Pass 1: every row read and checked, rows counted per group; the sources' digests for the manifest.
    counts: dict[bytes, int] = {}
    described = []
    for path in (*train_only, *to_split):
        n = 0
        for _, row in read_rows(path, task):
            n += 1
            if path in to_split:
                digest = _digest(task.key(row))
                counts[digest] = counts.get(digest, 0) + 1
        if n == 0:
            raise SourceError(f"{path.name}: no rows")
        described.append({"file": path.name, "rows": n, "sha256": _sha256(path)})
    # ViGGO: every valid.csv row not taken for test is validation (a share of 1 is never reached early).
    assignment = assign_groups(counts, 1.0 if task.split_all_held_out else valid_share, test_share, seed)
    held_out = [s for s, share in (("valid", valid_share), ("test", test_share)) if share > 0]
    splits_with_rows = set(assignment.values()) | ({"train"} if train_only else set())
    if not {"train", *held_out} <= splits_with_rows:
        raise SourceError(f"{len(counts)} group(s) by {task.group_by}: too few to hold out whole groups for "
                          f"{' and '.join(held_out)} and keep some for training")

    # Pass 2: the rows written to their splits, in source order.
    out.mkdir(parents=True, exist_ok=True)
    rows = dict.fromkeys(SPLITS, 0)
    files = {s: out / f"{s}.jsonl" for s in SPLITS if s in splits_with_rows}
    handles = {s: p.open("w", encoding="utf-8", newline="\n") for s, p in files.items()}
    try:
        for path in (*train_only, *to_split):
            for _, row in read_rows(path, task):
                split = "train" if path in train_only else assignment[_digest(task.key(row))]
                handles[split].write(json.dumps(row, ensure_ascii=False) + "\n")
                rows[split] += 1
    finally:
        for handle in handles.values():
            handle.close()
    groups: dict[str, int] = {}  # the splits made of grouped rows (not ViGGO's train.csv)
    for split in assignment.values():
        groups[split] = groups.get(split, 0) + 1
    manifest: dict[str, Any] = {
        "task": task.name,
        "seed": seed,
        "shares": {"valid": valid_share, "test": test_share},
        "groupedBy": task.group_by,
        "sources": described,
        "splits": {s: {"file": files[s].name, "rows": rows[s], **({"groups": groups[s]} if s in groups else {})}
                   for s in SPLITS if s in files},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Prepared(task.name, {**files, "manifest": out / MANIFEST}, rows, groups, manifest)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
