"""Execution match for text-to-SQL (sql-create-context style rows), behind the `sqlExecution` scorer.

A row has a question, a `context` of `CREATE TABLE` statements without data, and a gold query. Comparing
query text would punish every correct paraphrase, so the scorer runs both queries: test-suite execution
accuracy (Zhong et al., 2020). Each example gets a suite of small in-memory SQLite databases
(`Settings.databases`, 8 by default), built from its context and shaped by its gold query
(`kubetune.serving.sqlfuzz`: rows that satisfy all of the gold's conditions and rows that violate exactly
one, at least two matching rows with distinct values so that aggregates differ, keys with and without
partners, duplicates and NULLs in some of the databases). The prediction is right only when its result
equals the gold's on every database of the suite; it stops at the first that differs (`mismatch`).

Why SQLite (stdlib `sqlite3`) executes and sqlglot only parses and transpiles: SQLite is a real SQL engine
(joins, subqueries, GROUP BY/HAVING, LIKE, set operations) that runs a query on 20-row tables in
microseconds and can be interrupted (progress handler) and sandboxed (authorizer, length limit), so a
runaway or hostile prediction cannot hang or harm the evaluation. sqlglot's own executor is pure Python,
slower, covers less SQL and has no such guards. sqlglot does what SQLite cannot: read the CREATE TABLE
context, transpile from another dialect (option `dialect`), tell a query from other statements, and read
the gold query's conditions, literals and joins.

Results compare as multisets of rows (order-insensitive) unless the gold query has a top-level ORDER BY,
then as sequences; columns compare by position; numbers compare by value (72 == 72.0, floats to 6
decimals). A database on which the gold's result depends on the order the rows are stored in (ties
under `ORDER BY ... LIMIT`, a bare column of a group) cannot judge a prediction: each database is also
built with its rows in reverse order, and one on which the gold's result differs between the two is
replaced by another (at most `databases` more tries). In a dialect that quotes identifiers with double
quotes (sqlite's default), a double-quoted name that is no column or alias is read as a string, as SQLite
itself does: Spider and sql-create-context write `name = "Yes"`.

Examples are dropped, with the reason counted, when no suite can judge them: the context does not parse
or its tables cannot be built; the gold query fails to execute, or a guard stops it, on any database
(`goldFailure` says which guard); the gold returns nothing (no rows, or only NULLs) on every database; or
its result depends on row order on so many databases that fewer than half of `databases`, tiny ones
aside, are left.

The queries are the model's output, so they run in a sandbox (`Sandbox`): a pool of persistent worker
processes, each under `RLIMIT_AS` (`Settings.memory_bytes`), that build each example's databases and run its
gold and predicted queries. In the worker, SQLite's progress handler runs every `PROGRESS_OPCODES` VM
opcodes and interrupts a query past its step budget or `max_seconds`; the statement (`max_statement_chars`),
every value (`max_value_bytes`) and the materialised result (`max_result_bytes`, `max_rows`) are capped;
temporary storage stays in memory (so under the rlimit, never on disk). These limits hold per query: a
prediction runs once per database, each run with the whole budget, and at most `databases` runs. The
parent kills a worker whose query is still running `kill_grace_seconds` after `max_seconds` (one slow
opcode: `instr` over megabyte strings), or whose setup (reading the context, building the suite) runs over
`setup_seconds`, and starts another. A prediction stopped by any of these scores 0 with the reason in its
entry's `failure` (`scorers.Failure`); a gold query stopped the same way drops the example (`goldFailure`
says why). Errors name the guard or SQLite's message, never a result. The databases are in memory and
read-only to the queries (the authorizer allows reading and functions only; `query_only` is on), and a
worker inherits nothing of the environment but PATH, LD_LIBRARY_PATH, the locale and TZ: no token or API
key of the evaluator's. A worker keeps the suites of its last `SUITE_CACHE` examples (several candidates'
predictions for the same row, or several variants, reuse one suite: same databases, same gold results).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import queue
import random
import re
import resource
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from kubetune.serving import sqlfuzz
from kubetune.serving.scorers import Failure
from kubetune.serving.sqlfuzz import Column, Table

__all__ = ["Column", "Example", "Sandbox", "Settings", "SqlError", "Table", "check_dialect", "parse_context",
           "prepare", "run", "sandbox", "score_example", "score_examples"]

MAX_DATABASES = 16
"""The most databases a suite may have (option `databases`)."""
SUITE_CACHE = 8
"""Suites a worker keeps, most recently used first."""

DROP_NO_CONTEXT = "no CREATE TABLE context"
DROP_BAD_CONTEXT = "context does not parse"
DROP_BAD_TABLES = "tables cannot be built"
DROP_GOLD_FAILS = "gold fails to execute"
DROP_GOLD_EMPTY = "gold result empty on every database"
DROP_GOLD_ORDER = "gold result depends on row order"


PROGRESS_OPCODES = 100
"""SQLite VM opcodes between two calls of the progress handler (which checks the step budget and the clock)."""


@dataclass(frozen=True)
class Settings:
    """How examples are built and queries bounded."""

    dialect: str = "sqlite"
    rows_per_table: int = 20
    """Rows in each table of database 0; the other databases have between half that and that many."""
    databases: int = 8
    """Databases in each example's test suite; a prediction must match the gold on all of them."""
    seed: int = 0
    max_steps: int = 20_000_000
    """SQLite VM instructions per query: deterministic runaway guard (plain queries here need < 100k)."""
    max_seconds: float = 2.0
    """Wall-clock limit per query: the worker's progress handler interrupts the query past it."""
    kill_grace_seconds: float = 0.5
    """The parent kills the worker when a query (or the prediction's parsing) runs this long past
    `max_seconds`: a single opcode the progress handler cannot interrupt."""
    setup_seconds: float = 30.0
    """Wall-clock limit for reading an example's context and building its databases (no model output)."""
    max_rows: int = 10_000
    max_result_bytes: int = 1 << 20
    """Bytes of a query's rows (text and blobs by length, other values 8) materialised at most."""
    max_value_bytes: int = 1_000_000
    """SQLite's SQLITE_LIMIT_LENGTH: the largest string or blob a query may make."""
    max_statement_chars: int = 16_384
    """A longer predicted statement is not executed (`statementTooLong`)."""
    memory_bytes: int = 256 << 20
    """RLIMIT_AS of each worker process (its whole address space: interpreter, sqlglot, SQLite)."""
    workers: int = 0
    """Worker processes (examples scored in parallel); 0: one per CPU available, at most 4."""


@dataclass
class Query:
    """A query ready for SQLite: its text, whether its order matters, and its sqlglot tree (if it parsed)."""

    sql: str
    ordered: bool
    tree: exp.Expr | None


class SqlError(Exception):
    """A query that cannot be parsed or executed; the message goes into the example's `error`, the reason
    (a `Failure`) into its `failure`."""

    def __init__(self, message: str, reason: Failure = Failure.SQL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


Beat = Callable[[str, dict[str, Any]], None]
"""Called before each query with its phase ("gold" or "prediction") and the example's entry so far, and
with "setup" before building databases: the worker's heartbeat, from which the parent times each step."""


def _no_beat(phase: str, entry: dict[str, Any]) -> None:
    pass


def check_dialect(name: str) -> str:
    """`name` if sqlglot knows the dialect; ValueError otherwise."""
    try:
        sqlglot.Dialect.get_or_raise(name)
    except ValueError as exc:
        raise ValueError(f"option dialect: {exc}") from None
    return name


# -- one example -------------------------------------------------------------------------------------


def blank_entry() -> dict[str, Any]:
    return {"score": 0.0, "dropped": None, "correct": False, "error": None, "failure": None, "goldFailure": None,
            "goldRows": None, "predictedRows": None, "ordered": False, "databases": 0, "mismatch": None,
            "executed": None}


@dataclass
class Suite:
    """An example's databases and the gold's result on each; or why the example is dropped."""

    dropped: str | None = None
    gold_failure: Failure | None = None
    ordered: bool = False
    known: set[str] = field(default_factory=set)
    conns: list[sqlite3.Connection] = field(default_factory=list)
    expected: list[list[tuple[Any, ...]]] = field(default_factory=list)
    gold_rows: list[int] = field(default_factory=list)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns.clear()


def score_example(prediction: str, gold: str, context: str, settings: Settings,
                  beat: Beat = _no_beat) -> dict[str, Any]:
    """The per-example entry: score, dropped, correct, error, failure, goldFailure, goldRows (the gold's row
    count on each database), predictedRows (the prediction's, up to the first database that differs),
    ordered, databases, mismatch (the index of the first database that differs), executed. In-process,
    with every guard but the parent's kill and the rlimit: `Sandbox` runs it in a worker process."""
    entry = blank_entry()
    suite = cached_suite(gold, context, settings, beat, entry)
    entry.update(ordered=suite.ordered, goldRows=list(suite.gold_rows) or None, databases=len(suite.conns))
    if suite.dropped is not None:
        entry.update(dropped=suite.dropped, goldFailure=suite.gold_failure, databases=0)
        return entry
    beat("prediction", entry)
    predicted: list[int] = []
    try:
        query = prepare(prediction, settings.dialect, suite.known, settings.max_statement_chars)
        entry["executed"] = query.sql
        for index, (conn, expected) in enumerate(zip(suite.conns, suite.expected, strict=True)):
            if index:
                beat("prediction", entry)
            got = run(conn, query.sql, settings)
            predicted.append(len(got))
            if (got != expected) if suite.ordered else (Counter(got) != Counter(expected)):
                entry["mismatch"] = index
                break
    except SqlError as exc:
        entry.update(error=str(exc), failure=exc.reason)
        return entry
    except MemoryError:
        entry.update(error="out of memory", failure=Failure.MEMORY_LIMIT)
        return entry
    except Exception as exc:  # noqa: BLE001 - a model's output must never abort the whole evaluation
        entry.update(error=f"{type(exc).__name__}: {clean_error(exc)}", failure=Failure.SQL_ERROR)
        return entry
    finally:
        entry["predictedRows"] = predicted
    entry["correct"] = entry["mismatch"] is None
    entry["score"] = 1.0 if entry["correct"] else 0.0
    return entry


_SUITES = threading.local()


def cached_suite(gold: str, context: str, settings: Settings, beat: Beat, entry: dict[str, Any]) -> Suite:
    """The example's suite: from this thread's cache of the last SUITE_CACHE, else built (`build_suite`)."""
    cache: OrderedDict[str, Suite] | None = getattr(_SUITES, "cache", None)
    if cache is None:
        cache = _SUITES.cache = OrderedDict()
    key = hashlib.sha256(json.dumps([gold, context, settings.dialect, settings.rows_per_table, settings.databases,
                                     settings.seed, settings.max_steps, settings.max_seconds, settings.max_rows,
                                     settings.max_result_bytes, settings.max_value_bytes,
                                     settings.max_statement_chars]).encode()).hexdigest()
    suite = cache.get(key)
    if suite is not None:
        cache.move_to_end(key)
        return suite
    suite = build_suite(gold, context, settings, beat, entry)
    cache[key] = suite
    while len(cache) > SUITE_CACHE:
        cache.popitem(last=False)[1].close()
    return suite


def clear_suite_cache() -> None:
    """Close this thread's cached suites."""
    cache: OrderedDict[str, Suite] | None = getattr(_SUITES, "cache", None)
    while cache:
        cache.popitem()[1].close()


def build_suite(gold: str, context: str, settings: Settings, beat: Beat = _no_beat,
                entry: dict[str, Any] | None = None) -> Suite:
    """Read the context and the gold, build the databases, run the gold on each (forward and reversed)."""
    entry = entry if entry is not None else blank_entry()
    beat("setup", entry)
    if not context.strip():
        return Suite(DROP_NO_CONTEXT)
    try:
        tables = parse_context(context, settings.dialect)
    except SqlError:
        return Suite(DROP_BAD_CONTEXT)
    known = {c.name.lower() for t in tables for c in t.columns}
    try:
        gold_query = prepare(gold, settings.dialect, known)
    except SqlError:
        return Suite(DROP_GOLD_FAILS, known=known)
    suite = Suite(ordered=gold_query.ordered, known=known)
    seed = example_seed(settings.seed, context, gold)
    try:
        profile = sqlfuzz.analyze(gold_query.tree, tables) if gold_query.tree is not None else sqlfuzz.Profile()
        the_plan = sqlfuzz.plan(tables, profile, random.Random(seed), lambda c, q: run(c, q, settings))
    except (sqlite3.Error, SqlglotError, RecursionError, OverflowError, ValueError):
        return Suite(DROP_BAD_TABLES, known=known)
    wanted = max(1, min(settings.databases, MAX_DATABASES))
    full = 0  # databases kept that are not tiny
    try:
        for index in range(2 * wanted):
            if len(suite.conns) == wanted:
                break
            beat("setup", entry)
            data = sqlfuzz.build(the_plan, index, max(1, settings.rows_per_table), seed)
            forward, backward = database(tables, data, settings), database(tables, data, settings, reverse=True)
            try:
                beat("gold", entry)
                expected = run(forward, gold_query.sql, settings)
                beat("gold", entry)
                reversed_ = run(backward, gold_query.sql, settings)
            except BaseException:
                forward.close()
                raise
            finally:
                backward.close()
            same = expected == reversed_ if suite.ordered else Counter(expected) == Counter(reversed_)
            if not same:
                forward.close()
                continue
            suite.conns.append(forward)
            full += not sqlfuzz.is_tiny(index)
            suite.expected.append(expected)
            suite.gold_rows.append(len(expected))
    except SqlError as exc:
        suite.close()
        suite.dropped, suite.gold_failure = DROP_GOLD_FAILS, exc.reason
        return suite
    except (sqlite3.Error, OverflowError, MemoryError):
        suite.close()
        suite.dropped = DROP_BAD_TABLES
        return suite
    if full < max(1, wanted // 2):
        # Order-dependent on most databases (tiny ones, with one row or equal rows, may not show it, and
        # do not count): the few left could not judge a prediction.
        suite.close()
        suite.dropped = DROP_GOLD_ORDER
    elif all(v is None for result in suite.expected for row in result for v in row):
        suite.close()
        suite.dropped = DROP_GOLD_EMPTY
    return suite


def database(tables: Sequence[Table], data: dict[str, list[list[Any]]], settings: Settings,
             reverse: bool = False) -> sqlite3.Connection:
    """An in-memory database with the tables filled, locked down for running untrusted queries."""
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    try:
        sqlfuzz.fill(conn, tables, data, reverse)
    except BaseException:
        conn.close()
        raise
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, settings.max_value_bytes)
    # sqlglot may write a statement longer than the prediction (quoting, expansion); gold queries are short.
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 4 * settings.max_statement_chars)
    conn.execute("PRAGMA temp_store = MEMORY")  # sorters and temporary tables under the rlimit, not on disk
    conn.execute("PRAGMA query_only = ON")
    sqlfuzz.lock_down(conn)
    return conn


def example_seed(seed: int, context: str, gold: str) -> int:
    """A seed from the example's text, stable across processes (unlike `hash`)."""
    digest = hashlib.sha256(f"{seed}\0{context}\0{gold}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


# -- reading SQL --------------------------------------------------------------------------------------


def parse_context(context: str, dialect: str) -> list[Table]:
    """The tables the context's CREATE TABLE statements declare (constraints and defaults ignored)."""
    try:
        statements = [s for s in sqlglot.parse(context, read=dialect) if s is not None]
    except SqlglotError:
        # Some contexts separate statements with ',' or nothing: parse each CREATE TABLE on its own.
        pieces = [p.strip().rstrip(",;").strip() for p in re.split(r"(?i)(?=\bcreate\s+table\b)", context)]
        try:
            statements = [sqlglot.parse_one(p, read=dialect) for p in pieces if p]
        except SqlglotError as exc:
            raise SqlError(f"context: {clean_error(exc)}") from None
    merged: dict[str, Table] = {}
    for table in (t for t in (_table(s) for s in statements) if t is not None):
        # A table declared twice (it happens in scraped contexts) gets the union of its columns.
        known = merged.get(table.name.lower())
        merged[table.name.lower()] = table if known is None else Table(known.name, known.columns + table.columns)
    if not merged:
        raise SqlError("context declares no table")
    return [Table(t.name, _unique(t.columns)) for t in merged.values()]


def _unique(columns: Sequence[Column]) -> tuple[Column, ...]:
    seen: dict[str, Column] = {}
    for col in columns:
        seen.setdefault(col.name.lower(), col)
    return tuple(seen.values())


def _table(statement: exp.Expr) -> Table | None:
    if not isinstance(statement, exp.Create) or not isinstance(statement.this, exp.Schema):
        return None
    columns = []
    for col in statement.this.expressions:
        if isinstance(col, exp.ColumnDef):
            kind = col.args.get("kind")
            columns.append(_column(col.name, kind if isinstance(kind, exp.DataType) else None))
        elif isinstance(col, exp.Identifier):
            columns.append(_column(col.name, None))
    if not columns:
        return None
    return Table(statement.this.this.name, tuple(columns))


def _column(name: str, kind: exp.DataType | None) -> Column:
    """What to generate for a declared type, and SQLite's affinity for it."""
    if kind is None:
        return Column(name, "blob", "")
    t = kind.this
    if t in exp.DataType.INTEGER_TYPES or t == exp.DataType.Type.BOOLEAN:
        return Column(name, "integer", "INTEGER")
    if t in exp.DataType.FLOAT_TYPES:
        return Column(name, "real", "REAL")
    if t in exp.DataType.TEMPORAL_TYPES:
        return Column(name, "date", "TEXT")
    if t in exp.DataType.NUMERIC_TYPES:
        return Column(name, "numeric", "NUMERIC")
    return Column(name, "text", "TEXT")


_FENCE = re.compile(r"```[\w-]*[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)


def first_statement(text: str) -> str:
    """The text up to the first `;` outside quotes; inside the first markdown code fence if there is one
    (few-shot baselines often wrap the query in prose)."""
    text = text.strip()
    fence = _FENCE.search(text)
    if fence:
        text = fence.group(1).strip()
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"`":
            quote = ch
        elif ch == ";":
            return text[:i].strip()
    return text


def prepare(sql: str, dialect: str, known_columns: set[str], max_chars: int | None = None) -> Query:
    """Parse one query (the first statement of `sql`) with sqlglot and write it for SQLite.

    Anything but a query (INSERT, DROP, PRAGMA...) is refused. When sqlglot cannot parse the text, it goes
    to SQLite as written: SQLite has the last word on what is valid SQLite. A statement longer than
    `max_chars` is refused unparsed (`statementTooLong`).
    """
    text = first_statement(sql)
    if not text:
        raise SqlError("empty query")
    if max_chars is not None and len(text) > max_chars:
        raise SqlError(f"statement of {len(text):,} characters, over the limit of {max_chars:,}",
                       Failure.STATEMENT_TOO_LONG)
    try:
        tree = sqlglot.parse_one(text, read=dialect)
    except (SqlglotError, RecursionError):
        return Query(text, bool(re.search(r"(?i)\border\s+by\b", text)), None)
    if not isinstance(tree, exp.Query):
        raise SqlError(f"not a query: {tree.key.upper()} statement")
    try:
        if '"' in sqlglot.Dialect.get_or_raise(dialect).tokenizer_class.IDENTIFIERS:
            tree = quoted_unknowns_as_strings(tree, known_columns)
        written = tree.sql(dialect="sqlite")
    except (SqlglotError, RecursionError) as exc:
        raise SqlError(f"cannot write the query for SQLite: {clean_error(exc)}") from None
    return Query(written, tree.args.get("order") is not None, tree)


def quoted_unknowns_as_strings(tree: exp.Expr, known_columns: set[str]) -> exp.Expr:
    """`"Yes"` -> `'Yes'` where "Yes" names no column or alias: SQLite's own fallback, made explicit."""
    aliases = {a.alias.lower() for a in tree.find_all(exp.Alias)}

    def swap(node: exp.Expr) -> exp.Expr:
        if (isinstance(node, exp.Column) and not node.table and isinstance(node.this, exp.Identifier)
                and node.this.quoted and node.name.lower() not in known_columns | aliases):
            return exp.Literal.string(node.name)
        return node

    return tree.transform(swap)


def clean_error(exc: BaseException) -> str:
    """sqlglot's message without its terminal colour codes, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    return " ".join(text.split())[:300]


# -- running a query ----------------------------------------------------------------------------------


def run(conn: sqlite3.Connection, sql: str, settings: Settings) -> list[tuple[Any, ...]]:
    """Execute `sql` with the guards on; rows with numbers normalised for comparison.

    SqlError with the reason: `timeout` (over `max_seconds` or `max_steps`, interrupted by the progress
    handler), `resultTooLarge` (over `max_rows` or `max_result_bytes`), `valueTooLarge` (a string or blob
    over `max_value_bytes`), `memoryLimit` (an allocation failed: the worker's rlimit), `sqlError` otherwise.
    """
    deadline = time.monotonic() + settings.max_seconds
    budget = [settings.max_steps // PROGRESS_OPCODES]
    stopped: list[str] = []

    def progress() -> int:
        budget[0] -= 1
        if budget[0] < 0:
            stopped.append(f"over {settings.max_steps:,} SQLite steps")
        elif time.monotonic() > deadline:
            stopped.append(f"over {settings.max_seconds:g} s")
        return 1 if stopped else 0

    conn.set_progress_handler(progress, PROGRESS_OPCODES)
    rows: list[tuple[Any, ...]] = []
    size = 0
    try:
        for row in conn.execute(sql):
            size += sum(len(v) if isinstance(v, str | bytes) else 8 for v in row)
            if size > settings.max_result_bytes:
                raise SqlError(f"result over {settings.max_result_bytes:,} bytes", Failure.RESULT_TOO_LARGE)
            rows.append(row)
            if len(rows) > settings.max_rows:
                raise SqlError(f"result has more than {settings.max_rows:,} rows", Failure.RESULT_TOO_LARGE)
    except sqlite3.Error as exc:
        if stopped:
            raise SqlError(f"query stopped: {stopped[0]}", Failure.TIMEOUT) from None
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_TOOBIG":
            raise SqlError(f"a string or blob over {settings.max_value_bytes:,} bytes",
                           Failure.VALUE_TOO_LARGE) from None
        raise SqlError(f"{type(exc).__name__}: {exc}") from None
    except MemoryError:
        rows.clear()
        raise SqlError("query stopped: out of memory", Failure.MEMORY_LIMIT) from None
    except (OverflowError, ValueError) as exc:
        raise SqlError(f"{type(exc).__name__}: {exc}") from None
    finally:
        conn.set_progress_handler(None, 0)
    return [tuple(normalize(v) for v in row) for row in rows]


def normalize(value: Any) -> Any:
    """Numbers by value (72.0 -> 72, floats to 6 decimals); blobs as hex; text as is."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if value.is_integer():
            return int(value)
        return round(value, 6)
    if isinstance(value, bytes):
        return value.hex()
    return value


# -- the sandbox: worker processes ------------------------------------------------------------------------

Example = tuple[str, str, str]
"""(prediction, gold, context)."""

STARTUP_SECONDS = 60.0
"""How long a new worker may take to start (an interpreter, sqlglot's import: ~0.2 s unloaded)."""


def score_examples(examples: Sequence[Example], settings: Settings) -> list[dict[str, Any]]:
    """`score_example` for each example, in the sandbox shared by every call with the same limits."""
    if not examples:
        return []
    return sandbox(settings).score(examples, settings)


def default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


_SANDBOXES: dict[tuple[int, int, int], Sandbox] = {}
_SANDBOXES_LOCK = threading.Lock()


def sandbox(settings: Settings) -> Sandbox:
    """The process's sandbox for these limits (memory, workers): started on first use, kept for later
    calls (the evaluator scores candidate after candidate), stopped at exit."""
    # The pid: a forked child must not talk to its parent's workers.
    key = (settings.memory_bytes, settings.workers or default_workers(), os.getpid())
    with _SANDBOXES_LOCK:
        if key not in _SANDBOXES:
            if not _SANDBOXES:
                atexit.register(_close_sandboxes)
            _SANDBOXES[key] = Sandbox(key[0], key[1])
        return _SANDBOXES[key]


def _close_sandboxes() -> None:
    with _SANDBOXES_LOCK:
        for box in _SANDBOXES.values():
            box.close()
        _SANDBOXES.clear()


class Sandbox:
    """A pool of persistent worker processes, each under RLIMIT_AS, that score examples.

    A worker scores one example at a time: it builds the tables, then runs the gold-side queries and the
    prediction, announcing each (the heartbeat) so that the parent can time it. A query still running
    `max_seconds + kill_grace_seconds` after its heartbeat, or setup over `setup_seconds`, gets the worker
    killed; a worker that was killed, died, or ran out of memory is replaced by a fresh one for the next
    example. Examples are scored `workers` at a time, by as many threads each driving one worker.
    """

    def __init__(self, memory_bytes: int, workers: int) -> None:
        self.memory_bytes = memory_bytes
        self.workers = workers
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(None)  # started when first needed
        self._lock = threading.Lock()
        self._live: set[_Worker] = set()
        self.started = 0
        """Workers started so far (replacements included)."""

    def score(self, examples: Sequence[Example], settings: Settings) -> list[dict[str, Any]]:
        if len(examples) <= 1 or self.workers == 1:
            return [self.score_one(e, settings) for e in examples]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(examples)),
                                thread_name_prefix="kubetune-sql") as pool:
            return list(pool.map(lambda e: self.score_one(e, settings), examples))

    def score_one(self, example: Example, settings: Settings) -> dict[str, Any]:
        worker = self._idle.get()
        try:
            if worker is not None and worker.proc.poll() is not None:  # died while idle
                self._stop(worker)
                worker = None
            if worker is None:
                worker = self._start()
            entry, healthy = worker.score(example, settings)
        except BaseException:
            healthy = False
            raise
        finally:
            if worker is not None and not healthy:
                self._stop(worker)
                worker = None
            self._idle.put(worker)
        return entry

    def pids(self) -> list[int]:
        """The live workers' process ids."""
        with self._lock:
            return sorted(w.proc.pid for w in self._live)

    def close(self) -> None:
        with self._lock:
            live = list(self._live)
        for worker in live:
            self._stop(worker)

    def _start(self) -> _Worker:
        worker = _Worker(self.memory_bytes)
        with self._lock:
            self._live.add(worker)
            self.started += 1
        return worker

    def _stop(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._live.discard(worker)


_WORKER_ENVIRONMENT = frozenset({"PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ"})
"""What a worker inherits of the environment: no tokens or API keys next to the model's queries."""


class _Worker:
    """One worker process, spoken to over a socket pair with `multiprocessing.connection`."""

    def __init__(self, memory_bytes: int) -> None:
        ours, theirs = socket.socketpair()
        path = [os.path.abspath(p or os.curdir) for p in sys.path]
        boot = ("import json, sys; sys.path[:0] = json.loads(sys.argv[3]); "
                "from kubetune.serving.sqlexec import worker_main; worker_main(int(sys.argv[1]), int(sys.argv[2]))")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", boot, str(theirs.fileno()), str(memory_bytes), json.dumps(path)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if k in _WORKER_ENVIRONMENT})
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        try:  # a worker that cannot start must not pass for examples that cannot be built
            ready = self.conn.poll(STARTUP_SECONDS) and self.conn.recv() == ("ready",)
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"the SQL sandbox's worker process did not start (exit code {self.proc.returncode})")

    def score(self, example: Example, settings: Settings) -> tuple[dict[str, Any], bool]:
        """(the example's entry, whether this worker may score another)."""
        phase, entry = "setup", dict[str, Any]()
        try:
            self.conn.send(example + (settings,))
        except OSError:
            return _stopped(phase, entry, Failure.WORKER_CRASHED, "the worker process died"), False
        limit = settings.setup_seconds
        deadline = time.monotonic() + limit
        while True:
            try:
                ready = self.conn.poll(max(0.0, deadline - time.monotonic()))
                message = self.conn.recv() if ready else None
            except (EOFError, OSError):
                return _stopped(phase, entry, Failure.WORKER_CRASHED, "the worker process died"), False
            if message is None:
                return _stopped(phase, entry, Failure.TIMEOUT, f"query killed after {limit:g} s"), False
            kind = message[0]
            if kind == "query":
                phase, entry = message[1], message[2]
                # Building databases has the setup budget; every query its own max_seconds (+ grace).
                limit = settings.setup_seconds if phase == "setup" else settings.max_seconds + \
                    settings.kill_grace_seconds
                deadline = time.monotonic() + limit
            elif kind == "done":
                done: dict[str, Any] = message[1]
                return done, Failure.MEMORY_LIMIT not in (done.get("failure"), done.get("goldFailure"))
            else:  # "failed": an exception the scoring code did not expect (the worker then exits)
                reason = Failure.MEMORY_LIMIT if message[1] == "MemoryError" else Failure.SCORER_ERROR
                return _stopped(phase, entry, reason, f"scoring failed: {message[1]}"), False

    def kill(self) -> None:
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _stopped(phase: str, entry: dict[str, Any], reason: Failure, message: str) -> dict[str, Any]:
    """The entry of an example whose worker was killed (or died) in `phase`."""
    out = blank_entry()
    out.update(entry)
    if phase == "prediction":
        out.update(score=0.0, correct=False, error=message, failure=reason)
    elif phase == "gold":
        out.update(dropped=DROP_GOLD_FAILS, goldFailure=reason)
    else:
        out.update(dropped=DROP_BAD_TABLES)
    return out


def worker_main(fd: int, memory_bytes: int) -> None:
    """A worker process: under RLIMIT_AS, score the examples the parent sends until it hangs up."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn = Connection(fd)
    conn.send(("ready",))

    def beat(phase: str, entry: dict[str, Any]) -> None:
        conn.send(("query", phase, dict(entry)))

    while True:
        try:
            prediction, gold, context, settings = conn.recv()
        except EOFError:
            return
        try:
            entry = score_example(prediction, gold, context, settings, beat)
        except MemoryError:
            conn.send(("failed", "MemoryError"))
            return
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which replaces this worker
            conn.send(("failed", type(exc).__name__))
            return
        conn.send(("done", entry))
