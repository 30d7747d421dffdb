"""`kubetune report <target>`: an EvalJob's report.html fetched from its output store (a local S3, moto's server
over HTTP) via the Kubernetes API (the fake, over HTTP), from an output URI, or from a local run's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.finetunejob import FineTuneJob
from kubetune.cli import main
from kubetune.operator import evalbuilders
from support.kubecli import FakeCluster
from support.s3 import LocalS3

BUCKET = "kubetune-reports"
PAGE = b"<!doctype html><title>viggo-eval</title><p>fine-tuned 0.91 vs base 0.12</p>"
WRITTEN = {"phase": "Succeeded", "report": {"uri": f"s3://{BUCKET}/viggo/eval/report.html",
                                            "resultsUri": f"s3://{BUCKET}/viggo/eval/results.json"}}


def report(fake: FakeCluster | None, target: str, to: Path) -> int:
    kube = ["--kubeconfig", str(fake.kubeconfig)] if fake is not None else []
    return main(["report", target, "--to", str(to), *kube])


def evaljob_with_report(fake: FakeCluster, s3: LocalS3, name: str = "viggo-eval", prefix: str = "viggo/eval",
                        **paths: object) -> dict:
    job = fake.create_evj(name, spec__output={"uri": f"s3://{BUCKET}/{prefix}"}, **paths)
    s3.client.put_object(Bucket=BUCKET, Key=f"{prefix}/report.html", Body=PAGE)
    fake.job_status(job, {**WRITTEN, "report": {"uri": f"s3://{BUCKET}/{prefix}/report.html"}})
    return job


def test_fetches_the_report_and_prints_its_path(fake_cluster: FakeCluster, s3: LocalS3, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    evaljob_with_report(fake_cluster, s3)
    assert report(fake_cluster, "viggo-eval", tmp_path / "reports") == 0
    out, err = capsys.readouterr()
    path = tmp_path / "reports" / fake_cluster.namespace / "viggo-eval" / "report.html"
    assert out == f"{path}\n" and path.read_bytes() == PAGE
    assert f"s3://{BUCKET}/viggo/eval/report.html" in err


def test_a_report_is_fetched_again_not_cached(fake_cluster: FakeCluster, s3: LocalS3, tmp_path: Path) -> None:
    evaljob_with_report(fake_cluster, s3)
    assert report(fake_cluster, "evaljob/viggo-eval", tmp_path) == 0
    s3.client.put_object(Bucket=BUCKET, Key="viggo/eval/report.html", Body=b"<p>rerun</p>")
    assert report(fake_cluster, "evaljob/viggo-eval", tmp_path) == 0
    assert (tmp_path / fake_cluster.namespace / "viggo-eval" / "report.html").read_bytes() == b"<p>rerun</p>"


def test_the_report_is_read_from_the_spec_not_from_where_the_status_points(
        fake_cluster: FakeCluster, s3: LocalS3, tmp_path: Path) -> None:
    """The status is written by the evaluator's pod: a report.uri there naming another object or a file
    on this machine is not what is fetched."""
    job = evaljob_with_report(fake_cluster, s3)
    secret = tmp_path / "secret.html"
    secret.write_text("<p>a file of the user running kubetune report</p>")
    fake_cluster.job_status(job, {"report": {"uri": f"file://{secret}"}})
    assert report(fake_cluster, "viggo-eval", tmp_path / "reports") == 0
    assert (tmp_path / "reports" / fake_cluster.namespace / "viggo-eval" / "report.html").read_bytes() == PAGE


EVALUATION = {"dataset": {"uri": "s3://bucket/viggo/test.jsonl", "reference": "{mr}"}, "scorer": {"name": "viggo"},
              "baselinePrompt": {"template": "Sentence: {ref}\nMeaning representation:", "fewShot": {"k": 3}},
              "output": {"uri": f"s3://{BUCKET}/ftj/eval"}}


def test_the_report_of_a_finetunejobs_evaluation(fake_cluster: FakeCluster, s3: LocalS3, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ftj = FineTuneJob.from_body(fake_cluster.create_ftj("viggo", spec__evaluation=EVALUATION))
    evaljob = fake_cluster.create(  # the EvalJob the operator makes for spec.evaluation, owned by the job
        f"/apis/kubetune.io/v1alpha1/namespaces/{fake_cluster.namespace}/evaljobs",
        evalbuilders.evaluation_evaljob(ftj, "meta-llama/Llama-2-7b-hf"))
    s3.client.put_object(Bucket=BUCKET, Key="ftj/eval/report.html", Body=PAGE)
    fake_cluster.job_status(evaljob, WRITTEN)
    assert report(fake_cluster, "ftj/viggo", tmp_path) == 0
    assert Path(capsys.readouterr().out.strip()).read_bytes() == PAGE


def test_an_evaljob_of_the_name_not_made_by_the_finetunejob_is_refused(
        fake_cluster: FakeCluster, s3: LocalS3, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_cluster.create_ftj("viggo", spec__evaluation=EVALUATION)
    evaljob_with_report(fake_cluster, s3)  # a user's own EvalJob named like the one the FineTuneJob would make
    assert report(fake_cluster, "ftj/viggo", tmp_path) == 4
    assert "is not controlled by FineTuneJob" in capsys.readouterr().err


def test_no_report_yet_is_not_found_with_the_phase(fake_cluster: FakeCluster, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    job = fake_cluster.create_evj("viggo-eval")
    fake_cluster.job_status(job, {"phase": "Evaluating"})
    assert report(fake_cluster, "viggo-eval", tmp_path) == 4
    assert f"EvalJob {fake_cluster.namespace}/viggo-eval has no report yet (phase Evaluating)" in \
        capsys.readouterr().err


def test_a_failed_evaljob_without_a_report_points_at_its_logs(fake_cluster: FakeCluster, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    job = fake_cluster.create_evj("viggo-eval")
    fake_cluster.job_status(job, {"phase": "Failed", "conditions": [
        {"type": "Failed", "status": "True", "reason": "EvaluationFailed", "message": "m",
         "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
    assert report(fake_cluster, "viggo-eval", tmp_path) == 4
    assert "failed (EvaluationFailed) without a report: see kubetune logs evaljob/viggo-eval" in \
        capsys.readouterr().err


def test_a_report_missing_from_the_store_is_not_found(fake_cluster: FakeCluster, s3: LocalS3, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    job = fake_cluster.create_evj("viggo-eval", spec__output={"uri": f"s3://{BUCKET}/gone"})
    fake_cluster.job_status(job, WRITTEN)
    assert report(fake_cluster, "viggo-eval", tmp_path) == 4
    assert f"s3://{BUCKET}/gone/report.html does not exist" in capsys.readouterr().err


def test_an_unknown_evaljob_is_not_found(fake_cluster: FakeCluster, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert report(fake_cluster, "evaljob/nope", tmp_path) == 4
    assert f"no EvalJob 'nope' in namespace {fake_cluster.namespace}" in capsys.readouterr().err


def test_a_pvc_output_is_read_where_the_claim_is_mounted(fake_cluster: FakeCluster, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "mnt"))
    (tmp_path / "mnt" / "results" / "eval").mkdir(parents=True)
    (tmp_path / "mnt" / "results" / "eval" / "report.html").write_bytes(PAGE)
    job = fake_cluster.create_evj("viggo-eval", spec__output={"uri": "pvc://results/eval"})
    fake_cluster.job_status(job, WRITTEN)
    assert report(fake_cluster, "viggo-eval", tmp_path / "reports") == 0
    assert (tmp_path / "reports" / fake_cluster.namespace / "viggo-eval" / "report.html").read_bytes() == PAGE


def test_a_pvc_output_not_mounted_here_is_unavailable(fake_cluster: FakeCluster, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "mnt"))
    job = fake_cluster.create_evj("viggo-eval", spec__output={"uri": "pvc://results/eval"})
    fake_cluster.job_status(job, WRITTEN)
    assert report(fake_cluster, "viggo-eval", tmp_path) == 5
    assert "PersistentVolumeClaim 'results' is not mounted" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- without a cluster


def test_an_output_uri_is_fetched_directly(s3: LocalS3, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s3.client.put_object(Bucket=BUCKET, Key="direct/eval/report.html", Body=PAGE)
    assert report(None, f"s3://{BUCKET}/direct/eval", tmp_path) == 0
    path = tmp_path / "eval" / "report.html"
    assert capsys.readouterr().out == f"{path}\n" and path.read_bytes() == PAGE


def test_a_local_output_folder_gives_its_report_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "viggo-eval").mkdir(parents=True)
    (tmp_path / "runs" / "viggo-eval" / "report.html").write_bytes(PAGE)
    assert main(["report", "runs/viggo-eval"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'runs' / 'viggo-eval' / 'report.html'}\n"
    assert not (tmp_path / "reports").exists()


def test_a_local_folder_without_a_report_is_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    assert main(["report", f"{tmp_path}/out"]) == 4
    assert f"no report.html in {tmp_path / 'out'}" in capsys.readouterr().err
