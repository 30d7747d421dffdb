"""The trainer's data path: rows -> (prompt, completion) text -> token ids and labels -> padded batches.

Plain functions, run in this order:

    read_rows -> [split_validation] -> preflight (render + tokenize every row, stats, warnings)
    -> each epoch, on each worker: its Ray Data shard streamed through `stream_batches` (length-grouped
       within a bounded window) -> collate

Every problem with the user's data is a `DataError` whose message names the file and the 1-based row,
and `preflight` finds all of them before any training step (no GPU time is spent on a typo in row 4,711).
A message names files, rows, columns and fields, never the data itself (it reaches the job's status, its
Events and logs, and a one-line file may be a token): no header line, no value, no role read from a file.
Sequences are padded, never packed, so no example attends to another; `length_grouped_batches` keeps the
padding small by batching examples of similar length.

Nothing here imports torch or transformers at module import time (only `collate` needs torch), so the
reading and checking functions also work in a process without them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kubetune.contract.redact import excerpt, identifier
from kubetune.contract.templates import MissingFields, fill_templates

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from kubetune.api.finetunejob import PreflightSummary

IGNORE_INDEX = -100  # label of a position without loss (torch.nn.CrossEntropyLoss's ignore_index)
FORMATS = ("jsonl", "chat", "csv")
CHAT_ROLES = ("system", "user", "assistant")
TRUNCATION_WARN_SHARE = 0.05  # warn when more than this share of rows is longer than maxLength


class DataError(ValueError):
    """Bad training data; the message names the file and the 1-based row, e.g.

    `train.jsonl row 17: missing field 'mr' (template placeholders: ref, mr)`.
    """

    def __init__(self, reason: str, source: str | None = None, row: int | None = None,
                 line: int | None = None) -> None:
        self.reason = reason
        self.source = source
        self.row = row
        self.line = line
        super().__init__(f"{location(source, row, line)}: {reason}" if source else reason)

    def at(self, row: Row) -> DataError:
        """This error located at `row` (unchanged if it already names a file)."""
        return self if self.source else DataError(self.reason, row.source, row.number, row.line)


def location(source: str | None, row: int | None = None, line: int | None = None) -> str:
    """`train.jsonl row 17`, `train.csv row 16 (line 18)`, `train.csv line 1` or `train.jsonl`."""
    where = source or "<data>"
    if row is not None:
        where += f" row {row}"
        if line is not None and line != row:
            where += f" (line {line})"
    elif line is not None:
        where += f" line {line}"
    return where


@dataclass(slots=True)
class Row:
    """One row of a data file, before the template is applied."""

    source: str  # the file's name, for messages
    number: int  # 1-based: the line of a jsonl/chat file, the data row (header excluded) of a csv file
    fields: dict[str, str] = field(default_factory=dict)  # jsonl/csv: template field -> value
    messages: list[dict[str, str]] | None = None  # chat: [{role, content}], the last one the assistant's
    line: int | None = None  # csv: the line the row starts on (a quoted value may span lines)

    @property
    def where(self) -> str:
        return location(self.source, self.number, self.line)


class Template(Protocol):
    """What `render` and `preflight` read of a template (a `PromptTemplate`)."""

    @property
    def prompt(self) -> str: ...
    @property
    def completion(self) -> str: ...
    @property
    def stop(self) -> str | None: ...


@dataclass(slots=True)
class Example:
    """One tokenized training sequence: prompt ids + completion ids + the stop token id."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is computed
    truncated: bool = False  # longer than max_length; the end (maybe the stop token) was cut off


@dataclass
class Preflight:
    """Everything the trainer needs from the data, computed once before the first step."""

    train: list[Example]
    val: list[Example]
    stats: dict[str, Any]  # JSON-serialisable: rows, tokens, loss tokens, lengths, truncated rows per split
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> PreflightSummary:
        """The counts as `status.preflight` shows them."""
        from kubetune.api.finetunejob import PreflightSummary, SplitData, Truncation

        def split(name: str) -> SplitData:
            st = self.stats[name]
            return SplitData(rows=st["rows_read"], used=st["rows"], tokens=st["tokens"],
                             truncated=st["truncated"], dropped=st["dropped"])

        return PreflightSummary(max_length=self.stats["max_length"], truncation=Truncation(self.stats["truncation"]),
                                train=split("train"), validation=split("validation"))


# --------------------------------------------------------------------------------------------- reading


def read_rows(path: Path, format: str, columns: dict[str, str] | None = None) -> list[Row]:
    """Read a data file (`jsonl`, `chat` or `csv`) into rows.

    `columns` maps a template field to the key (jsonl) or column (csv) it is read from; fields not listed
    are read under their own name. For chat files it may map `messages` to another key. Values become
    strings (numbers and booleans as JSON writes them, lists and objects as JSON); JSON null is absent.
    """
    path = Path(path)
    if format not in FORMATS:
        raise DataError(f"unknown format {format!r} (use one of {', '.join(FORMATS)})", path.name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}", path.name) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}", path.name) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", path.name, line=line) from None
    columns = dict(columns or {})
    if format == "csv":
        rows = _read_csv(text, path.name, columns)
    else:
        rows = _read_json_lines(text, path.name, columns, chat=format == "chat")
    if not rows:
        raise DataError("no rows (the file is empty)", path.name)
    return rows


def _read_json_lines(text: str, source: str, columns: dict[str, str], chat: bool) -> list[Row]:
    rows: list[Row] = []
    # split on \n only: str.splitlines would also split inside a JSON string holding U+2028 and such
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", source, number) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {_json_type(obj)}", source, number)
        if chat:
            key = columns.get("messages", "messages")
            rows.append(Row(source, number, messages=_messages(obj.get(key), key, source, number)))
        else:
            fields = {k: _to_str(v) for k, v in obj.items() if v is not None}
            for name, key in columns.items():
                fields.pop(name, None)  # a mapped field is only ever read from its mapped key
                if obj.get(key) is not None:
                    fields[name] = _to_str(obj[key])
            rows.append(Row(source, number, fields=fields))
    return rows


def _messages(value: Any, key: str, source: str, number: int) -> list[dict[str, str]]:
    def fail(reason: str) -> DataError:
        return DataError(reason, source, number)

    if not isinstance(value, list) or not value:
        raise fail(f"expected {identifier(key)}: a non-empty list of {{role, content}} objects")
    messages: list[dict[str, str]] = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise fail(f"message {i}: expected an object with role and content, got {_json_type(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:  # the role itself is not shown: it is the file's text
            raise fail(f"message {i}: role is not one of {', '.join(CHAT_ROLES)} (it is {_shape(role)})")
        if not isinstance(content, str):
            raise fail(f"message {i}: content must be a string, got {_json_type(content)}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise fail(f"the last message must be the assistant's reply to learn (it is {messages[-1]['role']!r})")
    if len(messages) < 2:
        raise fail("no message before the assistant's reply to prompt it with")
    return messages


def _read_csv(text: str, source: str, columns: dict[str, str]) -> list[Row]:
    # The csv module refuses values over 128 KiB by default; a long-context row can be longer.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"malformed CSV header: {e}", source, line=1) from None
    if not header:
        return []
    header = [h.strip() for h in header]
    missing = [f"{identifier(c)} (field {identifier(f)})" for f, c in columns.items() if c not in header]
    if missing:
        # The header's own names are not shown: a file that is not what the template expects may be
        # anything (a one-line file holding a key). The manifest's names, and positions, are safe to show.
        near = [f"column {i} differs from {identifier(c)} only in case" for c in columns.values()
                if c not in header for i, h in enumerate(header, start=1) if h.casefold() == c.strip().casefold()]
        raise DataError(f"mapped column(s) {', '.join(missing)} not in the header (it has {len(header)} "
                        f"column{'s' if len(header) != 1 else ''}{'; ' + '; '.join(near) if near else ''})",
                        source, line=1)
    renamed = {c: f for f, c in columns.items()}
    mapped = set(columns)
    names = [renamed.get(h, h if h not in mapped else "") for h in header]  # "" = not read
    rows: list[Row] = []
    number, next_line = 0, reader.line_num + 1
    while True:
        start = next_line
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"malformed CSV: {e}", source, number + 1, start) from None
        next_line = reader.line_num + 1
        if not record or (len(record) == 1 and not record[0].strip()):
            continue  # blank line
        number += 1
        if len(record) != len(header):
            raise DataError(f"{len(record)} values, but the header has {len(header)} columns",
                            source, number, start)
        rows.append(Row(source, number, fields={n: v for n, v in zip(names, record, strict=True) if n},
                        line=start))
    return rows


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _shape(value: Any) -> str:
    """What a value is, without its text: `a string of 12 characters`, `a number`, `missing`."""
    if value is None:
        return "missing"
    if isinstance(value, str):
        return f"a string of {len(value)} character{'s' if len(value) != 1 else ''}"
    return _json_type(value)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def split_validation(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out `fraction` of the rows (rounded) for validation: a deterministic random choice by `seed`.

    Both parts keep the file's order. Raises DataError unless each part gets at least one row.
    """
    source = rows[0].source if rows else "<data>"
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validationSplit must be between 0 and 1, got {fraction}", source)
    n_val = math.floor(len(rows) * fraction + 0.5)
    if n_val < 1 or n_val >= len(rows):
        raise DataError(f"validationSplit {fraction} of {len(rows)} rows leaves "
                        f"{'no validation' if n_val < 1 else 'no training'} row; use more rows, a "
                        "larger validationSplit, or a separate validation file", source)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in held_out]
    val = [r for i, r in enumerate(rows) if i in held_out]
    return train, val


# ------------------------------------------------------------------------------------------- rendering


def render(row: Row, template: Template, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(prompt text, completion text) of a row.

    jsonl/csv: the template's `prompt` and `completion` with `{field}` placeholders filled in;
    chat: the tokenizer's chat template over all messages but the last (with the generation prompt),
    and the last (assistant) message's content.
    """
    if row.messages is not None:
        try:
            prompt = tokenizer.apply_chat_template(row.messages[:-1], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001  (no chat template: ValueError; one that rejects the messages:
            # jinja2's TemplateError from its raise_exception(), or whatever the template trips on). Its
            # message is the template author's, and may quote a message: bounded, escaped, the row blanked.
            why = excerpt(str(e), echoes=[m["content"] for m in row.messages])
            raise DataError(f"the tokenizer's chat template failed: {type(e).__name__}: {why}",
                            row.source, row.number) from None
        if not isinstance(prompt, str):
            raise DataError(f"the chat template returned {type(prompt).__name__}, not text",
                            row.source, row.number)
        return prompt, row.messages[-1]["content"]
    try:
        # The evaluator fills its templates with the same function: `{0}` is the field named "0" in both.
        prompt, completion = fill_templates((template.prompt, template.completion), row.fields)
    except MissingFields as e:
        raise DataError(str(e), row.source, row.number, row.line) from None
    return prompt, completion


# ------------------------------------------------------------------------------------------ tokenizing


def stop_token_id(tokenizer: PreTrainedTokenizerBase, stop_token: str | None) -> int:
    """The id of the stop token (`stop_token`, else the tokenizer's EOS); it must be exactly one token."""
    token = stop_token or tokenizer.eos_token
    if not token:
        raise DataError("the tokenizer has no EOS token: set template.stop (and list it in specialTokens)")
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise DataError(f"stop token {token!r} is {len(ids)} tokens {ids}, not one: list it in "
                        "template.specialTokens so it is added to the tokenizer as a single token")
    return int(ids[0])


def _prompt_ids(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The prompt's ids with the special tokens the tokenizer puts in front (BOS), none behind."""
    plain: list[int] = tokenizer.encode(prompt, add_special_tokens=False)
    if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
        return plain  # a chat template that writes the BOS itself: do not add a second one
    full: list[int] = tokenizer.encode(prompt, add_special_tokens=True)
    if not plain:
        return [i for i in full if i == tokenizer.bos_token_id]
    for start in range(len(full) - len(plain) + 1):  # drop what follows the text (an EOS, a SEP)
        if full[start:start + len(plain)] == plain:
            return full[:start + len(plain)]
    return full


def tokenize(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
             loss_on: str = "all", stop_token: str | None = None) -> Example:
    """Token ids of prompt + completion + stop token, cut to `max_length` (the start is kept).

    The prompt is tokenized as the tokenizer tokenizes a text (with its BOS, if it adds one), the
    completion without special tokens, then the stop token (`stop_token`, else EOS) is appended; it must
    be a single token. `loss_on` "all": labels are the ids; "completion": IGNORE_INDEX over the prompt.
    """
    return _tokenize(prompt, completion, tokenizer, max_length, loss_on, stop_token_id(tokenizer, stop_token))


def _tokenize(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
              loss_on: str, stop_id: int) -> Example:
    if loss_on not in ("all", "completion"):
        raise ValueError(f"loss_on must be 'all' or 'completion', got {loss_on!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    prompt_ids = _prompt_ids(prompt, tokenizer)
    ids = prompt_ids + list(tokenizer.encode(completion, add_special_tokens=False)) + [stop_id]
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    if loss_on == "all":
        labels = list(ids)
    else:
        n_prompt = min(len(prompt_ids), len(ids))
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return Example(input_ids=ids, labels=labels, truncated=truncated)


TRUNCATIONS = ("dropTruncated", "truncate", "fail")  # kubetune.api.finetunejob.Truncation's values


def preflight(train_rows: Sequence[Row], val_rows: Sequence[Row], template: Template,
              tokenizer: PreTrainedTokenizerBase, max_length: int, loss_on: str = "all",
              truncation: str = "truncate") -> Preflight:
    """Render and tokenize every row before training; the first bad row raises a DataError naming it.

    A row longer than `max_length` tokens is, by `truncation` (dataset.truncation): "dropTruncated" left out
    (of either split), "truncate" cut to its first `max_length` tokens (losing the end of its completion and
    its stop token), "fail" a DataError naming the first such row once every row was counted.
    Fails when there is no validation row, when every row is longer than `max_length` (or a split has none
    left), or when a split has no token to compute the loss on; warns when more than 5% of the rows are
    longer than `max_length`. Returns the tokenized examples (the trainer does not tokenize again), the
    stats (per split: rows read, rows used, truncated and dropped rows) and the warnings.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    if not train_rows:
        raise DataError("no training rows")
    if not val_rows:
        raise DataError("no validation rows: set dataset.validation or dataset.validationSplit",
                        train_rows[0].source)
    try:
        stop_id = stop_token_id(tokenizer, template.stop)
    except DataError as e:
        raise e.at(train_rows[0]) from None  # where it would first be appended
    stats: dict[str, Any] = {"max_length": max_length, "loss_on": loss_on, "truncation": str(truncation),
                             "stop_token": template.stop or tokenizer.eos_token}
    splits: dict[str, list[Example]] = {}
    first_long: Row | None = None
    for name, rows in (("train", train_rows), ("validation", val_rows)):
        examples: list[Example] = []
        long = 0
        for row in rows:
            try:
                prompt, completion = render(row, template, tokenizer)
                example = _tokenize(prompt, completion, tokenizer, max_length, loss_on, stop_id)
            except DataError as e:
                raise e.at(row) from None
            if example.truncated:
                long += 1
                first_long = first_long or row
                if truncation != "truncate":
                    continue  # dropped (or counted, for "fail")
            examples.append(example)
        splits[name] = examples
        stats[name] = {"source": rows[0].source, "rows_read": len(rows), **_split_stats(examples),
                       "dropped": long if truncation == "dropTruncated" else 0}
        stats[name]["longer_than_max_length"] = long
    n_rows = len(train_rows) + len(val_rows)
    n_long = stats["train"]["longer_than_max_length"] + stats["validation"]["longer_than_max_length"]
    stats["truncated_share"] = round(n_long / n_rows, 6)  # rows longer than max_length, whatever became of them
    if n_long == n_rows:
        raise DataError(f"every row is longer than maxLength {max_length} tokens: raise dataset.maxLength",
                        train_rows[0].source)
    if n_long and truncation == "fail":
        assert first_long is not None
        raise DataError(f"{n_long} of {n_rows} rows are longer than maxLength {max_length} tokens (the first: "
                        f"{first_long.where}) and dataset.truncation is fail: raise dataset.maxLength, shorten "
                        "them, or set dataset.truncation to dropTruncated", first_long.source)
    for name in ("train", "validation"):
        if not splits[name]:
            raise DataError(f"every {name} row is longer than maxLength {max_length} tokens and dropped "
                            "(dataset.truncation dropTruncated): raise dataset.maxLength", stats[name]["source"])
        if stats[name]["loss_tokens"] == 0:
            raise DataError(f"no {name} row has a token to compute the loss on within maxLength "
                            f"{max_length} (are the prompts that long?)", stats[name]["source"])
    warnings: list[str] = []
    if n_long / n_rows > TRUNCATION_WARN_SHARE and first_long is not None:
        what = ("are left out (dataset.truncation dropTruncated): raise dataset.maxLength to train on them"
                if truncation == "dropTruncated" else
                "are truncated; a truncated row loses its stop token, so the model may not learn to stop: raise "
                "dataset.maxLength or shorten them")
        warnings.append(f"{n_long} of {n_rows} rows ({n_long / n_rows:.1%}) are longer than maxLength "
                        f"{max_length} tokens (the first: {first_long.where}) and {what}")
    stats["warnings"] = warnings
    return Preflight(train=splits["train"], val=splits["validation"], stats=stats, warnings=warnings)


def _split_stats(examples: list[Example]) -> dict[str, Any]:
    lengths = [len(e.input_ids) for e in examples]
    return {
        "rows": len(examples),
        "tokens": sum(lengths),
        "loss_tokens": sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in examples),
        "mean_tokens": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
        "max_tokens": max(lengths, default=0),
        "truncated": sum(e.truncated for e in examples),
    }


# -------------------------------------------------------------------------------------------- batching


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                           mega_batch: int = 64) -> list[list[int]]:
    """Batches of indexes into `lengths`, similar lengths together (Hugging Face's `group_by_length`).

    Shuffle all indexes (deterministically per seed and epoch), cut them into mega-batches of
    `mega_batch * batch_size`, sort each mega-batch by length (longest first), cut it into batches of
    `batch_size`, and shuffle the batch order; the batch holding the longest sequence goes first, so an
    out-of-memory error shows up on the first step rather than hours in. Only the last batch may be smaller.
    """
    if batch_size < 1 or mega_batch < 1:
        raise ValueError(f"batch_size and mega_batch must be positive, got {batch_size}, {mega_batch}")
    rng = random.Random(f"kubetune/{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = mega_batch * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        group = sorted(order[start:start + span], key=lambda i: lengths[i], reverse=True)
        batches += [group[b:b + batch_size] for b in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def stream_batches(examples: Iterable[Example], batch_size: int, *, seed: int = 0, epoch: int = 0,
                   rank: int = 0, window: int = 64, shuffle: bool = True,
                   limit: int | None = None) -> Iterator[list[Example]]:
    """`length_grouped_batches` over a stream: batches of similar length while holding at most
    2 x `window` x `batch_size` examples, whatever the stream's length.

    With `shuffle` (training), examples pass through a shuffle buffer of `window * batch_size` (each new
    one takes the place of a random one, which moves on); every `window * batch_size` examples that come
    out are sorted by length (longest first), cut into batches and the batches shuffled. The first window
    puts its longest batch first (an out-of-memory error shows on the first step). Without `shuffle`
    (validation), windows of the stream in its order are sorted and cut. Randomness is deterministic per
    (seed, rank, epoch). Only the last batch may be smaller: `ceil(n / batch_size)` batches for `n`
    examples, the same on every worker given the same `n` (`limit` stops after that many examples).
    """
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be positive, got {batch_size}, {window}")
    rng = random.Random(f"kubetune/{seed}/{rank}/{epoch}")
    span = window * batch_size
    first = True

    def cut(group: list[Example]) -> list[list[Example]]:
        nonlocal first
        group.sort(key=lambda e: len(e.input_ids), reverse=True)
        batches = [group[b:b + batch_size] for b in range(0, len(group), batch_size)]
        if shuffle:
            rng.shuffle(batches)
            if first:
                longest = max(range(len(batches)), key=lambda b: len(batches[b][0].input_ids))
                batches[0], batches[longest] = batches[longest], batches[0]
        first = False
        return batches

    pool: list[Example] = []  # the shuffle buffer
    group: list[Example] = []  # the window being filled
    for n, example in enumerate(examples):
        if limit is not None and n >= limit:
            break
        if shuffle and len(pool) < span:
            pool.append(example)
            continue
        if shuffle:
            j = rng.randrange(span)
            example, pool[j] = pool[j], example
        group.append(example)
        if len(group) == span:
            yield from cut(group)
            group = []
    rng.shuffle(pool)
    for example in pool:
        group.append(example)
        if len(group) == span:
            yield from cut(group)
            group = []
    if group:
        yield from cut(group)


def padding_waste(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padding among all the tokens of the padded batches (0 = no padding)."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return (padded - real) / padded if padded else 0.0


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids (padded with `pad_id`), attention_mask, labels (padded with -100)."""
    import torch  # only batching needs torch

    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
