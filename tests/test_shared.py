"""support.shared: ../shared-dependent tests skip where it is absent, and fail instead under CI=true."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import harness, shared


@pytest.fixture
def empty_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ../shared with nothing in it."""
    monkeypatch.setattr(shared, "SHARED", tmp_path)
    return tmp_path


@pytest.fixture
def not_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)


@pytest.fixture
def ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")


@pytest.mark.parametrize("mode", ["not_ci", "ci"])
def test_a_present_file_is_returned_in_either_mode(request: pytest.FixtureRequest, empty_shared: Path,
                                                   mode: str) -> None:
    request.getfixturevalue(mode)
    (empty_shared / "datasets").mkdir()
    data = empty_shared / "datasets" / "viggo.csv"
    data.write_text("ref,mr\n")
    assert shared.require(data, "viggo is not checked") == data
    assert shared.available(data, "viggo is not checked")


@pytest.mark.usefixtures("not_ci")
def test_an_absent_file_skips_with_a_clear_reason(empty_shared: Path) -> None:
    with pytest.raises(pytest.skip.Exception) as skipped:
        shared.require(empty_shared / "datasets" / "viggo" / "train.csv", "length grouping is not measured")
    assert str(skipped.value) == "../shared/datasets/viggo/train.csv is absent: length grouping is not measured"


@pytest.mark.usefixtures("ci")
def test_an_absent_file_fails_under_ci_with_the_same_reason(empty_shared: Path) -> None:
    with pytest.raises(pytest.fail.Exception) as failed:
        shared.require(empty_shared / "datasets" / "viggo" / "train.csv", "length grouping is not measured")
    assert str(failed.value).startswith(
        "../shared/datasets/viggo/train.csv is absent: length grouping is not measured (CI=true")


@pytest.mark.parametrize("value", ["", "false", "0"])
def test_only_ci_true_means_ci(monkeypatch: pytest.MonkeyPatch, empty_shared: Path, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception):
        shared.require(empty_shared / "kuberay-crds", "no KubeRay schema")


@pytest.mark.usefixtures("not_ci")
def test_the_harness_falls_back_to_a_stand_in_crd_outside_ci(empty_shared: Path) -> None:
    assert not shared.available(shared.kuberay_crd_path("rayjobs"), "no KubeRay schema")
    assert harness._kuberay_crd("rayjobs") is None  # start_api then installs the schemaless stand-in


@pytest.mark.usefixtures("ci")
def test_the_harness_fallback_fails_under_ci(empty_shared: Path) -> None:
    with pytest.raises(pytest.fail.Exception) as failed:
        harness._kuberay_crd("rayjobs")
    assert str(failed.value).startswith("../shared/kuberay-crds/ray.io_rayjobs.yaml is absent: ")


@pytest.mark.usefixtures("ci")
def test_kuberay_crd_fails_under_ci_where_absent(empty_shared: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"^\.\./shared/kuberay-crds/ray\.io_rayservices\.yaml is absent"):
        shared.kuberay_crd("rayservices")
