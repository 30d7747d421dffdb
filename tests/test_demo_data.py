"""The real ViGGO sample shipped for `make demo` (examples/demo/data): held out honestly, attributed, reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from viggo_sample import sample

DATA = Path(__file__).parent.parent / "examples" / "demo" / "data"
PUBLIC = Path(__file__).parent.parent.parent / "shared" / "datasets" / "viggo"


def rows(split: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]


def test_no_test_meaning_representation_is_seen_in_training_or_checkpoint_selection() -> None:
    seen = {r["mr"] for r in rows("train")} | {r["mr"] for r in rows("valid")}
    assert not {r["mr"] for r in rows("test")} & seen


def test_validation_shares_no_meaning_representation_with_training() -> None:
    assert not {r["mr"] for r in rows("valid")} & {r["mr"] for r in rows("train")}


def test_every_row_is_a_sentence_and_its_meaning_representation() -> None:
    for split in ("train", "valid", "test"):
        for row in rows(split):
            assert set(row) == {"ref", "mr"} and row["ref"] and row["mr"].endswith(")")


def test_the_sample_carries_its_licence_and_attribution() -> None:
    readme = (DATA / "README.md").read_text()
    assert "CC BY-SA 4.0" in readme and "Juraska" in readme and "Changes made" in readme
    assert (DATA / "LICENSE.slug2slug").read_text().startswith("MIT License")


def test_the_sample_stays_small() -> None:
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 512 * 1024


@pytest.mark.skipif(not PUBLIC.is_dir(), reason="the public ViGGO files are not on this machine")
def test_the_sample_is_what_the_script_makes_from_the_public_files() -> None:
    made = sample(PUBLIC)
    for split in ("train", "valid", "test"):
        assert made[split] == rows(split), split
