"""`kubetune validate`, `kubetune crds`, `--version`, `--help`'s exit codes and `--set`, run in-process."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from factories import evj_manifest, ftj_manifest
from kubetune.api import crd as crd_gen
from kubetune.cli import apply_sets, main
from kubetune.cli.errors import Exit

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


# --------------------------------------------------------------------------------------------- --version, help


def test_version_is_the_package_metadata_version(capsys):
    pyproject = (REPO / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', pyproject, flags=re.MULTILINE).group(1)
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kubetune {metadata.version('kubetune')}" == f"kubetune {declared}"


def test_help_lists_every_exit_code(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for code in Exit:
        assert re.search(rf"^  {int(code)} +\S", out, flags=re.MULTILINE), f"exit code {int(code)} not in --help"


def test_the_reference_documents_every_exit_code():
    reference = (REPO / "docs" / "reference.md").read_text()
    for code in Exit:
        assert re.search(rf"^\| {int(code)} \| \S", reference, flags=re.MULTILINE), \
            f"exit code {int(code)} not in docs/reference.md"


def test_a_usage_error_exits_2_on_stderr(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == Exit.USAGE
    captured = capsys.readouterr()
    assert "the following arguments are required: files" in captured.err and captured.out == ""


# --------------------------------------------------------------------------------------------- --set


def test_set_is_applied_before_validation(tmp_path, capsys):
    path = _write(tmp_path, ftj_manifest(spec__hyperparameters={"epochs": 0}))
    assert main(["validate", path, "--set", "spec.hyperparameters.epochs=2"]) == 0
    assert "FineTuneJob/viggo is valid" in capsys.readouterr().out


def test_a_bad_set_value_is_reported_naming_its_field(tmp_path, capsys):
    path = _write(tmp_path, ftj_manifest())
    assert main(["validate", path, "--set", "spec.hyperparameters.epochs=0"]) == 1
    err = capsys.readouterr().err
    assert "FineTuneJob/viggo: spec.hyperparameters.epochs: Input should be greater than or equal to 1" in err
    assert "(after --set spec.hyperparameters.epochs=0)" in err


def test_run_with_a_bad_set_exits_2_before_anything_runs(tmp_path, capsys):
    path = _write(tmp_path, ftj_manifest())
    assert main(["run", path, "--output", str(tmp_path / "runs"),
                 "--set", "spec.hyperparameters.learningRate=fast"]) == Exit.USAGE
    assert "spec.hyperparameters.learningRate" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_set_without_a_selector_applies_to_every_kubetune_resource(tmp_path, capsys):
    path = _write(tmp_path, ftj_manifest("a"), ftj_manifest("b"),
                  {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
    assert main(["validate", path, "--set", "spec.resources.workers=0"]) == 1
    assert "FineTuneJob/a: spec.resources.workers" in capsys.readouterr().err  # the first one fails first
    docs = [ftj_manifest("a"), ftj_manifest("b"), {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}]
    apply_sets(["metadata.labels.team=ml"], [(Path(path), docs)])
    assert [d["metadata"].get("labels") for d in docs] == [{"team": "ml"}, {"team": "ml"}, None]


def test_set_with_kind_and_name_changes_only_that_resource(tmp_path, capsys):
    path = _write(tmp_path, ftj_manifest("a"), ftj_manifest("b"), evj_manifest("e"))
    assert main(["validate", path, "--set", "FineTuneJob/b:spec.resources.workers=0"]) == 1
    err = capsys.readouterr().err
    assert "FineTuneJob/b: spec.resources.workers" in err and "FineTuneJob/a" not in err


def test_set_with_a_kind_changes_every_resource_of_that_kind(tmp_path, capsys):
    path = _write(tmp_path, ftj_manifest("a"), evj_manifest("e"))
    assert main(["validate", path, "--set", "EvalJob:spec.concurrency=0"]) == 1
    assert "EvalJob/e: spec.concurrency" in capsys.readouterr().err


def test_a_selector_matching_nothing_is_a_usage_error(tmp_path, capsys):
    path = _write(tmp_path, ftj_manifest("a"))
    assert main(["validate", path, "--set", "FineTuneJob/zz:spec.resources.workers=2"]) == Exit.USAGE
    assert "no FineTuneJob/zz in the files" in capsys.readouterr().err


def test_set_spans_all_the_files_of_a_run(tmp_path, capsys):
    first = _write(tmp_path, ftj_manifest("a"), name="a.yaml")
    second = _write(tmp_path, evj_manifest("e"), name="e.yaml")
    assert main(["validate", first, second, "--set", "EvalJob/e:spec.concurrency=0"]) == 1
    err = capsys.readouterr().err
    assert f"{second} EvalJob/e: spec.concurrency" in err and first not in err


def test_crds_into_an_unwritable_place_is_an_error_on_stderr(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["crds", "--output", str(blocker / "crds")]) == Exit.USAGE
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: --output {blocker / 'crds'}:") and captured.out == ""
