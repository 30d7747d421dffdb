"""Execution match for text-to-SQL (sql-create-context style rows), behind the `sqlExecution` scorer.

A row has a question, a `context` of `CREATE TABLE` statements without data, and a gold query. Comparing
query text would punish every correct paraphrase, so each example gets its own in-memory SQLite database:
the context's tables, filled with deterministic synthetic rows, on which the gold and the predicted query
both run; the prediction is right when the results are equal.

Why SQLite (stdlib `sqlite3`) executes and sqlglot only parses and transpiles: SQLite is a real SQL engine
(joins, subqueries, GROUP BY/HAVING, LIKE, set operations) that runs a query on 20-row tables in
microseconds and can be interrupted (progress handler) and sandboxed (authorizer, length limit), so a
runaway or hostile prediction cannot hang or harm the evaluation. sqlglot's own executor is pure Python,
slower, covers less SQL and has no such guards. sqlglot does what SQLite cannot: read the CREATE TABLE
context, transpile from another dialect (option `dialect`), tell a query from other statements, and find
the gold query's literals.

Synthetic data must make the gold query return something, or every prediction that returns nothing
"matches". So the values are seeded by the example (same tables on every run and for every candidate)
and built from the gold query: a literal compared with a column (`age > 56`, `name = 'Yes'`,
`IN (...)`, `BETWEEN`, `LIKE '%x%'`) yields a value that satisfies the comparison; the first three rows of
every table satisfy all of them at once (conjunctions match), the others mix those values with a small
per-column pool (so GROUP BY and HAVING see duplicates). Columns joined in the gold query (`T1.id =
T2.head_id`), and columns of the same name, share a pool, so joins match; each table leaves out one of the
pool's values, so anti-joins (`NOT IN (SELECT ...)`) match too.

Examples are dropped, with the reason counted, when the gold query fails, returns nothing (no rows, or
only NULLs), returns a whole table unfiltered, or returns rows through a WHERE clause that removes none
of them here: none of those can tell a right prediction from a wrong one. Results compare as multisets of rows (order-insensitive) unless the gold query has a top-level
ORDER BY (then rows tied on the sort key must come in the order SQLite gives them, a rare false negative);
columns compare by position; numbers compare by value (72 == 72.0, floats to 6 decimals).
In a dialect that quotes identifiers with double quotes (sqlite's default), a double-quoted name that is
no column or alias is read as a string, as SQLite itself does: sql-create-context writes `name = "Yes"`.

The queries are the model's output, so they run in a sandbox (`Sandbox`): a pool of persistent worker
processes, each under `RLIMIT_AS` (`Settings.memory_bytes`), that build each example's database and run its
gold and predicted queries. In the worker, SQLite's progress handler runs every `PROGRESS_OPCODES` VM
opcodes and interrupts a query past its step budget or `max_seconds`; the statement (`max_statement_chars`),
every value (`max_value_bytes`) and the materialised result (`max_result_bytes`, `max_rows`) are capped;
temporary storage stays in memory (so under the rlimit, never on disk). The parent kills a worker whose
query is still running `kill_grace_seconds` after `max_seconds` (one slow opcode: `instr` over megabyte
strings) and starts another. A prediction stopped by any of these scores 0 with the reason in its entry's
`failure` (`scorers.Failure`); a gold query stopped the same way drops the example (`goldFailure` says why).
The databases are in memory and read-only to the queries (the authorizer allows reading and functions
only; `query_only` is on), and a worker inherits nothing of the environment but PATH, LD_LIBRARY_PATH,
the locale and TZ: no token or API key of the evaluator's.
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
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from kubetune.serving.scorers import Failure

MATCHING_ROWS = 3
"""Rows at the top of every table that satisfy all of the gold query's comparisons at once."""
POOL_SIZE = 6
HINT_SHARE = 0.35
"""Probability that a later row takes one of the gold query's values rather than a pool value."""

DROP_NO_CONTEXT = "no CREATE TABLE context"
DROP_BAD_CONTEXT = "context does not parse"
DROP_BAD_TABLES = "tables cannot be built"
DROP_GOLD_FAILS = "gold fails to execute"
DROP_GOLD_EMPTY = "gold result empty"
DROP_WHOLE_TABLE = "gold returns the whole table"
DROP_FILTER_KEEPS_ALL = "gold's WHERE keeps every row"


PROGRESS_OPCODES = 100
"""SQLite VM opcodes between two calls of the progress handler (which checks the step budget and the clock)."""


@dataclass(frozen=True)
class Settings:
    """How examples are built and queries bounded."""

    dialect: str = "sqlite"
    rows_per_table: int = 20
    seed: int = 0
    max_steps: int = 20_000_000
    """SQLite VM instructions per query: deterministic runaway guard (plain queries here need < 100k)."""
    max_seconds: float = 2.0
    """Wall-clock limit per query: the worker's progress handler interrupts the query past it."""
    kill_grace_seconds: float = 0.5
    """The parent kills the worker when a query (or the prediction's parsing) runs this long past
    `max_seconds`: a single opcode the progress handler cannot interrupt."""
    setup_seconds: float = 30.0
    """Wall-clock limit for reading an example's context and building its tables (no model output)."""
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


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # integer, real, numeric, text, date or blob: what values to generate
    declared: str  # the SQLite column type, which sets the column's affinity


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]


@dataclass
class Query:
    """A query ready for SQLite: its text, whether its order matters, and its sqlglot tree (if it parsed)."""

    sql: str
    ordered: bool
    tree: exp.Expr | None


@dataclass
class Hints:
    """Values the gold query compares columns with, by lower-cased column name."""

    match: dict[str, list[Any]] = field(default_factory=dict)  # satisfy the comparison
    near: dict[str, list[Any]] = field(default_factory=dict)  # the boundary itself (`56` for `age > 56`)
    links: list[tuple[str, str]] = field(default_factory=list)  # column = column (joins)


class SqlError(Exception):
    """A query that cannot be parsed or executed; the message goes into the example's `error`, the reason
    (a `Failure`) into its `failure`."""

    def __init__(self, message: str, reason: Failure = Failure.SQL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


Beat = Callable[[str, dict[str, Any]], None]
"""Called before each query with its phase ("gold" or "prediction") and the example's entry so far: the
worker's heartbeat, from which the parent times each query."""


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


def score_example(prediction: str, gold: str, context: str, settings: Settings,
                  beat: Beat = _no_beat) -> dict[str, Any]:
    """The per-example entry: score, dropped, correct, error, failure, goldFailure, goldRows, predictedRows,
    ordered, executed. In-process, with every guard but the parent's kill and the rlimit: `Sandbox` runs it
    in a worker process."""
    entry: dict[str, Any] = {"score": 0.0, "dropped": None, "correct": False, "error": None, "failure": None,
                             "goldFailure": None, "goldRows": None, "predictedRows": None, "ordered": False,
                             "executed": None}
    if not context.strip():
        entry["dropped"] = DROP_NO_CONTEXT
        return entry
    try:
        tables = parse_context(context, settings.dialect)
    except SqlError:
        entry["dropped"] = DROP_BAD_CONTEXT
        return entry
    known = {c.name.lower() for t in tables for c in t.columns}
    try:
        gold_query = prepare(gold, settings.dialect, known)
    except SqlError:
        entry["dropped"] = DROP_GOLD_FAILS
        return entry
    entry["ordered"] = gold_query.ordered
    hints = harvest(gold_query.tree) if gold_query.tree is not None else Hints()
    try:
        conn = build_database(tables, hints, random.Random(example_seed(settings.seed, context, gold)), settings)
    except (sqlite3.Error, OverflowError, MemoryError):
        entry["dropped"] = DROP_BAD_TABLES
        return entry
    try:
        try:
            beat("gold", entry)
            expected = run(conn, gold_query.sql, settings)
            entry["goldRows"] = len(expected)
            if all(v is None for row in expected for v in row):
                entry["dropped"] = DROP_GOLD_EMPTY
                return entry
            if any(Counter(expected) == Counter(whole) for whole in table_contents(conn, tables, settings, beat, entry)):
                entry["dropped"] = DROP_WHOLE_TABLE
                return entry
            if filter_keeps_every_row(conn, gold_query, expected, settings, beat, entry):
                entry["dropped"] = DROP_FILTER_KEEPS_ALL
                return entry
        except SqlError as exc:
            entry["dropped"] = DROP_GOLD_FAILS
            entry["goldFailure"] = exc.reason
            return entry
        beat("prediction", entry)
        try:
            query = prepare(prediction, settings.dialect, known, settings.max_statement_chars)
            entry["executed"] = query.sql
            got = run(conn, query.sql, settings)
        except SqlError as exc:
            entry["error"] = str(exc)
            entry["failure"] = exc.reason
            return entry
        except MemoryError:
            entry["error"] = "out of memory"
            entry["failure"] = Failure.MEMORY_LIMIT
            return entry
        except Exception as exc:  # noqa: BLE001 - a model's output must never abort the whole evaluation
            entry["error"] = f"{type(exc).__name__}: {clean_error(exc)}"
            entry["failure"] = Failure.SQL_ERROR
            return entry
        entry["predictedRows"] = len(got)
        entry["correct"] = got == expected if gold_query.ordered else Counter(got) == Counter(expected)
        entry["score"] = 1.0 if entry["correct"] else 0.0
        return entry
    finally:
        conn.close()


def filter_keeps_every_row(conn: sqlite3.Connection, gold: Query, expected: list[tuple[Any, ...]],
                           settings: Settings, beat: Beat = _no_beat, entry: dict[str, Any] | None = None) -> bool:
    """The gold query's WHERE clause removes no row from these tables: a prediction that drops the
    condition (`SELECT name FROM t`) would get the same rows, so the example cannot tell them apart.

    Row-returning queries only: an aggregate (`MAX(crowd) ... WHERE team = 'x'`) that happens to equal
    the unfiltered one is a coincidence of the generated values, and such queries are most of the data.
    """
    tree = gold.tree
    if (not isinstance(tree, exp.Select) or tree.args.get("where") is None or tree.args.get("group")
            or any(e.find(exp.AggFunc) for e in tree.expressions)):
        return False
    bare = tree.copy()
    bare.set("where", None)
    try:
        sql = bare.sql(dialect="sqlite")
    except SqlglotError:
        return False
    beat("gold", entry or {})
    try:
        everything = run(conn, sql, settings)
    except SqlError as exc:
        if exc.reason == Failure.SQL_ERROR:
            return False
        raise  # stopped by a guard: the gold's example cannot be judged here either
    return Counter(everything) == Counter(expected)


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


# -- the gold query's values --------------------------------------------------------------------------

_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike)
_FLIPPED: dict[type[exp.Expr], type[exp.Expr]] = {exp.GT: exp.LT, exp.LT: exp.GT, exp.GTE: exp.LTE,
                                                  exp.LTE: exp.GTE}


def harvest(tree: exp.Expr) -> Hints:
    """Values that satisfy the gold query's column-vs-literal comparisons, and its column = column links."""
    hints = Hints()
    for node in tree.walk():
        if isinstance(node, _COMPARISONS):
            left, right = node.this, node.expression
            op: type[exp.Expr] = type(node)
            if isinstance(left, exp.Column) and isinstance(right, exp.Column):
                if op is exp.EQ:
                    hints.links.append((left.name.lower(), right.name.lower()))
                continue
            if not isinstance(left, exp.Column):
                left, right, op = right, left, _FLIPPED.get(op, op)
            value = literal_value(right)
            if isinstance(left, exp.Column) and value is not None:
                # `<>`: the literal belongs in the data, but not in the rows meant to satisfy everything.
                _add(hints, left.name, None if op is exp.NEQ else satisfying(op, value), value)
        elif isinstance(node, exp.In) and isinstance(node.this, exp.Column):
            for item in node.expressions:
                value = literal_value(item)
                if value is not None:
                    _add(hints, node.this.name, value, value)
        elif isinstance(node, exp.Between) and isinstance(node.this, exp.Column):
            for bound in (node.args.get("low"), node.args.get("high")):
                value = literal_value(bound)
                if value is not None:
                    _add(hints, node.this.name, value, value)
    return hints


def _add(hints: Hints, column: str, match: Any, near: Any) -> None:
    key = column.lower()
    if match is not None and match not in hints.match.setdefault(key, []):
        hints.match[key].append(match)
    if near != match and near not in hints.near.setdefault(key, []):
        hints.near[key].append(near)


def literal_value(node: exp.Expr | None) -> Any:
    """The Python value of a literal (`'x'`, `5`, `-2.5`), else None."""
    if isinstance(node, exp.Paren):
        return literal_value(node.this)
    if isinstance(node, exp.Neg):
        inner = literal_value(node.this)
        return -inner if isinstance(inner, int | float) else None
    if not isinstance(node, exp.Literal):
        return None
    if node.is_string:
        return node.this
    return as_number(node.this)


def as_number(text: Any) -> int | float | None:
    if isinstance(text, int | float):
        return text
    try:
        return int(text)
    except (TypeError, ValueError):
        pass
    try:
        number = float(text)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def satisfying(op: type[exp.Expr], value: Any) -> Any:
    """A value v with `v <op> value` true: 57 for `> 56`, 'ab' for `LIKE '%ab%'`; `value` itself otherwise."""
    if op in (exp.Like, exp.ILike) and isinstance(value, str):
        return value.replace("%", "").replace("_", "x")
    if op in (exp.GT, exp.LT):
        step = 1 if op is exp.GT else -1
        number = as_number(value)
        if number is None:
            return value + "z" if isinstance(value, str) and step > 0 else value
        moved = number + step
        return str(moved) if isinstance(value, str) else moved
    return value


# -- the database ---------------------------------------------------------------------------------------


def build_database(tables: Sequence[Table], hints: Hints, rng: random.Random, settings: Settings
                   ) -> sqlite3.Connection:
    """An in-memory database with the tables filled, locked down for running untrusted queries."""
    conn = sqlite3.connect(":memory:")
    try:
        _fill(conn, tables, hints, rng, settings)
    except BaseException:
        conn.close()
        raise
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, settings.max_value_bytes)
    # sqlglot may write a statement longer than the prediction (quoting, expansion); gold queries are short.
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 4 * settings.max_statement_chars)
    conn.execute("PRAGMA temp_store = MEMORY")  # sorters and temporary tables under the rlimit, not on disk
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(_read_only)
    return conn


def _fill(conn: sqlite3.Connection, tables: Sequence[Table], hints: Hints, rng: random.Random,
          settings: Settings) -> None:
    groups = _groups([c.name.lower() for t in tables for c in t.columns], hints.links)
    match: dict[str, list[Any]] = {}
    near: dict[str, list[Any]] = {}
    for name, values in hints.match.items():
        match.setdefault(groups.get(name, name), []).extend(values)
    for name, values in hints.near.items():
        near.setdefault(groups.get(name, name), []).extend(values)
    pools: dict[str, list[Any]] = {}
    for index, table in enumerate(tables):
        columns = ", ".join(f"{quote(c.name)} {c.declared}".strip() for c in table.columns)
        conn.execute(f"CREATE TABLE {quote(table.name)} ({columns})")
        rows = []
        for i in range(settings.rows_per_table):
            row = []
            for col in table.columns:
                group = groups[col.name.lower()]
                wanted, boundary = match.get(group, []), near.get(group, [])
                if i < MATCHING_ROWS and wanted:
                    row.append(wanted[i % len(wanted)])
                elif (wanted or boundary) and rng.random() < HINT_SHARE:
                    row.append(rng.choice(wanted + boundary))
                else:
                    if group not in pools:
                        pools[group] = make_pool(col, wanted + boundary, rng)
                    pool = pools[group]
                    # Each table leaves out a different pool value, so that `NOT IN (SELECT ...)` and
                    # outer joins across tables that share a pool still find rows without a partner.
                    row.append(rng.choice([v for k, v in enumerate(pool) if k != index % len(pool)] or pool))
            rows.append(row)
        marks = ", ".join("?" for _ in table.columns)
        conn.executemany(f"INSERT INTO {quote(table.name)} VALUES ({marks})", rows)
    conn.commit()


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _groups(columns: Iterable[str], links: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Column name -> representative of its join group (union-find over the gold query's equalities)."""
    parent: dict[str, str] = {c: c for c in columns}

    def find(c: str) -> str:
        parent.setdefault(c, c)
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {c: find(c) for c in list(parent)}


def make_pool(col: Column, hinted: Sequence[Any], rng: random.Random) -> list[Any]:
    """A column's few background values; near the gold query's numbers when it compares the column to any."""
    numbers = [n for n in (as_number(v) for v in hinted) if n is not None]
    if numbers and (col.kind != "text" or len(numbers) == len(hinted)):
        base = numbers[rng.randrange(len(numbers))]
        spread = [base + d for d in (-7, -3, -1, 2, 5, 11)] if isinstance(base, int) else \
            [round(base * f, 2) for f in (0.5, 0.8, 0.95, 1.1, 1.5, 2.0)]
        return [str(v) for v in spread] if col.kind == "text" else spread
    if col.kind in ("integer", "numeric"):
        return rng.sample(range(1, 60), POOL_SIZE)
    if col.kind == "real":
        return [round(rng.uniform(1, 100), 2) for _ in range(POOL_SIZE)]
    if col.kind == "date":
        return [f"{rng.randint(1990, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
                for _ in range(POOL_SIZE)]
    stem = re.sub(r"\W+", " ", col.name).strip() or "value"
    return [f"{stem} {k}" for k in rng.sample(range(1, 100), POOL_SIZE)]


_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def _read_only(action: int, *_: Any) -> int:
    """Authorizer: reading tables and calling functions only (no writes, ATTACH, PRAGMA...)."""
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def table_contents(conn: sqlite3.Connection, tables: Sequence[Table], settings: Settings, beat: Beat = _no_beat,
                   entry: dict[str, Any] | None = None) -> list[list[tuple[Any, ...]]]:
    contents = []
    for t in tables:
        beat("gold", entry or {})
        contents.append(run(conn, f"SELECT * FROM {quote(t.name)}", settings))
    return contents


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
                limit = settings.max_seconds + settings.kill_grace_seconds
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
    out: dict[str, Any] = {"score": 0.0, "dropped": None, "correct": False, "error": None, "failure": None,
                           "goldFailure": None, "goldRows": None, "predictedRows": None, "ordered": False,
                           "executed": None}
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
