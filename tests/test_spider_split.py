"""scripts/spider_split.py: text-to-SQL rows split by whole database, for the SQL task's held-out evaluation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spider_split import PARTS, split_by_database
from support import shared


def rows_of(sizes: dict[str, int]) -> list[dict[str, Any]]:
    return [{"db_id": db, "question": f"{db} {i}"} for db, n in sizes.items() for i in range(n)]


SIZES = {"world_1": 120, "car_1": 92, "docs": 84, "dogs": 82, "flights": 80, "concert": 45, "pets": 42,
         "hiring": 38, "battle": 16, "estate": 4}


def test_no_database_is_in_two_parts_and_every_row_is_in_one() -> None:
    rows = rows_of(SIZES)
    split = split_by_database(rows)
    owners = {db: [p for p in PARTS if db in split.databases[p]] for db in SIZES}
    assert all(len(parts) == 1 for parts in owners.values()), owners
    assert sorted(r["question"] for p in PARTS for r in split.rows[p]) == sorted(r["question"] for r in rows)
    for part in PARTS:
        assert {r["db_id"] for r in split.rows[part]} == set(split.databases[part])


def test_held_out_parts_get_at_least_their_share_and_training_the_rest() -> None:
    split = split_by_database(rows_of(SIZES), validation=0.15, test=0.25)
    total = sum(SIZES.values())
    assert len(split.rows["test"]) >= 0.25 * total
    assert len(split.rows["validation"]) >= 0.15 * total
    assert len(split.rows["train"]) >= 0.4 * total
    assert all(split.databases[p] for p in PARTS)


def test_the_split_depends_on_the_seed_only() -> None:
    rows = rows_of(SIZES)
    assert split_by_database(rows, seed=3) == split_by_database(list(rows), seed=3)
    assert any(split_by_database(rows, seed=s).databases != split_by_database(rows, seed=3).databases
               for s in range(3))


def test_rows_keep_their_order_within_a_part() -> None:
    rows = rows_of(SIZES)
    split = split_by_database(rows)
    for part in PARTS:
        positions = [rows.index(r) for r in split.rows[part]]
        assert positions == sorted(positions)


def test_with_two_databases_training_keeps_one() -> None:
    split = split_by_database(rows_of({"a": 5, "b": 5}), validation=0.3, test=0.3)
    assert split.databases["train"] and split.databases["test"]
    assert not split.databases["validation"]


@pytest.mark.parametrize(("validation", "test"), [(0.5, 0.5), (-0.1, 0.2), (0.2, 1.0)])
def test_shares_that_leave_no_training_rows_are_refused(validation: float, test: float) -> None:
    with pytest.raises(ValueError, match="leave rows for training"):
        split_by_database(rows_of(SIZES), validation, test)


def test_a_row_without_its_database_is_refused() -> None:
    with pytest.raises(ValueError, match="row 1 has no 'db_id'"):
        split_by_database([{"db_id": "a"}, {"question": "q"}])


def test_the_real_spider_rows_split_into_disjoint_databases() -> None:
    path = shared.require(shared.DATASETS / "spider" / "dev-part.jsonl", "the Spider split is not checked")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    split = split_by_database(rows)
    assert sum(len(split.rows[p]) for p in PARTS) == len(rows) == 603
    assert set(split.databases["train"]).isdisjoint(split.databases["test"])
    assert len(split.rows["test"]) >= 0.25 * len(rows)
