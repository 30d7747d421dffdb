"""Scorer truth for `sqlExecution`: can the scorer tell right queries from wrong ones on real Spider golds?

From each gold query of ../shared/datasets/spider/dev-part.jsonl (603 questions over 10 databases) this
builds, with sqlglot AST transforms, where the transform applies:
  (a) the gold itself and equivalent rewrites, which must all score correct (100%):
      keywordCase   keywords upper <-> lower case (sqlglot's tokens; strings and names untouched)
      whitespace    every gap between tokens re-spaced (newlines, tabs, runs), spaces added around , = ( )
      andOrder      the operands of the first AND swapped (a WHERE's first, else one in an ON)
      aliasRename   table aliases renamed everywhere (only when no new or old name is a table's name)
      reformatted   the query as sqlglot writes it back, pretty-printed;
  (b) wrong variants, which must score correct at most 1% of the time:
      whereRemoved  the first WHERE (breadth first: the outer query's when it has one) removed
      aggSwapped    the first aggregate that can swap: AVG<->SUM, MIN<->MAX (not when the WHERE pins its
                    column to one literal: then MIN = MAX), COUNT(x) -> SUM(x), COUNT(DISTINCT x) ->
                    COUNT(x); COUNT(*) is skipped
      limitRemoved  the outer LIMIT removed (not when the outer query is an aggregate without GROUP BY,
                    which returns one row anyway)
      columnChanged the first column of the outer SELECT list replaced by another column of its table
                    (one of the same kind, numeric or not, where there is one; chosen by a seed)
      joinDropped   the first JOIN's ON removed (a cross join), else the first WHERE conjunct equating
                    columns of two tables;
  (c) dropped golds: the examples the scorer drops when the gold is scored against itself, which must be
      at most 5% of the golds. The new scorer drops a gold that fails to execute or is stopped by a guard
      on any database (`gold fails to execute`), that returns no rows or only NULLs on every database of
      its suite (`gold result empty on every database`), or whose result depends on the order the rows are
      stored in on every database tried (`gold result depends on row order`); and an example whose
      context does not parse or whose tables cannot be built. The old scorer (one database) also dropped
      golds returning a whole table and golds whose WHERE kept every generated row.
Rates are over the examples the scorer kept (a variant of a dropped gold is not counted); variants that
fail to execute (an error, not a different result) are counted apart in `errors`: they are wrong, but
caught without the data's help.

The same variants are scored by the OLD scorer (one synthetic database per example) loaded from git at
BASELINE_REF, in this process, and by the new one through `scorers.score` (the sandbox), in the same run.
Prints the table and writes bench/results/sql_scorer_truth.json.

    .venv/bin/python bench/sql_scorer_truth.py                # everything (a few minutes on 2 cores)
    .venv/bin/python bench/sql_scorer_truth.py --limit 100    # the first 100 golds
    .venv/bin/python bench/sql_scorer_truth.py --no-baseline  # the new scorer only
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

from kubetune.serving import sqlexec
from kubetune.serving.scorers import score

ROOT = Path(__file__).resolve().parents[1]
SPIDER = ROOT.parent / "shared" / "datasets" / "spider" / "dev-part.jsonl"
RESULTS = ROOT / "bench" / "results" / "sql_scorer_truth.json"
BASELINE_REF = "429a49c"
"""The last commit with the single-database scorer (serving/kubetune/serving/sqlexec.py there)."""
BASELINE_PATH = "serving/kubetune/serving/sqlexec.py"

EQUIVALENT = ("gold", "keywordCase", "whitespace", "andOrder", "aliasRename", "reformatted")
WRONG = ("whereRemoved", "aggSwapped", "limitRemoved", "columnChanged", "joinDropped")
TARGETS = {"equivalent": 1.0, "wrong": 0.01, "dropped": 0.05}

Schema = dict[str, list[tuple[str, str]]]  # table (lower) -> [(column, declared type)]


# -- variants ------------------------------------------------------------------------------------------


def parse(sql: str) -> exp.Expr:
    return sqlglot.parse_one(sql.strip().rstrip(";"), read="sqlite")


def write(tree: exp.Expr, pretty: bool = False) -> str:
    return tree.sql(dialect="sqlite", pretty=pretty)


def tokens(sql: str) -> list[Any]:
    return list(sqlglot.Dialect.get_or_raise("sqlite").tokenize(sql))


_KEYWORDS = sqlglot.Dialect.get_or_raise("sqlite").tokenizer_class.KEYWORDS
_TEXTUAL = {TokenType.STRING, TokenType.IDENTIFIER, TokenType.VAR, TokenType.NUMBER}


def keyword_case(sql: str, rng: random.Random) -> str | None:
    out, last = [], 0
    changed = False
    for tok in tokens(sql):
        if tok.token_type in _TEXTUAL or not tok.text.isalpha() or tok.text.upper() not in _KEYWORDS:
            continue
        text = sql[tok.start:tok.end + 1]
        flipped = text.lower() if text.isupper() else text.upper()
        out += [sql[last:tok.start], flipped]
        last = tok.end + 1
        changed = changed or flipped != text
    out.append(sql[last:])
    return "".join(out) if changed else None


def whitespace(sql: str, rng: random.Random) -> str | None:
    toks = tokens(sql)
    if len(toks) < 2:
        return None
    out = [sql[:toks[0].end + 1]]
    for prev, tok in itertools.pairwise(toks):
        gap = sql[prev.end + 1:tok.start]
        if gap.strip():
            out.append(gap)  # a comment: keep it
        elif gap:
            out.append(rng.choice(["\n", "  ", "\t", " \n   ", "   "]))
        elif {prev.text, tok.text} & {",", "=", "(", ")"} and "." not in (prev.text, tok.text):
            out.append(rng.choice(["", " ", "  "]))
        out.append(sql[tok.start:tok.end + 1])
    return "".join(out) + sql[toks[-1].end + 1:]


def and_order(tree: exp.Expr) -> str | None:
    where_ands = [w.this for w in tree.find_all(exp.Where, bfs=True) if isinstance(w.this, exp.And)]
    node = where_ands[0] if where_ands else tree.find(exp.And, bfs=True)
    if node is None:
        return None
    left, right = node.this, node.expression
    node.set("this", right.copy())
    node.set("expression", left.copy())
    return write(tree)


def alias_rename(tree: exp.Expr, schema: Schema) -> str | None:
    aliases = [a for a in tree.find_all(exp.TableAlias) if isinstance(a.parent, exp.Table | exp.Subquery) and a.name]
    names = list(dict.fromkeys(a.name.lower() for a in aliases))
    if not names:
        return None
    new = {old: f"src_{i + 1}" for i, old in enumerate(names)}
    if set(names) & set(schema) or set(new.values()) & set(schema):
        return None
    if any(c.lower() in new.values() for cols in schema.values() for c, _ in cols):
        return None

    def rename(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.TableAlias) and node.name.lower() in new and isinstance(
                node.parent, exp.Table | exp.Subquery):
            node.set("this", exp.to_identifier(new[node.name.lower()]))
        elif isinstance(node, exp.Column) and node.table and node.table.lower() in new:
            node.set("table", exp.to_identifier(new[node.table.lower()]))
        return node

    return write(tree.transform(rename))


def where_removed(tree: exp.Expr) -> str | None:
    select = next((s for s in tree.find_all(exp.Select, bfs=True) if s.args.get("where") is not None), None)
    if select is None:
        return None
    select.set("where", None)
    return write(tree)


_SWAPS: dict[type[exp.Expr], type[exp.Expr]] = {exp.Avg: exp.Sum, exp.Sum: exp.Avg, exp.Min: exp.Max,
                                                exp.Max: exp.Min}


def agg_swapped(tree: exp.Expr) -> str | None:
    for agg in tree.find_all(exp.AggFunc, bfs=True):
        arg = agg.this
        if type(agg) in _SWAPS:
            if isinstance(agg, exp.Min | exp.Max) and _pinned(agg):
                continue
            agg.replace(_SWAPS[type(agg)](this=arg.copy()))
            return write(tree)
        if isinstance(agg, exp.Count):
            if isinstance(arg, exp.Distinct):
                agg.replace(exp.Count(this=arg.expressions[0].copy()))
                return write(tree)
            if isinstance(arg, exp.Column):
                agg.replace(exp.Sum(this=arg.copy()))
                return write(tree)
    return None


def _pinned(agg: exp.Expr) -> bool:
    """MIN(x)/MAX(x) where the enclosing WHERE has `x = literal`: one value, MIN = MAX."""
    select = agg.find_ancestor(exp.Select)
    column = agg.this
    if select is None or not isinstance(column, exp.Column) or select.args.get("where") is None:
        return False
    for eq in select.args["where"].find_all(exp.EQ):
        for a, b in ((eq.this, eq.expression), (eq.expression, eq.this)):
            if isinstance(a, exp.Column) and a.name.lower() == column.name.lower() and isinstance(b, exp.Literal):
                return True
    return False


def limit_removed(tree: exp.Expr) -> str | None:
    if tree.args.get("limit") is None:
        return None
    if isinstance(tree, exp.Select) and not tree.args.get("group") and any(
            e.find(exp.AggFunc) for e in tree.expressions):
        return None
    tree.set("limit", None)
    return write(tree)


def column_changed(tree: exp.Expr, schema: Schema, rng: random.Random) -> str | None:
    select = tree
    while isinstance(select, exp.SetOperation):
        select = select.this
    if not isinstance(select, exp.Select):
        return None
    sources = {}
    for table in select.find_all(exp.Table):
        if table.find_ancestor(exp.Select) is select and table.name.lower() in schema:
            sources[table.alias_or_name.lower()] = table.name.lower()
    for expression in select.expressions:
        column = next(expression.find_all(exp.Column), None) if not isinstance(expression, exp.Column) \
            else expression
        if column is None or isinstance(column.this, exp.Star):
            continue
        name = column.name.lower()
        table = sources.get(column.table.lower()) if column.table else next(
            (t for t in sources.values() if name in {c.lower() for c, _ in schema[t]}), None)
        if table is None:
            return None
        kind = _numeric({c.lower(): d for c, d in schema[table]}.get(name, ""))
        others = [c for c, _ in schema[table] if c.lower() != name]
        same_kind = [c for c, d in schema[table] if c.lower() != name and _numeric(d) == kind]
        if not others:
            return None
        column.set("this", exp.to_identifier(rng.choice(same_kind or others)))
        return write(tree)
    return None


def _numeric(declared: str) -> bool:
    return bool(re.search(r"(?i)int|real|float|double|num|dec", declared))


def join_dropped(tree: exp.Expr) -> str | None:
    join = next((j for j in tree.find_all(exp.Join, bfs=True)
                 if j.args.get("on") is not None and not isinstance(j.args["on"], exp.Boolean)), None)
    if join is not None:
        join.set("on", None)
        return write(tree)
    for where in tree.find_all(exp.Where, bfs=True):
        parts = list(_conjuncts(where.this))
        for part in parts:
            if isinstance(part, exp.EQ) and isinstance(part.this, exp.Column) and isinstance(
                    part.expression, exp.Column) and part.this.table.lower() != part.expression.table.lower():
                rest = [p.copy() for p in parts if p is not part]
                where.parent.set("where", exp.Where(this=exp.and_(*rest)) if rest else None)
                return write(tree)
    return None


def _conjuncts(node: exp.Expr) -> list[exp.Expr]:
    if isinstance(node, exp.And):
        return _conjuncts(node.this) + _conjuncts(node.expression)
    return [node]


def variants(gold: str, schema: Schema, seed: int) -> dict[str, str]:
    """{kind: query} for every kind that applies to `gold`."""
    rng = random.Random(seed)
    out: dict[str, str] = {"gold": gold}
    text_based: dict[str, Callable[[str, random.Random], str | None]] = {
        "keywordCase": keyword_case, "whitespace": whitespace}
    for kind, fn in text_based.items():
        value = fn(gold, rng)
        if value is not None:
            out[kind] = value
    tree_based: dict[str, Callable[[exp.Expr], str | None]] = {
        "andOrder": and_order,
        "aliasRename": lambda t: alias_rename(t, schema),
        "reformatted": lambda t: write(t, pretty=True),
        "whereRemoved": where_removed,
        "aggSwapped": agg_swapped,
        "limitRemoved": limit_removed,
        "columnChanged": lambda t: column_changed(t, schema, rng),
        "joinDropped": join_dropped,
    }
    for kind, transform in tree_based.items():
        try:
            value = transform(parse(gold))
        except (SqlglotError, RecursionError):
            value = None
        if value is not None:
            out[kind] = value
    return out


def schema_of(context: str) -> Schema:
    return {t.name.lower(): [(c.name, c.declared) for c in t.columns]
            for t in sqlexec.parse_context(context, "sqlite")}


# -- scoring -------------------------------------------------------------------------------------------


def load_baseline(ref: str) -> ModuleType | None:
    """The old scorer module from git at `ref`, or None (no git history here)."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{BASELINE_PATH}"], capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("sqlexec_baseline", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sqlexec_baseline"] = module
    exec(compile(source, f"{ref}:{BASELINE_PATH}", "exec"), module.__dict__)  # noqa: S102 - our own history
    return module


def score_new(cases: list[tuple[str, str, dict[str, Any]]], options: dict[str, str]) -> list[dict[str, Any]]:
    scored = score("sqlExecution", [p for p, _, _ in cases], [g for _, g, _ in cases], [r for _, _, r in cases],
                   options)
    return scored.per_example


def score_old(module: ModuleType, cases: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    settings = module.Settings()
    return [module.score_example(p, g, r["context"], settings) for p, g, r in cases]


def tally(kinds: list[str], entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(kinds):
        mine = [e for k, e in zip(kinds, entries, strict=True) if k == kind]
        kept = [e for e in mine if e["dropped"] is None]
        correct = sum(bool(e["correct"]) for e in kept)
        out[kind] = {"applicable": len(mine), "kept": len(kept), "correct": correct,
                     "rate": correct / len(kept) if kept else None,
                     "errors": sum(e["failure"] is not None for e in kept)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="the first N golds only (0: all)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git revision of the old scorer")
    parser.add_argument("--no-baseline", action="store_true", help="score with the new scorer only")
    parser.add_argument("--databases", type=int, default=sqlexec.Settings().databases)
    parser.add_argument("--rows", type=int, default=sqlexec.Settings().rows_per_table)
    parser.add_argument("--seed", type=int, default=0, help="the scorer's seed option (other databases)")
    parser.add_argument("--timeout", type=int, default=10,
                        help="timeoutSeconds per query (above the default 2: a shared, loaded machine must not "
                             "turn a millisecond query into a timeout; this measures results, not the guard)")
    parser.add_argument("--show", type=int, default=3, help="failures to print per kind")
    args = parser.parse_args()
    if not SPIDER.exists():
        raise SystemExit(f"{SPIDER} is absent: the benchmark needs the Spider golds (../shared/datasets/spider)")
    rows = [json.loads(line) for line in SPIDER.read_text().splitlines() if line.strip()]
    if args.limit:
        rows = rows[:args.limit]
    cases: list[tuple[str, str, dict[str, Any]]] = []
    kinds: list[str] = []
    origin: list[int] = []
    for i, row in enumerate(rows):
        for kind, query in variants(row["answer"], schema_of(row["context"]), i).items():
            cases.append((query, row["answer"], row))
            kinds.append(kind)
            origin.append(i)
    options = {"databases": str(args.databases), "rowsPerTable": str(args.rows), "seed": str(args.seed),
               "timeoutSeconds": str(args.timeout)}
    print(f"{len(rows)} golds, {len(cases)} queries to score ({dict(Counter(kinds))})", flush=True)
    started = time.monotonic()
    new = score_new(cases, options)
    new_seconds = time.monotonic() - started
    baseline = None if args.no_baseline else load_baseline(args.baseline_ref)
    old: list[dict[str, Any]] | None = None
    old_seconds = 0.0
    if baseline is not None:
        started = time.monotonic()
        old = score_old(baseline, cases)
        old_seconds = time.monotonic() - started
    elif not args.no_baseline:
        print(f"(the old scorer at {args.baseline_ref} is not in this checkout's history: new scorer only)")
    report = {"golds": len(rows), "queries": len(cases), "options": options,
              "new": {"seconds": round(new_seconds, 1), "kinds": tally(kinds, new), "dropped": dropped(kinds, new)}}
    if old is not None:
        report["old"] = {"ref": args.baseline_ref, "seconds": round(old_seconds, 1), "kinds": tally(kinds, old),
                         "dropped": dropped(kinds, old)}
    report["targets"] = verdict(report["new"])
    report["failures"] = failures(kinds, cases, new, args.show)
    print_table(report)
    for kind, shown in report["failures"].items():
        for case in shown:
            print(f"  {kind}: {case['query']}\n      gold: {case['gold']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


def dropped(kinds: list[str], entries: list[dict[str, Any]]) -> dict[str, Any]:
    golds = [e for k, e in zip(kinds, entries, strict=True) if k == "gold"]
    reasons = Counter(str(e["dropped"]) for e in golds if e["dropped"] is not None)
    total = sum(reasons.values())
    return {"golds": len(golds), "dropped": total, "rate": total / len(golds) if golds else None,
            "reasons": dict(reasons.most_common())}


def verdict(side: dict[str, Any]) -> dict[str, Any]:
    kinds = side["kinds"]
    equivalent = [k for k in EQUIVALENT if k in kinds]
    wrong = [k for k in WRONG if k in kinds]
    return {
        "equivalentAll100": all(kinds[k]["rate"] == 1.0 for k in equivalent),
        "wrongAtMost1pct": all((kinds[k]["rate"] or 0.0) <= TARGETS["wrong"] for k in wrong),
        "droppedAtMost5pct": (side["dropped"]["rate"] or 0.0) <= TARGETS["dropped"],
    }


def failures(kinds: list[str], cases: list[tuple[str, str, dict[str, Any]]], entries: list[dict[str, Any]],
             show: int) -> dict[str, list[dict[str, str]]]:
    """A few queries the new scorer got wrong per kind (dataset text only, for diagnosis)."""
    out: dict[str, list[dict[str, str]]] = {}
    for kind, (query, gold, _), entry in zip(kinds, cases, entries, strict=True):
        if entry["dropped"] is not None:
            continue
        wrong = (kind in EQUIVALENT and not entry["correct"]) or (kind in WRONG and entry["correct"])
        if wrong and len(out.setdefault(kind, [])) < show:
            out[kind].append({"query": query, "gold": gold, "failure": str(entry["failure"])})
    return {k: v for k, v in out.items() if v}


def print_table(report: dict[str, Any]) -> None:
    sides = [s for s in ("old", "new") if s in report]
    header = f"{'kind':<16}{'applicable':>11}" + "".join(f"{s + ' correct':>22}{s + ' errors':>11}" for s in sides)
    print(header)
    print("-" * len(header))
    for group, names in (("(a) equivalent", EQUIVALENT), ("(b) wrong", WRONG)):
        print(group)
        for kind in names:
            first = report["new"]["kinds"].get(kind)
            if first is None:
                continue
            line = f"  {kind:<14}{first['applicable']:>11}"
            for side in sides:
                k = report[side]["kinds"][kind]
                rate = "-" if k["rate"] is None else f"{100 * k['rate']:.1f}%"
                line += f"{k['correct']:>9}/{k['kept']:<5} {rate:>6}{k['errors']:>11}"
            print(line)
    line = f"(c) dropped     {report['new']['dropped']['golds']:>11}"
    for side in sides:
        d = report[side]["dropped"]
        line += f"{d['dropped']:>9}/{d['golds']:<5} {100 * (d['rate'] or 0):>5.1f}%{'':>11}"
    print(line)
    for side in sides:
        print(f"{side}: {report[side]['seconds']} s; dropped: {report[side]['dropped']['reasons']}")
    print(f"targets (new): {report['targets']}")


if __name__ == "__main__":
    main()
