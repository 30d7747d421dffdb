"""Split text-to-SQL rows by whole database: no database's schema or tables appear in two parts.

Spider's own split holds out whole databases, so that a model is scored on schemas it never saw; a split by
row would score it on questions about tables it was trained on. `split_by_database` gives every database
(`db_id`) to one part (train, validation, test): the databases are shuffled with the seed, the smallest
parts are filled first up to their share of the rows, and the rest goes to training. A development tool
for the SQL task's `reproduce` run (issue 15), not part of the package.

    python scripts/spider_split.py ../shared/datasets/spider/dev-part.jsonl --out runs/spider-split
    # -> train.jsonl, validation.jsonl, test.jsonl and split.json (which databases went where)
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARTS = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    """Rows by part, and the databases of each part."""

    rows: dict[str, list[Mapping[str, Any]]]
    databases: dict[str, list[str]]


def split_by_database(rows: Sequence[Mapping[str, Any]], validation: float = 0.15, test: float = 0.25,
                      seed: int = 0, key: str = "db_id") -> Split:
    """Give each database to one part: `test` and `validation` get at least that share of the rows (whole
    databases, so usually a little more), training the rest; rows keep their order within a part.

    Deterministic for the same rows and seed. A part gets at least one database when there are at least
    three databases; ValueError when a row has no `key` or the shares are not in [0, 1) with room left
    for training.
    """
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise ValueError(f"validation ({validation}) and test ({test}) must be in [0, 1) and leave rows for training")
    sizes: dict[str, int] = {}
    for i, row in enumerate(rows):
        name = row.get(key)
        if not isinstance(name, str) or not name:
            raise ValueError(f"row {i} has no {key!r}")
        sizes[name] = sizes.get(name, 0) + 1
    names = sorted(sizes)
    random.Random(seed).shuffle(names)
    total = len(rows)
    assigned: dict[str, str] = {}
    for part, share in (("test", test), ("validation", validation)):
        taken = 0
        for name in names:
            if name in assigned:
                continue
            if taken >= share * total and (taken > 0 or share == 0 or len(names) - len(assigned) <= 1):
                break
            if len(names) - len(assigned) <= 1:  # the last database stays for training
                break
            assigned[name] = part
            taken += sizes[name]
    for name in names:
        assigned.setdefault(name, "train")
    parts: dict[str, list[Mapping[str, Any]]] = {part: [] for part in PARTS}
    for row in rows:
        parts[assigned[str(row[key])]].append(row)
    databases = {part: sorted(n for n in names if assigned[n] == part) for part in PARTS}
    return Split(parts, databases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=Path, help="JSONL rows with a db_id")
    parser.add_argument("--out", type=Path, required=True, help="folder for train/validation/test.jsonl")
    parser.add_argument("--validation", type=float, default=0.15)
    parser.add_argument("--test", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    split = split_by_database(rows, args.validation, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        (args.out / f"{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split.rows[part]))
    summary = {part: {"rows": len(split.rows[part]), "databases": split.databases[part]} for part in PARTS}
    (args.out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    for part in PARTS:
        print(f"{part:<11} {len(split.rows[part]):>5} rows  {', '.join(split.databases[part])}")


if __name__ == "__main__":
    main()
