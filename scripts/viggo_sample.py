"""Make the real ViGGO sample that ships with the demo (examples/demo/data/), from the public files.

    python scripts/viggo_sample.py --source ../shared/datasets/viggo

ViGGO (Juraska et al., 2019; CC BY-SA 4.0) has three reference sentences per meaning representation (MR).
The sample keeps whole MR groups together so that no MR of the held-out test rows is seen in training or
in checkpoint selection: train rows come from ViGGO's train split; validation and test rows from disjoint
MR groups of its valid split, leaving out the few MRs that ViGGO's train split contains too. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections import defaultdict
from pathlib import Path

OUT = Path("examples/demo/data")
TRAIN_ROWS = 1000
VALID_GROUPS, TEST_GROUPS = 20, 60  # 3 rows per group: 60 validation rows, 180 test rows
SEED = 7


def groups(path: Path) -> list[list[dict[str, str]]]:
    """The split's rows grouped by MR, groups shuffled (seeded), rows in file order."""
    by_mr: dict[str, list[dict[str, str]]] = defaultdict(list)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            by_mr[row["mr"]].append({"ref": row["ref"], "mr": row["mr"]})
    keyed = sorted(by_mr.values(), key=lambda rows: rows[0]["mr"])
    random.Random(SEED).shuffle(keyed)
    return keyed


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path}: {len(rows)} rows, {path.stat().st_size // 1024} KiB")


def sample(source: Path) -> dict[str, list[dict[str, str]]]:
    """train/valid/test rows from the public files in `source` (train.csv, valid.csv)."""
    train = [r for g in groups(source / "train.csv") for r in g][:TRAIN_ROWS]
    # 7 generic MRs (e.g. `request_attribute(genres[])`) are in both of ViGGO's splits: not held out.
    seen = {r["mr"] for g in groups(source / "train.csv") for r in g}
    valid = [g for g in groups(source / "valid.csv") if g[0]["mr"] not in seen]
    return {"train": train, "valid": [r for g in valid[:VALID_GROUPS] for r in g],
            "test": [r for g in valid[VALID_GROUPS:VALID_GROUPS + TEST_GROUPS] for r in g]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="a folder with ViGGO's train.csv, valid.csv")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for split, rows in sample(args.source).items():
        write(args.output / f"{split}.jsonl", rows)

if __name__ == "__main__":
    main()
