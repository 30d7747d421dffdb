"""`kubetune data prepare {viggo,gsm8k,sql} --source DIR --to URI`, run in-process on the real public files
in ../shared/datasets and on small files written here; uploads to a local folder, a mounted pvc:// claim and a
local S3 (moto's server, over HTTP)."""

from __future__ import annotations

import csv
import json
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from kubetune.cli import main
from kubetune.contract import prepare as prep
from support import shared
from support.s3 import LocalS3

DATASETS = shared.DATASETS
SECRET = "sk-live-0123456789abcdef"  # a value a source row holds: never shown in a message


def dataset(task: str) -> Path:
    folder = {"viggo": "viggo", "gsm8k": "gsm8k", "sql": "spider"}[task]
    return shared.require(DATASETS / folder, f"the real {task} files: data prepare is tested on small files only")


def rows(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines file's objects (lines end at \n only: a raw U+2028 inside a string is no line end)."""
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def prepare(task: str, source: Path, to: Path | str, *extra: str) -> int:
    return main(["data", "prepare", task, "--source", str(source), "--to", str(to), *extra])


def write_jsonl(path: Path, objs: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def sql_rows(databases: int, per_db: int = 5, db_id: bool = True) -> list[dict[str, str]]:
    out = []
    for d in range(databases):
        for q in range(per_db):
            row = {"question": f"q{d}-{q}?", "context": f"CREATE TABLE t{d} (a INTEGER, b{q % 2} TEXT)"
                   if not db_id else f"CREATE TABLE t{d} (a INTEGER)", "answer": f"SELECT a FROM t{d}"}
            if db_id:
                row["db_id"] = f"db{d}"
            out.append(row)
    return out


# --------------------------------------------------------------------------------------------- ViGGO


@pytest.fixture(scope="module")
def viggo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("viggo")
    assert prepare("viggo", dataset("viggo"), out) == 0
    return out


def test_viggo_train_is_all_of_train_csv_as_ref_and_mr(viggo: Path) -> None:
    with (dataset("viggo") / "train.csv").open(newline="") as handle:
        source = [{"ref": r["ref"], "mr": r["mr"]} for r in csv.DictReader(handle)]
    assert rows(viggo / "train.jsonl") == source


def test_viggo_valid_csv_is_split_into_validation_and_test(viggo: Path) -> None:
    with (dataset("viggo") / "valid.csv").open(newline="") as handle:
        source = sorted((r["ref"], r["mr"]) for r in csv.DictReader(handle))
    valid, test = rows(viggo / "valid.jsonl"), rows(viggo / "test.jsonl")
    assert sorted((r["ref"], r["mr"]) for r in valid + test) == source
    assert len(test) >= len(source) / 2 > 0 and valid


def test_viggo_validation_and_test_share_no_meaning_representation(viggo: Path) -> None:
    valid, test = rows(viggo / "valid.jsonl"), rows(viggo / "test.jsonl")
    assert not {r["mr"] for r in valid} & {r["mr"] for r in test}


def test_viggo_never_reads_a_test_csv(tmp_path: Path) -> None:
    source = tmp_path / "viggo"
    shutil.copytree(dataset("viggo"), source)
    (source / "test.csv").write_text('mr,ref\n"inform(name[Never Read])","A row of the official test split."\n')
    out = tmp_path / "out"
    assert prepare("viggo", source, out) == 0
    written = "".join(p.read_text() for p in out.iterdir())
    assert "Never Read" not in written
    assert [s["file"] for s in json.loads((out / "manifest.json").read_text())["sources"]] == \
        ["train.csv", "valid.csv"]


def test_viggo_has_no_valid_share(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare("viggo", dataset("viggo"), tmp_path / "out", "--valid-share", "0.2") == 2
    assert "--valid-share does not apply to viggo" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- GSM8K


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gsm8k")
    assert prepare("gsm8k", dataset("gsm8k"), out) == 0
    return out


def test_gsm8k_splits_train_jsonl_by_question(gsm8k: Path) -> None:
    source = rows(dataset("gsm8k") / "train.jsonl")
    splits = {s: rows(gsm8k / f"{s}.jsonl") for s in prep.SPLITS}
    assert sorted(json.dumps(r, sort_keys=True) for s in splits.values() for r in s) == \
        sorted(json.dumps({"question": r["question"], "answer": r["answer"]}, sort_keys=True) for r in source)
    questions = {s: {r["question"] for r in rs} for s, rs in splits.items()}
    assert not questions["train"] & questions["test"] and not questions["train"] & questions["valid"]
    assert len(splits["test"]) >= 0.1 * len(source) and len(splits["valid"]) >= 0.05 * len(source)


def test_the_split_is_the_same_for_the_same_seed_and_changes_with_it(gsm8k: Path, tmp_path: Path) -> None:
    assert prepare("gsm8k", dataset("gsm8k"), tmp_path / "again") == 0
    assert prepare("gsm8k", dataset("gsm8k"), tmp_path / "seed1", "--seed", "1") == 0
    assert (tmp_path / "again" / "test.jsonl").read_bytes() == (gsm8k / "test.jsonl").read_bytes()
    assert (tmp_path / "seed1" / "test.jsonl").read_bytes() != (gsm8k / "test.jsonl").read_bytes()


def test_the_manifest_records_sources_seed_and_counts(gsm8k: Path) -> None:
    manifest = json.loads((gsm8k / "manifest.json").read_text())
    assert manifest["task"] == "gsm8k" and manifest["seed"] == 0
    assert manifest["sources"][0]["file"] == "train.jsonl" and len(manifest["sources"][0]["sha256"]) == 64
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == \
        {s: len(rows(gsm8k / f"{s}.jsonl")) for s in prep.SPLITS}


# --------------------------------------------------------------------------------------------- SQL


def test_sql_holds_out_whole_spider_databases(tmp_path: Path) -> None:
    assert prepare("sql", dataset("sql"), tmp_path) == 0
    dbs = {s: {r["db_id"] for r in rows(tmp_path / f"{s}.jsonl")} for s in prep.SPLITS}
    assert all(dbs.values())
    assert not dbs["train"] & dbs["test"] and not dbs["train"] & dbs["valid"] and not dbs["valid"] & dbs["test"]
    assert set(rows(tmp_path / "test.jsonl")[0]) == {"question", "context", "answer", "db_id"}


def test_sql_reads_a_sql_create_context_json_array_grouped_by_context(tmp_path: Path) -> None:
    source = tmp_path / "src" / "sql_create_context_v4.json"
    source.parent.mkdir()
    items = sql_rows(20, db_id=False)
    source.write_text("\ufeff[\n" + ",\n  ".join(json.dumps(r) for r in items) + "\n]\n")  # a BOM, as some do
    assert prepare("sql", source.parent, tmp_path / "out") == 0
    out = {s: rows(tmp_path / "out" / f"{s}.jsonl") for s in prep.SPLITS}
    assert sorted(json.dumps(r) for s in out.values() for r in s) == sorted(json.dumps(r) for r in items)
    contexts = {s: {r["context"] for r in rs} for s, rs in out.items()}
    assert not contexts["train"] & contexts["test"] and not contexts["valid"] & contexts["test"]


def test_too_few_databases_to_hold_out_is_a_data_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "src" / "rows.jsonl", sql_rows(2))
    assert prepare("sql", source.parent, tmp_path / "out") == 3
    assert "too few to hold out whole groups" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _peak_memory(tmp_path: Path, n: int) -> tuple[int, int]:
    """(file size, peak of Python allocations) preparing a JSON array of `n` rows over 30 databases."""
    source = tmp_path / f"src{n}" / "big.json"
    source.parent.mkdir()
    pad = "x" * 80
    with source.open("w") as handle:
        handle.write("[")
        for i in range(n):
            handle.write(("," if i else "") + json.dumps(
                {"question": f"q{i} {pad}?", "context": f"CREATE TABLE t{i % 30} (a INTEGER)",
                 "answer": "SELECT a FROM t", "db_id": f"db{i % 30}"}))
        handle.write("]")
    tracemalloc.start()
    try:
        result = prep.prepare("sql", source.parent, tmp_path / f"out{n}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(result.rows.values()) == n
    return source.stat().st_size, peak


def test_a_json_array_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    """Four times the rows (of as many databases), about the same peak memory: one row at a time."""
    _, small = _peak_memory(tmp_path, 2_000)
    size, big = _peak_memory(tmp_path, 8_000)
    assert big < 1.25 * small and big < size / 2, f"peak {small} -> {big} bytes ({size}-byte file)"


# --------------------------------------------------------------------------------------------- bad sources


@pytest.mark.parametrize(("row", "said"), [
    ({"question": "q?", "answer": SECRET}, "row 2: missing field 'context'"),
    ({"question": "q?", "context": SECRET, "answer": 42}, "row 2: field 'answer' must be a string, got int"),
    ({"question": " ", "context": SECRET, "answer": "SELECT 1"}, "row 2: field 'question' is empty"),
    (["not", "an", "object", SECRET], "row 2: expected a JSON object, got list"),
])
def test_a_bad_row_is_named_by_file_row_and_field_never_shown(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], row: Any, said: str) -> None:
    source = write_jsonl(tmp_path / "src" / "rows.jsonl", [sql_rows(1)[0], row])
    assert prepare("sql", source.parent, tmp_path / "out") == 3
    err = capsys.readouterr().err
    assert f"rows.jsonl {said}" in err and SECRET not in err
    assert not (tmp_path / "out").exists()  # nothing written from a source with a bad row


def test_invalid_json_is_named_by_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src" / "rows.jsonl"
    write_jsonl(source, sql_rows(1))
    with source.open("a") as handle:
        handle.write('{"question": "' + SECRET + '\n')
    assert prepare("sql", source.parent, tmp_path / "out") == 3
    err = capsys.readouterr().err
    assert "rows.jsonl row 6: not valid JSON" in err and SECRET not in err


def test_a_truncated_json_array_is_a_data_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src" / "rows.json"
    source.parent.mkdir()
    source.write_text("[" + json.dumps(sql_rows(1)[0]) + ', {"question": "' + SECRET)
    assert prepare("sql", source.parent, tmp_path / "out") == 3
    err = capsys.readouterr().err
    assert "rows.json item 2: not valid JSON" in err and SECRET not in err


def test_an_over_long_row_is_refused_without_reading_it_whole(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "src" / "rows.jsonl", [{"question": "x" * (prep.MAX_ROW_CHARS + 10)}])
    assert prepare("sql", source.parent, tmp_path / "out") == 3
    assert f"rows.jsonl row 1: longer than {prep.MAX_ROW_CHARS} characters" in capsys.readouterr().err


def test_a_viggo_csv_without_the_columns_is_a_data_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.csv").write_text("meaning,sentence\na,b\n")
    (source / "valid.csv").write_text("mr,ref\na,b\n")
    assert prepare("viggo", source, tmp_path / "out") == 3
    assert "train.csv: the header has no column 'ref', 'mr'" in capsys.readouterr().err


def test_a_missing_source_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    assert prepare("gsm8k", tmp_path / "src", tmp_path / "out") == 2
    assert f"--source: {tmp_path / 'src' / 'train.jsonl'} not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- destinations


def small_gsm8k(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "src" / "train.jsonl",
                       [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
                        for i in range(40)]).parent


def test_existing_files_are_kept_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, out = small_gsm8k(tmp_path), tmp_path / "out"
    assert prepare("gsm8k", source, out) == 0
    (out / "train.jsonl").write_text("mine\n")
    assert prepare("gsm8k", source, out) == 2
    assert "train.jsonl, valid.jsonl, test.jsonl, manifest.json already exist" in capsys.readouterr().err
    assert (out / "train.jsonl").read_text() == "mine\n"
    assert prepare("gsm8k", source, out, "--overwrite") == 0
    assert (out / "train.jsonl").read_text() != "mine\n"


def test_a_pvc_uri_writes_into_the_mounted_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "mnt"))
    (tmp_path / "mnt" / "datasets").mkdir(parents=True)
    assert prepare("gsm8k", small_gsm8k(tmp_path), "pvc://datasets/gsm8k") == 0
    assert sorted(p.name for p in (tmp_path / "mnt" / "datasets" / "gsm8k").iterdir()) == \
        ["manifest.json", "test.jsonl", "train.jsonl", "valid.jsonl"]


def test_a_pvc_claim_that_is_not_mounted_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "mnt"))
    assert prepare("gsm8k", small_gsm8k(tmp_path), "pvc://datasets/gsm8k") == 5
    err = capsys.readouterr().err
    assert f"PersistentVolumeClaim 'datasets' is not mounted at {tmp_path / 'mnt' / 'datasets'}" in err
    assert not (tmp_path / "mnt").exists()


def test_gs_without_gcsfs_says_what_to_install(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed")
    assert prepare("gsm8k", small_gsm8k(tmp_path), "gs://bucket/gsm8k") == 5
    assert "gs://bucket/gsm8k: the fsspec implementation for gs:// is not installed (pip install gcsfs)" in \
        capsys.readouterr().err


def test_upload_to_s3_writes_the_splits_and_the_manifest(s3: LocalS3, viggo: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare("viggo", dataset("viggo"), "s3://kubetune-examples/viggo") == 0
    objects = s3.objects("kubetune-examples", "viggo/")
    assert sorted(objects) == ["viggo/manifest.json", "viggo/test.jsonl", "viggo/train.jsonl", "viggo/valid.jsonl"]
    for split in prep.SPLITS:
        assert objects[f"viggo/{split}.jsonl"] == (viggo / f"{split}.jsonl").read_bytes()
    assert "s3://kubetune-examples/viggo/test.jsonl" in capsys.readouterr().out


def test_s3_objects_are_kept_unless_overwrite(s3: LocalS3, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    s3.client.put_object(Bucket="kubetune-examples", Key="mine/train.jsonl", Body=b"mine\n")
    assert prepare("gsm8k", small_gsm8k(tmp_path), "s3://kubetune-examples/mine") == 2
    assert "train.jsonl already exist" in capsys.readouterr().err
    assert s3.objects("kubetune-examples", "mine/") == {"mine/train.jsonl": b"mine\n"}
    assert prepare("gsm8k", small_gsm8k(tmp_path), "s3://kubetune-examples/mine", "--overwrite") == 0
    assert s3.objects("kubetune-examples", "mine/")["mine/train.jsonl"] != b"mine\n"


def test_a_missing_bucket_is_unavailable(s3: LocalS3, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare("gsm8k", small_gsm8k(tmp_path), "s3://no-such-bucket/gsm8k") == 5
    assert "error: --to s3://no-such-bucket/gsm8k:" in capsys.readouterr().err


def test_sql_source_may_be_one_file(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "src" / "rows.jsonl", sql_rows(10))
    write_jsonl(tmp_path / "src" / "other.jsonl", [{"unrelated": True}])  # not read: only the file named
    assert prepare("sql", source, tmp_path / "out") == 0
    assert sum(len(rows(tmp_path / "out" / f"{s}.jsonl")) for s in prep.SPLITS) == 50
