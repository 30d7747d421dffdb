"""The test-suite databases (`kubetune.serving.sqlfuzz`), as specifications of what they must hold for a
gold query: matching rows that separate aggregates, rows that make each conjunct matter, NULLs,
duplicates, keys with and without partners; the same databases in every process; bounded sizes.

The schemas and golds are Spider's (concert_singer, world_1, car_1; CC BY-SA 4.0), written out here.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlglot
from sqlglot import exp

from kubetune.serving import sqlexec, sqlfuzz
from kubetune.serving.scorers import check_options

REPO = Path(__file__).resolve().parents[2]
CONCERT = ("CREATE TABLE stadium (Stadium_ID INTEGER, Location TEXT, Name TEXT, Capacity INTEGER, Highest INTEGER, "
           "Lowest INTEGER, Average INTEGER); CREATE TABLE singer (Singer_ID INTEGER, Name TEXT, Country TEXT, "
           "Song_Name TEXT, Song_release_year TEXT, Age INTEGER, Is_male TEXT); CREATE TABLE concert (concert_ID "
           "INTEGER, concert_Name TEXT, Theme TEXT, Stadium_ID TEXT, Year TEXT); CREATE TABLE singer_in_concert "
           "(concert_ID INTEGER, Singer_ID TEXT)")
WORLD = ("CREATE TABLE country (Code TEXT, Name TEXT, Continent TEXT, Region TEXT, SurfaceArea INTEGER, IndepYear "
         "INTEGER, Population INTEGER, LifeExpectancy INTEGER, GovernmentForm TEXT); CREATE TABLE countrylanguage "
         "(CountryCode TEXT, Language TEXT, IsOfficial TEXT, Percentage INTEGER)")
CARS = ("CREATE TABLE cars_data (Id INTEGER, MPG TEXT, Cylinders INTEGER, Edispl INTEGER, Horsepower TEXT, "
        "Weight INTEGER, Accelerate INTEGER, Year INTEGER)")


class Suite:
    """The databases `build_suite` would make for (context, gold), as rows and as locked-down connections."""

    def __init__(self, context: str, gold: str, settings: sqlexec.Settings | None = None) -> None:
        self.settings = settings or sqlexec.Settings()
        self.tables = sqlexec.parse_context(context, self.settings.dialect)
        known = {c.name.lower() for t in self.tables for c in t.columns}
        self.gold = sqlexec.prepare(gold, self.settings.dialect, known)
        assert self.gold.tree is not None
        self.profile = sqlfuzz.analyze(self.gold.tree, self.tables)
        seed = sqlexec.example_seed(self.settings.seed, context, gold)
        plan = sqlfuzz.plan(self.tables, self.profile, random.Random(seed),
                            lambda c, q: sqlexec.run(c, q, self.settings))
        self.data = [sqlfuzz.build(plan, i, self.settings.rows_per_table, seed)
                     for i in range(self.settings.databases)]
        self.conns = [sqlexec.database(self.tables, d, self.settings) for d in self.data]

    def run(self, sql: str) -> list[list[tuple[Any, ...]]]:
        return [sqlexec.run(c, sql, self.settings) for c in self.conns]

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


@pytest.fixture
def suites() -> Any:
    made: list[Suite] = []

    def make(context: str, gold: str, **settings: Any) -> Suite:
        made.append(Suite(context, gold, sqlexec.Settings(**settings)))
        return made[-1]

    yield make
    for s in made:
        s.close()


def without_conjunct(gold: str, index: int) -> str:
    """`gold` with the `index`-th conjunct of its WHERE removed."""
    tree = sqlglot.parse_one(gold, read="sqlite")
    where = tree.args["where"]
    parts = list(sqlfuzz.split_conjuncts(where.this))
    rest = [p.copy() for k, p in enumerate(parts) if k != index]
    tree.set("where", exp.Where(this=exp.and_(*rest)) if rest else None)
    return tree.sql(dialect="sqlite")


# -- aggregates -------------------------------------------------------------------------------------------


def test_every_database_but_the_tiny_ones_has_two_matching_rows_with_distinct_aggregated_values(suites: Any) -> None:
    # One matching row makes AVG = SUM and MIN = MAX: the single database of the old scorer called those
    # swaps right ~10-20% of the time on Spider.
    suite = suites(CARS, "SELECT avg(horsepower) FROM cars_data WHERE year < 1980 AND cylinders = 4")
    counts = suite.run("SELECT count(*), count(DISTINCT horsepower), sum(CAST(horsepower AS REAL) = 0) "
                       "FROM cars_data WHERE year < 1980 AND cylinders = 4")
    for index, [(matching, distinct, zeros)] in enumerate(counts):
        if not sqlfuzz.is_tiny(index):
            assert matching >= 2 and distinct >= 2, f"database {index}"
        assert not zeros  # horsepower is TEXT but averaged: numbers, not 'Horsepower 12'


def test_avg_and_sum_min_and_max_differ_on_some_database(suites: Any) -> None:
    suite = suites(CARS, "SELECT avg(horsepower) FROM cars_data WHERE year < 1980")
    assert suite.run("SELECT avg(horsepower) FROM cars_data WHERE year < 1980") != \
        suite.run("SELECT sum(horsepower) FROM cars_data WHERE year < 1980")
    suite = suites(WORLD, 'SELECT CountryCode, max(Percentage) FROM countrylanguage WHERE Language = "Spanish" '
                          "GROUP BY CountryCode")
    assert suite.run("SELECT CountryCode, max(Percentage) FROM countrylanguage WHERE Language = 'Spanish' "
                     "GROUP BY CountryCode") != \
        suite.run("SELECT CountryCode, min(Percentage) FROM countrylanguage WHERE Language = 'Spanish' "
                  "GROUP BY CountryCode")


def test_a_column_under_count_distinct_holds_duplicates_among_the_matching_rows(suites: Any) -> None:
    # Database 0 copies no rows: the duplicates come from the column's small pool.
    suite = suites(WORLD, 'SELECT count(DISTINCT GovernmentForm) FROM country WHERE Continent = "Africa"')
    [(total, distinct)] = sqlexec.run(suite.conns[0], "SELECT count(GovernmentForm), count(DISTINCT GovernmentForm) "
                                                      "FROM country WHERE Continent = 'Africa'", suite.settings)
    assert total > distinct


# -- conditions -------------------------------------------------------------------------------------------

JOINED = ("SELECT T2.Name FROM concert AS T1 JOIN stadium AS T2 ON T1.Stadium_ID = T2.Stadium_ID "
          "WHERE T1.Year = 2014 AND T2.Capacity > 5000 AND T2.Location LIKE '%West%'")


@pytest.mark.parametrize("index", range(3))
def test_each_conjunct_of_the_gold_changes_its_result_on_some_database(suites: Any, index: int) -> None:
    suite = suites(CONCERT, JOINED)
    assert suite.run(suite.gold.sql) != suite.run(without_conjunct(JOINED, index))


def test_database_0_has_rows_that_violate_exactly_one_conjunct_and_rows_that_satisfy_all(suites: Any) -> None:
    gold = "SELECT Name FROM singer WHERE Age > 30 AND Country = 'France' AND Song_Name LIKE '%Love%'"
    suite = suites(CONCERT, gold)
    conjuncts = ["Age > 30", "Country = 'France'", "Song_Name LIKE '%Love%'"]
    truth = sqlexec.run(suite.conns[0], f"SELECT {', '.join(f'coalesce({c}, 0)' for c in conjuncts)} FROM singer",
                        suite.settings)
    patterns = Counter(tuple(bool(v) for v in row) for row in truth)
    assert patterns[(True, True, True)] >= 2
    for k in range(3):
        assert patterns[tuple(j != k for j in range(3))] >= 1, f"no row violates only {conjuncts[k]}"


def test_the_gold_returns_rows_on_every_patterned_database(suites: Any) -> None:
    # The patterned databases (even ones) put matching rows of joined tables on the same hot keys.
    suite = suites(CONCERT, JOINED)
    sizes = [len(r) for r in suite.run(suite.gold.sql)]
    assert all(n > 0 for i, n in enumerate(sizes) if i % 2 == 0), sizes


INTERSECTED = ("SELECT T1.Name FROM country AS T1 JOIN countrylanguage AS T2 ON T1.Code = T2.CountryCode "
               "WHERE T2.Language = 'English' AND T2.IsOfficial = 'T' INTERSECT SELECT T1.Name FROM country AS T1 "
               "JOIN countrylanguage AS T2 ON T1.Code = T2.CountryCode WHERE T2.Language = 'French' "
               "AND T2.IsOfficial = 'T'")


def test_one_filters_rows_meet_anothers_on_some_keys_but_not_all(suites: Any) -> None:
    # INTERSECT is neither empty nor either side everywhere: dropping one side's WHERE shows.
    suite = suites(WORLD, INTERSECTED)
    both = suite.run(INTERSECTED)
    assert any(both)
    assert suite.run(INTERSECTED.replace("WHERE T2.Language = 'English' AND T2.IsOfficial = 'T' ", "")) != both


def test_a_row_meant_for_one_filter_does_not_meet_another_by_accident(suites: Any) -> None:
    # A violator of `Language = 'French'` that is 'English' would match the other branch: on database 0
    # (patterned hot keys, every scheduled row fits) the English and the French rows would share every key.
    suite = suites(WORLD, INTERSECTED)
    for index in (0,):
        [(english, french, shared)] = sqlexec.run(suite.conns[index], (
            "SELECT count(DISTINCT e.CountryCode), count(DISTINCT f.CountryCode), count(DISTINCT CASE WHEN "
            "e.CountryCode = f.CountryCode THEN e.CountryCode END) FROM countrylanguage e, countrylanguage f "
            "WHERE e.Language = 'English' AND e.IsOfficial = 'T' AND f.Language = 'French' AND f.IsOfficial = 'T'"),
            suite.settings)
        assert shared < min(english, french), f"database {index}"


def test_a_violator_of_one_filter_takes_no_value_that_another_filter_wants() -> None:
    # The rows of database 0 above could pass by luck: the choice itself, over many draws.
    tables = sqlexec.parse_context(WORLD, "sqlite")
    tree = sqlexec.prepare(INTERSECTED, "sqlite", set()).tree
    assert tree is not None
    plan = sqlfuzz.plan(tables, sqlfuzz.analyze(tree, tables), random.Random(0),
                        lambda c, q: sqlexec.run(c, q, sqlexec.Settings()))
    [table] = [t for t in plan.tables if t.table.name == "countrylanguage"]
    language = [c.ref[1] for c in table.columns].index("language")
    french = next(i for i, f in enumerate(table.filters) if "French" in f.conjuncts[0].sql)
    rng = random.Random(0)
    chosen = {sqlfuzz._by_conditions(table, language, sqlfuzz.Mode(sqlfuzz.MISS, french, 0), rng, set())
              for _ in range(200)}
    assert "French" not in chosen and "English" not in chosen
    assert len(chosen) > 3


# -- NULLs, duplicates, keys ----------------------------------------------------------------------------


def test_the_suite_has_nulls_and_duplicate_rows_and_keys_with_and_without_a_partner(suites: Any) -> None:
    suite = suites(CONCERT, "SELECT T2.Name, count(*) FROM concert AS T1 JOIN stadium AS T2 "
                            "ON T1.Stadium_ID = T2.Stadium_ID GROUP BY T1.Stadium_ID")
    nulls = [n for [(n,)] in suite.run("SELECT count(*) FROM singer WHERE Name IS NULL OR Country IS NULL")]
    duplicates = [n for [(n,)] in suite.run(
        "SELECT count(*) FROM (SELECT Name, Country, Age FROM singer GROUP BY 1, 2, 3 HAVING count(*) > 1)")]
    partnered = suite.run("SELECT count(*) FROM concert WHERE Stadium_ID IN (SELECT Stadium_ID FROM stadium)")
    orphaned = suite.run("SELECT count(*) FROM concert WHERE Stadium_ID NOT IN (SELECT Stadium_ID FROM stadium)")
    unused = suite.run("SELECT count(*) FROM stadium WHERE Stadium_ID NOT IN (SELECT Stadium_ID FROM concert)")
    assert any(nulls) and any(duplicates)
    assert any(n for [(n,)] in partnered) and any(n for [(n,)] in orphaned) and any(n for [(n,)] in unused)


def test_a_primary_key_like_column_is_distinct_in_its_table_and_keys_never_null(suites: Any) -> None:
    suite = suites(CONCERT, "SELECT T2.Name FROM concert AS T1 JOIN stadium AS T2 ON T1.Stadium_ID = T2.Stadium_ID")
    for [(rows, distinct, nulls)] in suite.run("SELECT count(*), count(DISTINCT Stadium_ID), "
                                               "sum(Stadium_ID IS NULL) FROM stadium"):
        assert (distinct, nulls) == (rows, 0)


@pytest.mark.parametrize(("table", "columns", "key"), [
    ("singer", ("Singer_ID", "Name"), "singer_id"), ("Templates", ("Template_ID", "x"), "template_id"),
    ("airports", ("City", "AirportCode"), "airportcode"), ("Student", ("StuID", "x"), "stuid"),
    ("countries", ("CountryId", "x"), "countryid"), ("country", ("Code", "Name"), "code"),
    ("ship", ("lost_in_battle", "id"), "id"), ("countrylanguage", ("CountryCode", "Language"), None),
    ("singer_in_concert", ("concert_ID", "Singer_ID"), None), ("Has_Pet", ("StuID", "PetID"), None),
])
def test_which_column_is_taken_for_a_primary_key(table: str, columns: tuple[str, ...], key: str | None) -> None:
    t = sqlfuzz.Table(table, tuple(sqlfuzz.Column(c, "integer", "INTEGER") for c in columns))
    assert sqlfuzz.primary_key_like(t) == key


# -- determinism and bounds -----------------------------------------------------------------------------


def digest(data: list[dict[str, list[list[Any]]]]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def test_the_databases_are_the_same_in_every_process_and_change_with_the_seed(suites: Any) -> None:
    code = ("import json, hashlib, sys; sys.path[:0] = ['tests/serving']; from test_sqlfuzz import Suite, digest, "
            "CONCERT, JOINED; print(digest(Suite(CONCERT, JOINED).data))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                              env={**env, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert outputs == {digest(suites(CONCERT, JOINED).data)}
    assert digest(suites(CONCERT, JOINED, seed=1).data) not in outputs


def test_tables_have_at_most_rows_per_table_rows_and_the_suite_its_number_of_databases(suites: Any) -> None:
    suite = suites(CONCERT, JOINED, rows_per_table=7, databases=sqlexec.MAX_DATABASES)
    assert len(suite.data) == sqlexec.MAX_DATABASES
    assert max(len(rows) for data in suite.data for rows in data.values()) == 7
    built = sqlexec.build_suite(JOINED, CONCERT, sqlexec.Settings(databases=3))
    try:
        assert len(built.conns) == 3
    finally:
        built.close()


@pytest.mark.parametrize("options", [{"databases": "0"}, {"databases": "17"}, {"rowsPerTable": "1001"}])
def test_suite_sizes_outside_the_limits_are_refused(options: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="outside"):
        check_options("sqlExecution", options)


def test_candidate_values_per_column_are_bounded() -> None:
    gold = "SELECT Name FROM singer WHERE Age IN (" + ", ".join(str(n) for n in range(200)) + ")"
    tables = sqlexec.parse_context(CONCERT, "sqlite")
    tree = sqlexec.prepare(gold, "sqlite", set()).tree
    assert tree is not None
    plan = sqlfuzz.plan(tables, sqlfuzz.analyze(tree, tables), random.Random(0),
                        lambda c, q: sqlexec.run(c, q, sqlexec.Settings()))
    assert max(len(c.candidates) for t in plan.tables for c in t.columns) == sqlfuzz.MAX_CANDIDATES


def test_a_gold_condition_that_a_guard_stops_only_loses_its_targeting() -> None:
    # The gold is dataset input: its conjuncts run under the caller's guards on a scratch database, and
    # one the guards stop (a 2 MB blob) gets no satisfying candidates; the others keep theirs.
    gold = "SELECT Name FROM singer WHERE Age > 30 AND length(zeroblob(2000000)) > Age"
    tables = sqlexec.parse_context(CONCERT, "sqlite")
    tree = sqlexec.prepare(gold, "sqlite", set()).tree
    assert tree is not None
    plan = sqlfuzz.plan(tables, sqlfuzz.analyze(tree, tables), random.Random(0),
                        lambda c, q: sqlexec.run(c, q, sqlexec.Settings()))
    [singer_filter] = [f for t in plan.tables if t.table.name == "singer" for f in t.filters]
    assert sorted(singer_filter.sat) == [0]
    assert singer_filter.sat[0]


def test_the_scratch_database_is_read_only_to_the_gold_conditions() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (a)")
    sqlfuzz.lock_down(conn)
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
