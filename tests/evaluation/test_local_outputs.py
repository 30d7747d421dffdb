"""`kubetune run` writes only under `--output` (default `runs/`): a local `spec.output.uri` (a path or
file://, of a FineTuneJob, its spec.evaluation, or an EvalJob) that resolves elsewhere (absolute, `..`, a
symlink out) is refused before anything runs, unless `--allow-outside-output`.

In process, without training: the run's trainer and evaluator entry points are replaced by recorders where a
test gets past the check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from factories import evj_manifest, ftj_manifest
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob
from kubetune.cli import check_outputs, load_manifests, main
from kubetune.contract.storage import OutputOutsideRoot, local_output
from kubetune.serving import local as serving_local
from kubetune.trainer import local as trainer_local

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with runs/ in it and a folder next to it that a manifest must not reach."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    return tmp_path


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """The trainer's and the evaluator's local entry points, recording their calls instead of running."""
    calls: list[tuple[str, dict[str, Any]]] = []

    def run_local(jobs: list[FineTuneJob], root: Path, **kwargs: Any) -> int:
        calls.append(("train", {"jobs": [j.metadata.name for j in jobs], "root": root, **kwargs}))
        return 0

    def run_eval_local(jobs: list[EvalJob], trained: Any, root: Path, **kwargs: Any) -> int:
        calls.append(("evaluate", {"jobs": [j.metadata.name for j in jobs], "root": root, **kwargs}))
        return 0

    monkeypatch.setattr(trainer_local, "run_local", run_local)
    monkeypatch.setattr(serving_local, "run_eval_local", run_eval_local)
    return calls


def write(path: Path, *docs: dict[str, Any]) -> str:
    for doc in docs:
        doc["metadata"].pop("namespace", None)
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def ftj_to(uri: str, **paths: Any) -> dict[str, Any]:
    return ftj_manifest("tune", spec__output={"uri": uri}, **paths)


def evj_to(uri: str) -> dict[str, Any]:
    return evj_manifest("judge", spec__output={"uri": uri})


# -- where a local output may resolve ----------------------------------------------------------------


@pytest.mark.parametrize("uri", ["runs/tune", "runs", "./runs/a/../b", "RUNS_ABS/x", "file://RUNS_ABS/x",
                                 "runs/inner-link/x"])
def test_a_local_output_under_the_output_directory_is_allowed(here: Path, uri: str) -> None:
    (here / "runs" / "a").mkdir()
    (here / "runs" / "inner-link").symlink_to(here / "runs" / "a")
    uri = uri.replace("RUNS_ABS", str(here / "runs"))
    path = local_output(uri, Path("runs"))
    assert path is not None and path.is_relative_to(here / "runs") and path.is_absolute()


@pytest.mark.parametrize("uri", ["elsewhere/x", "runs/../elsewhere", "runs/a/../../elsewhere", "/etc/kubetune",
                                 "file:///etc/kubetune", "file://localhost/etc/kubetune", "runs/link-out/x",
                                 "runsx/y"])
def test_a_local_output_outside_the_output_directory_is_refused(here: Path, uri: str) -> None:
    (here / "runs" / "a").mkdir()
    (here / "runs" / "link-out").symlink_to(here / "elsewhere")
    with pytest.raises(OutputOutsideRoot, match=r"^spec\.output\.uri .* outside the output directory .*"
                                                r"--allow-outside-output"):
        local_output(uri, Path("runs"))
    assert local_output(uri, Path("runs"), allow_outside=True) is not None


@pytest.mark.parametrize("uri", ["s3://bucket/run", "gs://bucket/run", "pvc://claim/run"])
def test_a_remote_output_is_not_a_local_path(here: Path, uri: str) -> None:
    assert local_output(uri, Path("runs")) is None


def test_a_file_uri_naming_another_host_is_refused(here: Path) -> None:
    with pytest.raises(OutputOutsideRoot, match="file:// URIs must name a local path"):
        local_output("file://other-host/runs/x", Path("runs"))


def test_the_output_directory_itself_may_be_a_symlink(here: Path) -> None:
    (here / "real-runs").mkdir()
    (here / "runs-link").symlink_to(here / "real-runs")
    assert local_output("runs-link/tune", Path("runs-link")) == here / "real-runs" / "tune"


# -- where the trainer and the evaluator write ---------------------------------------------------------


def test_the_trainer_writes_to_a_local_output_uri_else_to_a_folder_of_its_name(here: Path) -> None:
    assert trainer_local.output_dir(FineTuneJob.from_body(ftj_to("runs/custom")), Path("runs")) == \
        here / "runs" / "custom"
    assert trainer_local.output_dir(FineTuneJob.from_body(ftj_to("s3://b/p")), Path("runs")) == Path("runs/tune")
    with pytest.raises(OutputOutsideRoot):
        trainer_local.output_dir(FineTuneJob.from_body(ftj_to("elsewhere/x")), Path("runs"))
    assert trainer_local.output_dir(FineTuneJob.from_body(ftj_to("elsewhere/x")), Path("runs"),
                                    allow_outside=True) == here / "elsewhere" / "x"


def test_the_evaluator_writes_to_a_local_output_uri_else_to_a_folder_of_its_name(here: Path) -> None:
    assert serving_local.output_dir(EvalJob.from_body(evj_to("runs/report")), Path("runs")) == \
        (here / "runs" / "report", None)
    out, note = serving_local.output_dir(EvalJob.from_body(evj_to("s3://b/eval")), Path("runs"))
    assert out == Path("runs/judge") and note is not None and "not a local path" in note
    with pytest.raises(OutputOutsideRoot):
        serving_local.output_dir(EvalJob.from_body(evj_to("../x")), Path("runs"))


# -- `kubetune run` ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("docs", "named"), [
    ([ftj_to("elsewhere/x")], "FineTuneJob/tune: spec.output.uri 'elsewhere/x'"),
    ([ftj_to("runs/../elsewhere")], "FineTuneJob/tune: spec.output.uri 'runs/../elsewhere'"),
    ([evj_to("/tmp/kubetune-outside")], "EvalJob/judge: spec.output.uri '/tmp/kubetune-outside'"),
    ([ftj_to("runs/tune", spec__evaluation={"dataset": {"uri": "test.jsonl", "reference": "{mr}"},
                                            "scorer": {"name": "viggo"}, "baselinePrompt": {"template": "{ref}"},
                                            "output": {"uri": "elsewhere/eval"}})],
     "FineTuneJob/tune: spec.evaluation.output.uri 'elsewhere/eval'"),
], ids=["finetunejob", "finetunejob-dotdot", "evaljob", "finetunejob-evaluation"])
def test_kubetune_run_refuses_an_output_outside_before_anything_runs(
        here: Path, docs: list[dict[str, Any]], named: str, recorded: list[Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", write(here / "jobs.yaml", *docs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named} resolves to ") and "--allow-outside-output" in err
    assert recorded == []  # nothing trained, nothing evaluated
    assert list((here / "elsewhere").iterdir()) == []


def test_kubetune_run_refuses_a_symlink_out_of_the_output_directory(
        here: Path, recorded: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    (here / "runs" / "link").symlink_to(here / "elsewhere")
    assert main(["run", write(here / "jobs.yaml", evj_to("runs/link/report"))]) == 2
    assert f"resolves to {here / 'elsewhere' / 'report'}, outside" in capsys.readouterr().err
    assert recorded == []


def test_kubetune_run_with_allow_outside_output_passes_it_on(here: Path, recorded: list[Any]) -> None:
    path = write(here / "jobs.yaml", ftj_to("elsewhere/x"), evj_to(str(here / "elsewhere" / "r")))
    assert main(["run", path, "--output", "runs", "--allow-outside-output"]) == 0
    assert [(what, call["allow_outside"]) for what, call in recorded] == [("train", True), ("evaluate", True)]


def test_kubetune_run_inside_the_output_directory_runs_with_the_default(here: Path, recorded: list[Any]) -> None:
    assert main(["run", write(here / "jobs.yaml", ftj_to("runs/tune"), evj_to("file://" + str(here / "runs/r")))]) == 0
    assert [(what, call["root"], call["allow_outside"]) for what, call in recorded] == [
        ("train", Path("runs"), False), ("evaluate", Path("runs"), False)]


def test_the_demo_writes_under_the_default_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make demo` runs `kubetune run examples/demo/*.yaml --output runs` from the repository root."""
    monkeypatch.chdir(REPO)
    jobs = [j for f in ("finetunejob.yaml", "evaljob.yaml") for j in load_manifests(REPO / "examples" / "demo" / f)]
    check_outputs([j for j in jobs if isinstance(j, FineTuneJob)], [j for j in jobs if isinstance(j, EvalJob)],
                  Path("runs"), allow_outside=False)


@pytest.mark.parametrize("uri", ["pvc://claim/eval", "s3://bucket/eval", "runs/report"])
def test_a_local_evaluation_publishes_only_where_it_writes(here: Path, uri: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.contract.evalplan import plan
    from kubetune.serving.evaluate import publish

    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(here / "elsewhere"))  # where pvc://claim/... would land
    job = EvalJob.from_body(evj_manifest("judge", spec__output={"uri": uri}, spec__candidates=[
        {"name": "ep", "model": {"endpoint": {"url": "http://127.0.0.1:9/v1", "model": "m"}},
         "prompt": {"template": "{ref}"}}]))
    out, _ = serving_local.output_dir(job, Path("runs"))
    evaluation = serving_local.published_to(plan(job, {}, {}, {}), out)
    assert evaluation.spec.output.uri == str(out)
    out.mkdir(parents=True)
    (out / "results.json").write_text("{}")
    publish(out, evaluation.spec.output.uri)  # what the evaluator does last: nothing is copied anywhere
    assert list((here / "elsewhere").iterdir()) == [] and out.resolve().is_relative_to(here / "runs")
