"""`kubetune logs <job>`: the driver's log through the Kubernetes API (the fake, over HTTP), found from the
job by owner references: job -> RayJob (deterministic name, controlled by the job) -> KubeRay's submitter
Job -> its pod, or -> RayCluster -> head pod."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kubetune.cli import cluster as cli_cluster
from kubetune.cli import main
from kubetune.operator import builders
from support.fakekube import FakeKubeAPI
from support.kubecli import FakeCluster

DRIVER = "epoch 1: train loss 1.23\nepoch 2: train loss 0.98\n"


def logs(fake: FakeCluster, *args: str) -> int:
    return main(["logs", *args, "--kubeconfig", str(fake.kubeconfig)])


def running_ftj(fake: FakeCluster, name: str = "viggo") -> tuple[dict, dict]:
    job = fake.create_ftj(name)
    return job, fake.operator_rayjob(job)


def test_prints_the_submitter_pods_log(fake_cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    _, rayjob = running_ftj(fake_cluster)
    started = fake_cluster.kuberay_starts(rayjob)
    fake_cluster.log(started.submitter_pod, DRIVER)
    fake_cluster.log(started.head_pod, "ray start --head\n")
    assert logs(fake_cluster, "viggo") == 0
    out, err = capsys.readouterr()
    assert out == DRIVER
    assert f"submitter pod {started.submitter_pod['metadata']['name']}, container ray-job-submitter" in err


def test_an_evaljobs_log_is_its_evaluation_rayjobs(fake_cluster: FakeCluster,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rayjob = fake_cluster.operator_rayjob(fake_cluster.create_evj("viggo-eval"))
    assert rayjob["metadata"]["name"] == "viggo-eval-eval"
    started = fake_cluster.kuberay_starts(rayjob)
    fake_cluster.log(started.submitter_pod, "evaluating 2 candidate(s)\n")
    assert logs(fake_cluster, "evaljob/viggo-eval") == 0
    assert capsys.readouterr().out == "evaluating 2 candidate(s)\n"


def test_a_long_job_name_finds_the_operators_shortened_rayjob(fake_cluster: FakeCluster,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    name = "a-fine-tune-job-with-a-name-long-enough-to-be-shortened"
    _, rayjob = running_ftj(fake_cluster, name)
    assert rayjob["metadata"]["name"] != f"{name}-train" and len(rayjob["metadata"]["name"]) <= 47
    fake_cluster.log(fake_cluster.kuberay_starts(rayjob).submitter_pod, DRIVER)
    assert logs(fake_cluster, f"ftj/{name}") == 0
    assert capsys.readouterr().out == DRIVER


def test_head_prints_the_ray_head_pods_log(fake_cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    _, rayjob = running_ftj(fake_cluster)
    started = fake_cluster.kuberay_starts(rayjob)
    fake_cluster.log(started.submitter_pod, DRIVER)
    fake_cluster.log(started.head_pod, "ray start --head\n")
    assert logs(fake_cluster, "ftj/viggo", "--head") == 0
    assert capsys.readouterr().out == "ray start --head\n"


def test_without_a_submitter_pod_the_head_pods_log_is_shown(fake_cluster: FakeCluster,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, rayjob = running_ftj(fake_cluster)
    started = fake_cluster.kuberay_starts(rayjob, submitter=False)
    fake_cluster.log(started.head_pod, "ray start --head\n")
    assert logs(fake_cluster, "viggo") == 0
    out, err = capsys.readouterr()
    assert out == "ray start --head\n" and "head pod" in err


def test_clusters_whose_jobs_set_only_the_old_job_name_label_are_read(fake_cluster: FakeCluster,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, rayjob = running_ftj(fake_cluster)
    _, pod = fake_cluster.submitter(rayjob, labels=("job-name",))
    fake_cluster.log(pod, DRIVER)
    assert logs(fake_cluster, "viggo") == 0
    assert capsys.readouterr().out == DRIVER


def test_tail_keeps_the_last_lines(fake_cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    _, rayjob = running_ftj(fake_cluster)
    fake_cluster.log(fake_cluster.kuberay_starts(rayjob).submitter_pod, DRIVER)
    assert logs(fake_cluster, "viggo", "--tail", "1") == 0
    assert capsys.readouterr().out == "epoch 2: train loss 0.98\n"


# --------------------------------------------------------------------------------------------- whose pods


def test_names_in_the_jobs_status_are_not_followed(fake_cluster: FakeCluster,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The job's status is writable by its own pods: a RayJob it names is not read for that."""
    job, rayjob = running_ftj(fake_cluster)
    fake_cluster.log(fake_cluster.kuberay_starts(rayjob).submitter_pod, DRIVER)
    _other, other_rayjob = running_ftj(fake_cluster, "other")
    fake_cluster.log(fake_cluster.kuberay_starts(other_rayjob).submitter_pod, "OTHER JOB'S LOG\n")
    fake_cluster.job_status(job, {"children": {"rayJob": other_rayjob["metadata"]["name"]}})
    assert logs(fake_cluster, "viggo") == 0
    assert capsys.readouterr().out == DRIVER


def test_a_rayjob_of_the_name_not_controlled_by_the_job_is_refused(fake_cluster: FakeCluster,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    job = fake_cluster.create_ftj("viggo")
    stranger = fake_cluster.create_ftj("stranger")
    impostor = fake_cluster.operator_rayjob(  # the name viggo's would have, controlled by another job
        stranger, name=builders.child_name("viggo", "train", builders.MAX_RAYJOB_NAME))
    fake_cluster.log(fake_cluster.submitter(impostor)[1], "NOT VIGGO'S\n")
    assert job["metadata"]["uid"] != stranger["metadata"]["uid"]
    assert logs(fake_cluster, "viggo") == 4
    out, err = capsys.readouterr()
    assert out == "" and f"is not controlled by FineTuneJob {fake_cluster.namespace}/viggo" in err


def test_a_pod_with_the_submitter_label_but_another_controller_is_not_read(
        fake_cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    """A newer pod labelled job-name=<the RayJob> but made by another Job (a tenant's, say) is left alone."""
    _, rayjob = running_ftj(fake_cluster)
    _, pod = fake_cluster.submitter(rayjob)
    fake_cluster.log(pod, DRIVER)
    name = rayjob["metadata"]["name"]
    decoy_job = fake_cluster.create(f"/apis/batch/v1/namespaces/{fake_cluster.namespace}/jobs", {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "decoy", "namespace": fake_cluster.namespace},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "x", "image": "x"}]}}}})
    time.sleep(1.1)  # creation timestamps have one-second resolution: the decoy is the newest
    decoy = fake_cluster.pod("decoy-pod", {"batch.kubernetes.io/job-name": name, "job-name": name}, decoy_job,
                             [{"name": "ray-job-submitter", "image": "x"}])
    fake_cluster.log(decoy, "DECOY\n")
    assert logs(fake_cluster, "viggo") == 0
    assert capsys.readouterr().out == DRIVER


def test_a_head_pod_of_another_cluster_is_not_read(fake_cluster: FakeCluster,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A RayCluster labelled as originating from the RayJob but not controlled by it is not followed."""
    _, rayjob = running_ftj(fake_cluster)
    _, other_rayjob = running_ftj(fake_cluster, "other")
    cluster, head = fake_cluster.ray_cluster(other_rayjob)
    fake_cluster.patch(f"/apis/ray.io/v1/namespaces/{fake_cluster.namespace}/rayclusters/{cluster['metadata']['name']}",
                       {"metadata": {"labels": {"ray.io/originated-from-cr-name": rayjob["metadata"]["name"]}}})
    fake_cluster.log(head, "OTHER CLUSTER\n")
    assert logs(fake_cluster, "viggo", "--head") == 4
    out, err = capsys.readouterr()
    assert out == "" and "no Ray head pod yet" in err


# --------------------------------------------------------------------------------------------- not there


def test_an_unknown_job_is_not_found(fake_cluster: FakeCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert logs(fake_cluster, "nope") == 4
    assert f"no FineTuneJob or EvalJob 'nope' in namespace {fake_cluster.namespace}" in capsys.readouterr().err


def test_a_job_without_a_rayjob_yet_is_not_found(fake_cluster: FakeCluster,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fake_cluster.create_ftj("viggo")
    assert logs(fake_cluster, "viggo") == 4
    assert f"FineTuneJob {fake_cluster.namespace}/viggo has no RayJob yet (phase Pending)" in capsys.readouterr().err


def test_a_pod_that_has_not_started_is_not_there_yet(fake_cluster: FakeCluster,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, rayjob = running_ftj(fake_cluster)
    _, pod = fake_cluster.submitter(rayjob, phase=None)
    assert logs(fake_cluster, "viggo") == 4
    assert f"pod {fake_cluster.namespace}/{pod['metadata']['name']} (submitter) has not started yet" in capsys.readouterr().err


def test_a_name_that_is_both_kinds_must_say_which(fake_cluster: FakeCluster,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fake_cluster.create_ftj("same")
    fake_cluster.create_evj("same")
    assert logs(fake_cluster, "same") == 2
    assert "'same' is both a FineTuneJob and an EvalJob" in capsys.readouterr().err


def test_an_unreachable_api_is_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeKubeAPI() as api:  # a kubeconfig for a server that is gone
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    assert main(["logs", "viggo", "--kubeconfig", str(kubeconfig)]) == 5
    assert "cannot reach the Kubernetes API at http://127.0.0.1:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- --follow


def test_follow_waits_for_the_pod_and_streams_until_it_ends(fake_cluster: FakeCluster,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli_cluster, "POLL_SECONDS", 0.05)
    _job, rayjob = running_ftj(fake_cluster)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(logs(fake_cluster, "viggo", "-f")), daemon=True)
    thread.start()
    time.sleep(0.3)  # no pod yet: it waits
    assert thread.is_alive()
    _, pod = fake_cluster.submitter(rayjob, phase=None)
    time.sleep(0.2)  # the pod has not started: it still waits
    fake_cluster.set_phase(pod, "Running")
    fake_cluster.log(pod, "epoch 1: train loss 1.23\n")
    time.sleep(0.3)
    fake_cluster.log(pod, "epoch 2: train loss 0.98\n")
    assert thread.is_alive()  # following the running pod
    fake_cluster.set_phase(pod, "Succeeded")
    thread.join(10)
    assert result == [0]
    out, err = capsys.readouterr()
    assert out == DRIVER and f"waiting: FineTuneJob {fake_cluster.namespace}/viggo: no submitter or Ray head pod yet" in err


def test_follow_stops_waiting_when_the_job_has_ended(fake_cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli_cluster, "POLL_SECONDS", 0.05)
    job = fake_cluster.create_ftj("viggo")
    fake_cluster.job_status(job, {"phase": "Failed"})
    assert logs(fake_cluster, "viggo", "-f") == 4
    assert "has no RayJob yet (phase Failed)" in capsys.readouterr().err
