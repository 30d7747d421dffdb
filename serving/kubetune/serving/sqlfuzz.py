"""Test-suite databases for one text-to-SQL example (after Zhong et al., 2020, "Semantic Evaluation for
Text-to-SQL with Distilled Test Suites"): several small databases, generated from the example's
`CREATE TABLE` context and shaped by its gold query, on which a prediction must return the gold's result
on every one to count as right. Constructed, not distilled: no neighbour queries are run to pick them.

One database filled with rows that satisfy the gold's conditions calls wrong queries right: with one
matching row `AVG(x)` equals `SUM(x)` and `MIN(x)` equals `MAX(x)`; when every row passes the `WHERE`,
dropping it changes nothing; when every key has a partner, dropping a join condition changes little.
What the gold query says about the data (`analyze`, read with sqlglot) decides how each database is
filled (`plan`, then `build` per database):

- **Conditions.** The gold's `WHERE` and `ON` clauses are split into conjuncts; a conjunct that reads one
  table's columns (no subquery, no aggregate) is a *local* conjunct of that table, and each SELECT (each
  branch of a set operation, each subquery) gives its table a *filter*. Candidate values for each
  compared column come from the gold's literals (`age > 56`: 47, 53, 55, 56, 57, 58, 61, 68; `LIKE
  '%West%'`: 'West', 'West side', 'North West', 'Wes'...) plus background values and NULL; SQLite itself
  tells which candidates satisfy which single-column conjunct (type affinity, LIKE's rules, NULL: SQLite's,
  not a re-implementation). Each table then gets, per filter, rows that satisfy all of its conjuncts
  (ALL: 2 or 3, distinct values where there are several candidates: aggregates over them differ), rows
  that violate exactly one conjunct (MISS: 1 or 2 per conjunct: each conjunct matters), rows that meet
  every filter at once where they can (EVERY), and free rows. A row meant for one filter avoids values
  that another filter's conjuncts want (a violator of `= 'French'` is not 'English').
- **Keys.** Columns the gold equates (`T1.id = T2.head_id`, `x IN (SELECT y ...)`, `x = (SELECT y ...)`,
  the columns of a set operation's branches) and id-like columns of the same name share a value pool
  (larger than the tables: some keys have no partner, so anti-joins, `NOT IN`, outer joins and dropped
  join conditions show). A column that looks like its table's key (`primary_key_like`: `Singer_ID` in
  `singer`, `ID` in `city`) holds distinct values and is never NULL. The rows meant to meet the conditions
  (and some "hot" free rows) take their keys from 2 or 3 *hot* values, so that they find partners across
  joins; in the even databases in a pattern (two matching rows share a key: a group with two matching
  rows; filter i's rows take keys i and i + 1, so one filter's entities meet another's on some keys, not
  all; conjunct j's first violator shares a key with matching rows, its second has one of its own), in
  the odd ones at random. Free rows draw keys from the pool with Zipf weights: large groups and singletons.
- **Values.** Grouped columns draw from a small skewed pool (groups of different sizes: `HAVING count(*)
  > 1`, `ORDER BY count(*)`); columns under DISTINCT mostly from a pool of 2 or 3 values (duplicates among
  the matching rows); columns under AVG or SUM hold numbers even when declared TEXT (Spider keeps
  numbers there); other columns take values from a wide range (few ties, so `ORDER BY ... LIMIT` has one
  answer; different columns hold different values).
- **The databases differ** (`VARIANTS`, by index % 8): database 0 has `rows` rows per table, the others
  between half that and all of it, each table on its own; "duplicates" copies two or three matching rows
  over free ones (`DISTINCT`, `COUNT(DISTINCT)`, `UNION` vs `UNION ALL`); "nulls" puts NULLs in about 15%
  of the cells that are neither keys, nor ordered, nor set by the conditions (40% in a column under
  COUNT: `COUNT(x)` vs `COUNT(*)`); "tiny" has 1 to 3 rows per table; "small" 2 or 3 rows, all alike but
  their keys (nothing below the average, MIN = MAX); "narrow" draws columns under AVG and SUM from 10 to
  40 and the free rows' keys from 4 values (sums follow group sizes, averages do not).

Everything is seeded by the example (`seed`, the database's index), and nothing iterates over a hash-ordered
set: the same databases in every process. Sizes are bounded: `rows` rows per table, the caller's number of
databases, at most `MAX_CANDIDATES` candidate values per column; the conjunct checks run through the
caller's guarded `Evaluate` on a locked-down scratch database (the gold query is dataset input, untrusted),
and a conjunct the guards stop only loses its targeting.
"""

from __future__ import annotations

import datetime
import math
import random
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.scope import traverse_scope

MAX_CANDIDATES = 24
"""Candidate values per compared column (near the gold's literals, plus background)."""
HOT_KEYS = 0.8
"""Probability that a row meant to match takes a hot key (else any key of the pool)."""
HOT_SHARE = 0.3
"""Share of a table's free rows that take hot keys (so that tables without conditions join too)."""
NULL_SHARE = 0.15
"""Share of the eligible cells that are NULL in the databases with NULLs."""
COUNTED_NULL_SHARE = 0.4
"""... in a column under COUNT(x) (COUNT(x) and COUNT(y) differ by their NULLs only)."""
SKEW = (0.4, 0.25, 0.15, 0.12, 0.08)
"""Weights of a grouped column's pool values: groups of different sizes."""
ZIPF = tuple(1 / (k + 1) for k in range(1005))
"""Weights of a key pool's values in a table's free rows: many rows for some keys, one or none for most."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # integer, real, numeric, text, date or blob: what values to generate
    declared: str  # the SQLite column type, which sets the column's affinity


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]


Ref = tuple[str, str]
"""(table, column), lower-cased."""

Evaluate = Callable[[sqlite3.Connection, str], list[tuple[Any, ...]]]
"""Runs a query under the caller's guards; raises on any failure."""


@dataclass(frozen=True)
class Conjunct:
    """One local conjunct of a table: its SQL for a one-table database (columns unqualified)."""

    sql: str
    columns: tuple[str, ...]  # lower-case names it reads, sorted


@dataclass(frozen=True)
class Filter:
    """The local conjuncts one SELECT (or one JOIN) puts on one table."""

    table: str
    conjuncts: tuple[Conjunct, ...]


@dataclass
class Profile:
    """What the gold query says about the data."""

    links: list[tuple[Ref, Ref]] = field(default_factory=list)
    literals: dict[Ref, list[Any]] = field(default_factory=dict)
    patterns: dict[Ref, list[str]] = field(default_factory=dict)
    filters: list[Filter] = field(default_factory=list)
    aggregated: set[Ref] = field(default_factory=set)
    summed: set[Ref] = field(default_factory=set)
    """Columns under AVG or SUM: numbers, even in a TEXT column (Spider keeps numbers in some)."""
    counted: set[Ref] = field(default_factory=set)
    """Columns under COUNT."""
    distinct: set[Ref] = field(default_factory=set)
    """Columns under DISTINCT (`COUNT(DISTINCT x)`, `SELECT DISTINCT x`): they need duplicates."""
    grouped: set[Ref] = field(default_factory=set)
    ordered: set[Ref] = field(default_factory=set)


# -- reading the gold query ---------------------------------------------------------------------------

_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike)


def analyze(tree: exp.Expr, tables: Sequence[Table]) -> Profile:
    """The gold query's conditions, links and column roles, columns resolved to their tables."""
    schema = {t.name.lower(): {c.name.lower() for c in t.columns} for t in tables}
    owners: dict[str, list[str]] = {}
    for t in tables:
        for c in t.columns:
            owners.setdefault(c.name.lower(), []).append(t.name.lower())
    resolved: dict[int, Ref] = {}
    selects: list[tuple[exp.Select, dict[str, str]]] = []
    try:
        scopes = list(traverse_scope(tree))
    except (SqlglotError, RecursionError, KeyError, ValueError, AttributeError, TypeError):
        scopes = []
    for scope in scopes:
        aliases = {name.lower(): source.name.lower() for name, source in scope.sources.items()
                   if isinstance(source, exp.Table) and source.name.lower() in schema}
        for col in scope.columns:
            ref = _resolve(col, aliases, schema)
            if ref is not None:
                resolved[id(col)] = ref
        if isinstance(scope.expression, exp.Select):
            selects.append((scope.expression, aliases))

    def ref_of(node: exp.Expr | None) -> Ref | None:
        if not isinstance(node, exp.Column) or not node.name:
            return None
        found = resolved.get(id(node))
        if found is not None:
            return found
        name, table = node.name.lower(), node.table.lower()
        if table in schema and name in schema[table]:
            return table, name
        return (owners[name][0], name) if name in owners else None

    profile = Profile()
    for node in tree.walk():
        _harvest(node, ref_of, profile)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for select, _ in selects:
        conditions: list[exp.Expr] = []
        where = select.args.get("where")
        if where is not None:
            conditions.append(where.this)
        for join in select.args.get("joins") or []:
            on = join.args.get("on")
            if on is not None:
                conditions.append(on)
        by_table: dict[str, list[Conjunct]] = {}
        for condition in conditions:
            for part in split_conjuncts(condition):
                local = _local(part, ref_of)
                if local is not None:
                    by_table.setdefault(local[0], []).append(local[1])
        for table, conjuncts in by_table.items():
            key = (table, tuple(c.sql for c in conjuncts))
            if key not in seen:
                seen.add(key)
                profile.filters.append(Filter(table, tuple(conjuncts)))
    return profile


def _resolve(col: exp.Column, aliases: dict[str, str], schema: dict[str, set[str]]) -> Ref | None:
    name = col.name.lower()
    if col.table:
        table = aliases.get(col.table.lower())
        return (table, name) if table is not None and name in schema[table] else None
    for table in aliases.values():
        if name in schema[table]:
            return table, name
    return None


def split_conjuncts(condition: exp.Expr) -> Iterator[exp.Expr]:
    """The operands of a chain of ANDs (through parentheses), in order."""
    if isinstance(condition, exp.And):
        yield from split_conjuncts(condition.this)
        yield from split_conjuncts(condition.expression)
    elif isinstance(condition, exp.Paren) and isinstance(condition.this, exp.And):
        yield from split_conjuncts(condition.this)
    else:
        yield condition


def _local(part: exp.Expr, ref_of: Callable[[exp.Expr | None], Ref | None]) -> tuple[str, Conjunct] | None:
    """(table, conjunct) when `part` reads the columns of one table only, without subqueries or aggregates."""
    if part.find(exp.Select, exp.Subquery, exp.AggFunc, exp.Exists) is not None:
        return None
    columns = list(part.find_all(exp.Column))
    refs = [ref_of(c) for c in columns]
    if not refs or any(r is None for r in refs):
        return None
    tables = {r[0] for r in refs if r is not None}
    if len(tables) != 1:
        return None

    def bare(node: exp.Expr) -> exp.Expr:
        return exp.column(node.name, quoted=True) if isinstance(node, exp.Column) else node

    try:
        sql = part.copy().transform(bare).sql(dialect="sqlite")
    except (SqlglotError, RecursionError):
        return None
    names = tuple(sorted({r[1] for r in refs if r is not None}))
    return tables.pop(), Conjunct(sql, names)


def _harvest(node: exp.Expr, ref_of: Callable[[exp.Expr | None], Ref | None], profile: Profile) -> None:
    if isinstance(node, _COMPARISONS):
        left, right = node.this, node.expression
        left_ref, right_ref = ref_of(left), ref_of(right)
        if left_ref is not None and right_ref is not None:
            if isinstance(node, exp.EQ):
                profile.links.append((left_ref, right_ref))
            return
        for column, other in ((left, right), (right, left)):
            ref = ref_of(column) or ref_of(_aggregated_column(column))
            if ref is None:
                continue
            value = literal_value(other)
            if value is not None:
                if isinstance(node, exp.Like | exp.ILike) and isinstance(value, str):
                    _append(profile.patterns, ref, value)
                else:
                    _append(profile.literals, ref, value)
            elif isinstance(other, exp.Subquery | exp.Select):
                linked = ref_of(_first_selected(other))
                if linked is not None:
                    profile.links.append((ref, linked))
    elif isinstance(node, exp.In):
        ref = ref_of(node.this)
        if ref is None:
            return
        for item in node.expressions:
            value = literal_value(item)
            if value is not None:
                _append(profile.literals, ref, value)
        query = node.args.get("query")
        if query is not None:
            linked = ref_of(_first_selected(query))
            if linked is not None:
                profile.links.append((ref, linked))
    elif isinstance(node, exp.Between):
        ref = ref_of(node.this)
        if ref is not None:
            for bound in (node.args.get("low"), node.args.get("high")):
                value = literal_value(bound)
                if value is not None:
                    _append(profile.literals, ref, value)
    elif isinstance(node, exp.SetOperation):
        left, right = _leftmost_select(node.this), _leftmost_select(node.expression)
        if left is not None and right is not None:
            for a, b in zip(left.expressions, right.expressions, strict=False):
                ra, rb = ref_of(_unaliased(a)), ref_of(_unaliased(b))
                if ra is not None and rb is not None and ra != rb:
                    profile.links.append((ra, rb))
    elif isinstance(node, exp.AggFunc):
        for col in node.find_all(exp.Column):
            ref = ref_of(col)
            if ref is not None:
                profile.aggregated.add(ref)
                if isinstance(node, exp.Avg | exp.Sum):
                    profile.summed.add(ref)
                elif isinstance(node, exp.Count):
                    profile.counted.add(ref)
    elif isinstance(node, exp.Distinct):
        for col in node.find_all(exp.Column):
            ref = ref_of(col)
            if ref is not None:
                profile.distinct.add(ref)
    elif isinstance(node, exp.Select) and node.args.get("distinct") is not None:
        for expression in node.expressions:
            ref = ref_of(_unaliased(expression))
            if ref is not None:
                profile.distinct.add(ref)
    elif isinstance(node, exp.Group):
        for col in node.find_all(exp.Column):
            ref = ref_of(col)
            if ref is not None:
                profile.grouped.add(ref)
    elif isinstance(node, exp.Order):
        for col in node.find_all(exp.Column):
            ref = ref_of(col)
            if ref is not None:
                profile.ordered.add(ref)


def _append(target: dict[Ref, list[Any]], ref: Ref, value: Any) -> None:
    values = target.setdefault(ref, [])
    if value not in values:
        values.append(value)


def _aggregated_column(node: exp.Expr) -> exp.Expr | None:
    """`x` in `AVG(x)` (a HAVING on an aggregate puts its literal near the column's values)."""
    if isinstance(node, exp.AggFunc) and isinstance(node.this, exp.Column):
        return node.this
    return None


def _unaliased(node: exp.Expr) -> exp.Expr:
    return node.this if isinstance(node, exp.Alias) else node


def _leftmost_select(node: exp.Expr | None) -> exp.Select | None:
    while isinstance(node, exp.SetOperation | exp.Subquery):
        node = node.this
    return node if isinstance(node, exp.Select) else None


def _first_selected(node: exp.Expr) -> exp.Expr | None:
    select = _leftmost_select(node)
    if select is None or not select.expressions:
        return None
    return _unaliased(select.expressions[0])


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
    if isinstance(text, bool):
        return int(text)
    if isinstance(text, int | float):
        return text if math.isfinite(text) else None
    if not isinstance(text, str) or len(text) > 40:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# -- values -------------------------------------------------------------------------------------------

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})")


def near_values(value: Any, kind: str) -> list[Any]:
    """Values on both sides of a literal, and the literal itself (the boundary of `>` vs `>=`)."""
    number = as_number(value)
    textual = kind in ("text", "date", "blob")
    if number is not None and not (textual and isinstance(value, str) and not value.strip().lstrip("-").isdigit()
                                   and as_number(value) is None):
        if isinstance(number, int):
            out: list[Any] = [number + d for d in (-9, -3, -1, 0, 1, 2, 5, 12)]
        else:
            out = [round(number + d, 2) for d in (-2.5, -0.5, 0.0, 0.5, 1.5, 4.0)]
        return [str(v) for v in out] if textual else out
    if not isinstance(value, str):
        return [value]
    date = _DATE.match(value)
    if date:
        try:
            day = datetime.date(int(date.group(1)), int(date.group(2)), int(date.group(3)))
        except ValueError:
            return [value]
        rest = value[10:]
        return [str(day + datetime.timedelta(days=d)) + rest for d in (-400, -31, -1, 0, 1, 31, 400)]
    out = [value, value + " b"]
    if len(value) > 1:
        out.append(value[:-1])
    out.append("a " + value)
    return out


def pattern_values(pattern: str) -> list[str]:
    """Strings that match a LIKE pattern in different ways, and near misses."""
    core = pattern.replace("%", "").replace("_", "x")
    filled = pattern.replace("_", "x")
    out = [core, filled.replace("%", "", 1).replace("%", " side"), filled.replace("%", "North ", 1).replace("%", ""),
           filled.replace("%", "Old ")]
    if len(core) > 1:
        out += [core[:-1], core[1:]]
    return list(dict.fromkeys(v for v in out if v))


def background(kind: str, stem: str, numbers: Sequence[float], rng: random.Random, numeric_text: bool = False,
               narrow: bool = False) -> Any:
    """A value from the column's wide range: around the gold's numbers when it compares the column with any;
    numbers in a text column too with `numeric_text` (or when the gold compares it with numbers); from
    10 to 40 with `narrow` (then sums follow the number of rows, averages do not)."""
    numeric = kind in ("integer", "numeric", "real")
    if numeric or ((numbers or numeric_text) and kind in ("text", "blob", "date")):
        if narrow:
            low, high = 10.0, 40.0
        elif numbers:
            lo, hi = min(numbers), max(numbers)
            span = max(hi - lo, abs(hi) / 2, 10)
            low, high = lo - span, hi + span
        else:
            low, high = 1, 999
        if kind == "real" or any(not n.is_integer() for n in numbers):
            number: Any = round(rng.uniform(low, high), 2)
        else:
            number = rng.randint(math.floor(low), math.ceil(high))
        return number if numeric else str(number)
    if kind == "date":
        return f"{rng.randint(1990, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return f"{stem} {rng.randint(1, 999)}"


def stem_of(name: str) -> str:
    return re.sub(r"\W+", " ", name).strip() or "value"


def primary_key_like(table: Table) -> str | None:
    """The lower-case name of the column that looks like the table's own key, or None: a column named
    `id`; else a column named `<table>_id`/`<table>_code` (the table's name may be plural: `Template_ID`
    in `Templates`, `AirportCode` in `airports`); else the first column when it is `code`, or an
    abbreviation of up to 4 letters of the table's name (`StuID` in `Student`). Not `CountryCode` in
    `countrylanguage` (another table's key), nor `concert_ID` in `singer_in_concert`."""
    t = table.name.lower()
    names = [c.name.lower() for c in table.columns]
    if "id" in names:
        return "id"
    for position, name in enumerate(names):
        match = re.fullmatch(r"(.*?)_?(id|code)", name)
        if match is None:
            continue
        stem = match.group(1)
        plurals = {stem, stem + "s", stem + "es", stem[:-1] + "ies" if stem.endswith("y") else stem}
        if stem and t in plurals:
            return name
        if position == 0 and (not stem or (len(stem) <= 4 and t.startswith(stem))):
            return name
    return None


def id_like(name: str) -> bool:
    return re.fullmatch(r".*(id|code)", name.lower()) is not None


# -- the plan: what every database of the example shares ---------------------------------------------


@dataclass
class ColumnPlan:
    column: Column
    ref: Ref
    stem: str = "value"
    group: str | None = None  # key group (its representative), when the column is a key
    primary: bool = False
    pooled: bool = False  # small skewed pool
    duplicated: bool = False  # most values from a small pool
    counted: bool = False  # under COUNT(x): more NULLs
    numeric_text: bool = False  # numbers even if the column is TEXT
    ordered: bool = False
    numbers: list[float] = field(default_factory=list)  # the gold's numbers for this column
    candidates: list[Any] = field(default_factory=list)


@dataclass
class FilterPlan:
    conjuncts: tuple[Conjunct, ...]
    sat: dict[int, list[int]]  # conjunct index -> candidate indices that satisfy it (single-column ones)
    unsat: dict[int, list[int]]  # ... that do not (false or NULL)


@dataclass
class TablePlan:
    table: Table
    columns: list[ColumnPlan]
    filters: list[FilterPlan]


@dataclass
class GroupPlan:
    kind: str  # "integer" or "text"
    stem: str
    literals: list[Any]


@dataclass
class Plan:
    tables: list[TablePlan]
    groups: dict[str, GroupPlan]


def plan(tables: Sequence[Table], profile: Profile, rng: random.Random, evaluate: Evaluate) -> Plan:
    """The example's column roles, key groups and each local conjunct's satisfying candidates."""
    refs: list[Ref] = [(t.name.lower(), c.name.lower()) for t in tables for c in t.columns]
    known = set(refs)
    parent: dict[Ref, Ref] = {r: r for r in refs}

    def find(r: Ref) -> Ref:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    def union(a: Ref, b: Ref) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    linked: set[Ref] = set()
    for a, b in profile.links:
        if a in known and b in known and a != b:
            union(a, b)
            linked.update((a, b))
    by_name: dict[str, list[Ref]] = {}
    for r in refs:
        if id_like(r[1]):
            by_name.setdefault(r[1], []).append(r)
    for same in by_name.values():
        for other in same[1:]:
            union(same[0], other)
            linked.update((same[0], other))
    primaries = {(t.name.lower(), pk) for t in tables if (pk := primary_key_like(t)) is not None}
    members: dict[Ref, list[Ref]] = {}
    for r in refs:
        members.setdefault(find(r), []).append(r)
    kinds = {(t.name.lower(), c.name.lower()): c.kind for t in tables for c in t.columns}
    groups: dict[str, GroupPlan] = {}
    group_of: dict[Ref, str] = {}
    for root, group in members.items():
        if len(group) < 2 and root not in primaries and root not in linked:
            continue
        name = f"{root[0]}.{root[1]}"
        literals: list[Any] = []
        for r in group:
            for v in profile.literals.get(r, []):
                if v not in literals:
                    literals.append(v)
        numeric = any(kinds[r] in ("integer", "numeric", "real") for r in group) and all(
            as_number(v) is not None for v in literals)
        groups[name] = GroupPlan("integer" if numeric else "text", stem_of(group[0][1]), literals)
        for r in group:
            group_of[r] = name
    table_plans = []
    for t in tables:
        columns = []
        for c in t.columns:
            ref = (t.name.lower(), c.name.lower())
            literals = profile.literals.get(ref, [])
            numbers = [float(n) for n in (as_number(v) for v in literals) if n is not None]
            cp = ColumnPlan(c, ref, stem_of(c.name), group_of.get(ref), ref in primaries,
                            pooled=ref in profile.grouped and ref not in profile.ordered,
                            duplicated=ref in profile.distinct, numeric_text=ref in profile.summed,
                            counted=ref in profile.counted,
                            ordered=ref in profile.ordered, numbers=numbers)
            candidates: list[Any] = []
            for v in literals:
                candidates += near_values(v, c.kind)
            for p in profile.patterns.get(ref, []):
                candidates += pattern_values(p)
            if candidates:
                candidates += [background(c.kind, cp.stem, numbers, rng, cp.numeric_text) for _ in range(3)]
                candidates.append(None)
            cp.candidates = list(dict.fromkeys(candidates))[:MAX_CANDIDATES]
            columns.append(cp)
        filters = [_filter_plan(t, columns, f, evaluate) for f in profile.filters if f.table == t.name.lower()]
        table_plans.append(TablePlan(t, columns, filters))
    return Plan(table_plans, groups)


def _filter_plan(table: Table, columns: list[ColumnPlan], f: Filter, evaluate: Evaluate) -> FilterPlan:
    """Which candidates satisfy each single-column conjunct, as SQLite decides on a one-table database."""
    sat: dict[int, list[int]] = {}
    unsat: dict[int, list[int]] = {}
    by_name = {cp.ref[1]: (i, cp) for i, cp in enumerate(columns)}
    conn = sqlite3.connect(":memory:")
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)
    try:
        defs = ", ".join(f"{quote(c.name)} {c.declared}".strip() for c in table.columns)
        conn.execute(f"CREATE TABLE {quote(table.name)} ({defs})")
        for j, conjunct in enumerate(f.conjuncts):
            if len(conjunct.columns) != 1 or conjunct.columns[0] not in by_name:
                continue
            index, cp = by_name[conjunct.columns[0]]
            if not cp.candidates:
                continue
            conn.execute(f"DELETE FROM {quote(table.name)}")
            rows = [[None] * len(table.columns) for _ in cp.candidates]
            for row, value in zip(rows, cp.candidates, strict=True):
                row[index] = value
            marks = ", ".join("?" for _ in table.columns)
            conn.executemany(f"INSERT INTO {quote(table.name)} VALUES ({marks})", rows)
            lock_down(conn)
            try:
                truth = evaluate(conn, f"SELECT ({conjunct.sql}) FROM {quote(table.name)} ORDER BY rowid")
            except Exception:  # noqa: BLE001 - an unreadable conjunct only loses its targeting
                unlock(conn)
                continue
            unlock(conn)
            if len(truth) != len(cp.candidates):
                continue
            sat[j] = [k for k, (t,) in enumerate(truth) if t is not None and t != 0 and t != "0"]
            unsat[j] = [k for k, (t,) in enumerate(truth) if not (t is not None and t != 0 and t != "0")]
    finally:
        conn.close()
    return FilterPlan(f.conjuncts, sat, unsat)


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def _read_only(action: int, *_: Any) -> int:
    """Authorizer: reading tables and calling functions only (no writes, ATTACH, PRAGMA...)."""
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def lock_down(conn: sqlite3.Connection) -> None:
    conn.set_authorizer(_read_only)


def unlock(conn: sqlite3.Connection) -> None:
    conn.set_authorizer(None)


# -- one database --------------------------------------------------------------------------------------

ALL, MISS, EVERY, HOT, FREE = "all", "miss", "every", "hot", "free"


@dataclass(frozen=True)
class Mode:
    kind: str
    filter: int = -1
    conjunct: int = -1


@dataclass(frozen=True)
class Variant:
    """How one database of the suite differs: its table sizes, duplicates, NULLs, hot key count."""

    index: int
    duplicates: bool
    nulls: bool
    tiny: bool
    """A few rows per table: one matching row, or none; equal values after a duplicate."""
    sizes: tuple[int, ...]
    """Table sizes to draw from when tiny."""
    constant: bool
    """Every row of a table a copy of one (but its primary key): all values alike."""
    narrow: bool
    hot: int
    """Hot keys (2 or 3)."""
    hot_share: float
    """Share of the free rows of a table without conditions that take hot keys."""

    @property
    def pattern(self) -> bool:
        """Whether rows meant to match take hot keys in a pattern (even databases) or at random."""
        return self.index % 2 == 0


VARIANTS = ("base", "duplicates", "nulls", "tiny", "duplicates nulls", "narrow", "base", "small")
"""What database `index` of a suite is, by `index % 8`: "tiny" has 1 to 3 rows per table, with duplicates;
"small" 2 or 3 rows per table, all alike but their primary keys (MIN = MAX, nothing below the average);
"narrow" draws the
columns under AVG and SUM from 10 to 40, and the free rows' keys from 4 values (a few large groups: sums
follow group sizes, averages do not)."""


def is_tiny(index: int) -> bool:
    """Whether database `index` of a suite has only a few rows per table."""
    return VARIANTS[index % len(VARIANTS)] in ("tiny", "small")


def variant(index: int, rng: random.Random) -> Variant:
    kind = VARIANTS[index % len(VARIANTS)]
    return Variant(index, duplicates="duplicates" in kind or kind in ("tiny", "small"), nulls="nulls" in kind,
                   tiny=kind in ("tiny", "small"), sizes=(2, 3) if kind == "small" else (1, 2, 2, 3),
                   constant=kind == "small",
                   narrow=kind == "narrow",
                   hot=3 if index % 2 == 0 else rng.choice((2, 3)), hot_share=0.5 if index % 2 == 0 else 0.2)


def build(the_plan: Plan, index: int, rows: int, seed: int) -> dict[str, list[list[Any]]]:
    """Database `index` of the suite: rows per table (lower-case name), in insertion order."""
    rng = random.Random(f"{seed}:{index}")
    v = variant(index, rng)
    pools = _group_pools(the_plan, rows, rng)
    hot = {name: pool[:v.hot] for name, pool in pools.items()}
    data: dict[str, list[list[Any]]] = {}
    for tp in the_plan.tables:
        if index == 0:
            size = rows
        elif v.tiny:
            size = min(rows, rng.choice(v.sizes))
        else:
            size = rng.randint(max(min(rows, 6), rows // 2), rows)
        data[tp.table.name.lower()] = _table_rows(tp, size, v, pools, hot, rng)
    return data


def _group_pools(the_plan: Plan, rows: int, rng: random.Random) -> dict[str, list[Any]]:
    pools = {}
    size = rows + 5
    for name, g in the_plan.groups.items():
        pool: list[Any] = list(g.literals)
        if g.kind == "integer":
            numbers = [n for n in (as_number(v) for v in g.literals) if n is not None]
            base = int(min(numbers)) if numbers else 1
            taken = set(pool)
            for n in rng.sample(range(base + 1, base + 1 + 20 * size), size):
                if n not in taken:
                    pool.append(n)
        else:
            taken = set(pool)
            for n in rng.sample(range(1, 20 * size), size):
                value = f"{g.stem} {n}"
                if value not in taken:
                    pool.append(value)
        pools[name] = pool[:max(size, len(g.literals))]
    return pools


def _schedule(tp: TablePlan, size: int, v: Variant, rng: random.Random) -> list[Mode]:
    """The modes of a table's rows: per filter 2 or 3 ALL rows and 1 or 2 MISS rows per conjunct (3 and 2
    in the patterned databases), 2 EVERY rows when the table has several filters, the rest HOT or FREE.
    When they do not all fit (a tenth of the rows stays free; a one-row table's row is an ALL row), the first ones win: two ALL rows of each filter, one
    MISS row of each conjunct, one EVERY row, then the third ALL rows, the second MISS and EVERY rows."""
    first: list[Mode] = []
    second: list[Mode] = []
    for fi, fp in enumerate(tp.filters):
        first += [Mode(ALL, fi)] * 2
        second += [Mode(ALL, fi)] * (1 if v.pattern or rng.random() < 0.5 else 0)
    for fi, fp in enumerate(tp.filters):
        for j in range(len(fp.conjuncts)):
            first.append(Mode(MISS, fi, j))
            second += [Mode(MISS, fi, j)] * (1 if v.pattern or rng.random() < 1 / 3 else 0)
    if len(tp.filters) > 1:
        first.append(Mode(EVERY))
        second.append(Mode(EVERY))
    room = (size if size <= 1 else size - max(1, size // 10)) if tp.filters else 0
    modes = (first + second)[:max(0, room)]
    free = size - len(modes)
    hot = round(free * HOT_SHARE) if tp.filters else max(1, round(free * v.hot_share))
    modes += [Mode(HOT)] * hot + [Mode(FREE)] * (free - hot)
    rng.shuffle(modes)
    return modes


def _table_rows(tp: TablePlan, size: int, v: Variant, pools: dict[str, list[Any]], hot: dict[str, list[Any]],
                rng: random.Random) -> list[list[Any]]:
    modes = _schedule(tp, size, v, rng)
    local_pools: dict[int, tuple[list[Any], list[float]]] = {}
    skewed: dict[int, list[Any]] = {}
    used: dict[int, set[Any]] = {}
    rows: list[list[Any]] = []
    driven: list[set[int]] = []  # per row: the columns set by its conditions
    seen: Counter[Mode] = Counter()
    for mode in modes:
        # In even databases the rows of a mode take hot keys in a pattern: two rows of a mode share a key
        # (two matching rows in one group), and filter i's rows take hot keys i and i + 1: one filter's
        # rows meet another's on some keys, not all (INTERSECT, EXCEPT); rows meant to satisfy every
        # filter take key 1, which filters 0 and 1 share. Conjunct j's first violator takes key i + j + 1
        # (it meets matching rows), its second key i + j + 2 (a key with violators only). In odd
        # databases at random.
        nth = seen[mode]
        seen[mode] += 1
        row: list[Any] = []
        set_by_filter: set[int] = set()
        for ci, cp in enumerate(tp.columns):
            choice = _by_conditions(tp, ci, mode, rng, used.setdefault(ci, set()))
            if choice is not _NONE:
                row.append(choice)
                set_by_filter.add(ci)
            elif cp.group is not None and not cp.primary:
                keys = hot[cp.group]
                if mode.kind != FREE and v.pattern and mode.kind != HOT:
                    if mode.kind == MISS:
                        index = mode.filter + mode.conjunct + 1 + min(nth, 1)
                    else:
                        index = (1 if mode.kind == EVERY else mode.filter) + nth // 2
                    row.append(keys[index % len(keys)])
                elif mode.kind != FREE and rng.random() < HOT_KEYS:
                    row.append(rng.choice(keys))
                else:
                    if ci not in skewed:  # Zipf over the pool, in an order of this table's own
                        order = list(pools[cp.group])
                        rng.shuffle(order)
                        skewed[ci] = order[:4] if v.narrow else order  # narrow: a few large groups
                    row.append(rng.choices(skewed[ci], ZIPF[:len(skewed[ci])])[0])
            elif cp.group is not None:
                row.append(None)  # primary keys are assigned below, distinct
            elif cp.pooled or (cp.duplicated and rng.random() < 0.7):
                if ci not in local_pools:
                    g = rng.choice((2, 3, 4, 5, 8, 12) if cp.pooled else (2, 3))
                    values = list(dict.fromkeys(background(cp.column.kind, cp.stem, cp.numbers, rng, cp.numeric_text)
                                                for _ in range(g)))
                    weights = list(SKEW[:len(values)]) if len(values) <= len(SKEW) else [1.0] * len(values)
                    local_pools[ci] = (values, weights)
                values, weights = local_pools[ci]
                row.append(rng.choices(values, weights)[0])
            else:
                row.append(background(cp.column.kind, cp.stem, cp.numbers, rng, cp.numeric_text,
                                      v.narrow and cp.numeric_text))
        rows.append(row)
        driven.append(set_by_filter)
    _assign_primary_keys(tp, rows, modes, driven, pools, hot, rng)
    if v.duplicates:
        _duplicate(tp, rows, modes, rng, constant=v.constant)
    if v.nulls:
        for row, by in zip(rows, driven, strict=True):
            for ci, cp in enumerate(tp.columns):
                share = COUNTED_NULL_SHARE if cp.counted else NULL_SHARE
                if ci not in by and cp.group is None and not cp.ordered and rng.random() < share:
                    row[ci] = None
    return rows


_NONE = object()


def _by_conditions(tp: TablePlan, ci: int, mode: Mode, rng: random.Random, used: set[Any]) -> Any:
    """The value of column `ci` that the row's mode asks for, or _NONE when its conditions leave it free."""
    cp = tp.columns[ci]
    if not cp.candidates or mode.kind in (HOT, FREE):
        return _NONE
    name = cp.ref[1]
    wanted: list[int] | None = None
    filters = range(len(tp.filters)) if mode.kind == EVERY else [mode.filter]
    for fi in filters:
        fp = tp.filters[fi]
        for j, conjunct in enumerate(fp.conjuncts):
            if conjunct.columns != (name,) or j not in fp.sat:
                continue
            ok = fp.unsat[j] if mode.kind == MISS and j == mode.conjunct else fp.sat[j]
            narrowed = ok if wanted is None else [k for k in wanted if k in ok]
            if narrowed or wanted is None:
                wanted = narrowed
    if wanted is None:
        # Columns of multi-column conjuncts: a candidate at random (SQLite sorts out which rows match).
        if mode.kind == MISS and any(name in c.columns for c in tp.filters[mode.filter].conjuncts):
            return rng.choice(cp.candidates)
        if mode.kind in (ALL, EVERY) and any(name in c.columns for fi in filters for c in tp.filters[fi].conjuncts):
            return rng.choice(cp.candidates)
        return _NONE
    if not wanted:
        return _NONE
    if mode.kind != EVERY:
        # Rather not meet another filter of the table by accident (a violator of `= 'French'` that is
        # 'English' would match `= 'English'`): those rows belong to EVERY.
        others = {k for fi, fp in enumerate(tp.filters) if fi != mode.filter
                  for j, conjunct in enumerate(fp.conjuncts) if conjunct.columns == (name,) and j in fp.sat
                  for k in fp.sat[j]}
        wanted = [k for k in wanted if k not in others] or wanted
    fresh = [k for k in wanted if cp.candidates[k] not in used]
    value = cp.candidates[rng.choice(fresh or wanted)]
    used.add(value)
    return value


def _assign_primary_keys(tp: TablePlan, rows: list[list[Any]], modes: Sequence[Mode], driven: Sequence[set[int]],
                         pools: dict[str, list[Any]], hot: dict[str, list[Any]], rng: random.Random) -> None:
    """Distinct values in the table's key column: hot values first to the rows meant to match."""
    for ci, cp in enumerate(tp.columns):
        if cp.group is None or not cp.primary:
            continue
        pool = pools[cp.group]
        taken = {row[ci] for row, by in zip(rows, driven, strict=True) if ci in by}
        spare = [x for x in pool if x not in taken]
        rng.shuffle(spare)
        hot_left = [x for x in hot[cp.group] if x not in taken]
        # Hot keys go to one row of each mode before a second of any (a matching row and a violating one
        # both find partners), free rows last.
        nth: list[int] = []
        counts: Counter[Mode] = Counter()
        for mode in modes:
            nth.append(counts[mode])
            counts[mode] += 1
        priority = {ALL: 0, EVERY: 1, MISS: 2, HOT: 3, FREE: 4}
        order = sorted(range(len(rows)), key=lambda i: (modes[i].kind == FREE, nth[i], priority[modes[i].kind]))
        seen: set[Any] = set()
        for i in order:
            if ci in driven[i] and rows[i][ci] not in seen:
                seen.add(rows[i][ci])
                continue
            if modes[i].kind != FREE and hot_left:
                value = hot_left.pop(0)
            elif spare:
                value = spare.pop()
            else:
                value = len(rows) + i + len(pool) + 1_000_000  # out of the pool: only when it runs out
            rows[i][ci] = value
            seen.add(value)
            if value in spare:
                spare.remove(value)


def _duplicate(tp: TablePlan, rows: list[list[Any]], modes: Sequence[Mode], rng: random.Random,
               constant: bool = False) -> None:
    """Copy two or three rows (those meant to match first) over free rows; with `constant`, one row over
    every other (all rows alike). A primary key stays distinct."""
    original = [list(row) for row in rows]
    targets = [i for i, m in enumerate(modes) if m.kind in (FREE, HOT)]
    sources = [i for i, m in enumerate(modes) if m.kind in (ALL, EVERY)] or targets
    if constant:
        source = sources[0] if sources else 0
        pairs = [(i, source) for i in range(len(rows)) if i != source]
    else:
        count = min(len(targets) - (sources is targets), rng.choice((2, 3)))
        chosen = rng.sample(targets, max(0, count))
        pairs = [(target, rng.choice([i for i in sources if i != target])) for target in chosen]
    for target, source in pairs:
        for ci, cp in enumerate(tp.columns):
            if not cp.primary:
                rows[target][ci] = original[source][ci]


def fill(conn: sqlite3.Connection, tables: Iterable[Table], data: dict[str, list[list[Any]]],
         reverse: bool = False) -> None:
    """Create the tables in `conn` and insert the rows (in reverse order with `reverse`)."""
    for table in tables:
        defs = ", ".join(f"{quote(c.name)} {c.declared}".strip() for c in table.columns)
        conn.execute(f"CREATE TABLE {quote(table.name)} ({defs})")
        rows = data[table.name.lower()]
        marks = ", ".join("?" for _ in table.columns)
        conn.executemany(f"INSERT INTO {quote(table.name)} VALUES ({marks})", rows[::-1] if reverse else rows)
    conn.commit()
