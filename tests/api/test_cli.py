"""`kubetune validate` and `kubetune crds`, run in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from factories import evj_manifest, ftj_manifest
from kubetune.api import crd as crd_gen
from kubetune.cli import main

REPO = Path(__file__).resolve().parents[2]
VIGGO = REPO / "examples" / "viggo" / "finetunejob.yaml"


def _write(tmp_path: Path, *docs: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return str(path)


def test_validate_viggo_example_exits_0(capsys):
    assert main(["validate", str(VIGGO)]) == 0
    assert "FineTuneJob/viggo-llama-2-7b is valid" in capsys.readouterr().out


def test_validate_every_example_exits_0(capsys):
    files = sorted(str(p) for p in (REPO / "examples").rglob("*.yaml"))
    assert main(["validate", *files]) == 0, capsys.readouterr().err


def test_validate_bad_file_exits_1_naming_the_field(tmp_path, capsys):
    path = _write(tmp_path, ftj_manifest(spec__hyperparameters={"epochs": 0}))
    assert main(["validate", path]) == 1
    err = capsys.readouterr().err
    assert "spec.hyperparameters.epochs" in err and "FineTuneJob/viggo" in err and path in err


def test_validate_cross_field_error_names_the_object(tmp_path, capsys):
    path = _write(tmp_path, ftj_manifest(spec__baseModel={"name": "m", "uri": "s3://b/m"}))
    assert main(["validate", path]) == 1
    assert "spec.baseModel: set exactly one of name, uri, fineTuneJobRef" in capsys.readouterr().err


def test_validate_reports_the_bad_document_of_a_multi_document_file(tmp_path, capsys):
    path = _write(tmp_path, ftj_manifest("good"), ftj_manifest("bad", spec__output={"keepCheckpoints": 1}))
    assert main(["validate", path]) == 1
    err = capsys.readouterr().err
    assert "FineTuneJob/bad: spec.output.uri" in err and "FineTuneJob/good" not in err


def test_validate_checks_the_remaining_files_after_a_bad_one(tmp_path, capsys):
    bad = _write(tmp_path, ftj_manifest(spec__resources={"workers": 0}), name="bad.yaml")
    assert main(["validate", bad, str(VIGGO)]) == 1
    captured = capsys.readouterr()
    assert "spec.resources.workers" in captured.err and "viggo-llama-2-7b is valid" in captured.out


def test_validate_evaljob(tmp_path, capsys):
    path = _write(tmp_path, evj_manifest(spec__scorer={"name": "rouge"}))
    assert main(["validate", path]) == 1
    assert "spec.scorer.name" in capsys.readouterr().err


def test_validate_unknown_kubetune_kind_exits_1(tmp_path, capsys):
    path = _write(tmp_path, {"apiVersion": "kubetune.io/v1alpha1", "kind": "TrainJob", "metadata": {"name": "x"}})
    assert main(["validate", path]) == 1
    assert "unsupported kind 'TrainJob'" in capsys.readouterr().err


def test_validate_skips_other_api_groups_with_a_note(tmp_path, capsys):
    path = _write(tmp_path, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    assert main(["validate", path]) == 0
    assert "ConfigMap/x skipped" in capsys.readouterr().out


def test_validate_missing_file_exits_1(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


def test_validate_malformed_yaml_exits_1(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("spec: [unclosed\n")
    assert main(["validate", str(path)]) == 1
    assert "broken.yaml" in capsys.readouterr().err


def test_validate_non_mapping_document_exits_1(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert main(["validate", str(path)]) == 1


def test_validate_needs_a_file():
    with pytest.raises(SystemExit) as info:
        main(["validate"])
    assert info.value.code == 2


def test_crds_command_writes_the_committed_crds(tmp_path, capsys):
    assert main(["crds", "--output", str(tmp_path)]) == 0
    written = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert written == {name: crd_gen.render(c) for name, c in crd_gen.all_crds().items()}
    assert written == {name: (REPO / "crds" / name).read_text() for name in written}, "run `make crds`"
