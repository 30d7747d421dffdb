"""What a user sees with the real kubectl against the fake API while the real operator runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kubetune.api.finetunejob import BestCheckpoint, EpochResult, Progress
from kubetune.contract.progress import StatusReporter
from support.harness import ROOT, Cluster, Operator, eventually

KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
EXAMPLE = ROOT / "examples" / "viggo" / "finetunejob.yaml"
NAME = "viggo-llama-2-7b"

pytestmark = [
    pytest.mark.kubectl,
    pytest.mark.skipif(not KUBECTL.exists(), reason="run `make tools` to fetch kubectl"),
]


def kubectl(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # --cache-dir: kubectl caches discovery per host:port, and test servers reuse random ports.
    cache = cluster.kubeconfig.parent / "kubectl-cache"
    return subprocess.run([str(KUBECTL), "--kubeconfig", str(cluster.kubeconfig), "--cache-dir", str(cache), *args],
                          capture_output=True, text=True, timeout=60, check=check)


def columns(output: str) -> dict[str, str]:
    """kubectl's table as {header: cell}; cells are cut at the header offsets (they may be empty)."""
    header, row = output.rstrip("\n").splitlines()[:2]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    bounds = zip(starts, [*starts[1:], None], strict=True)
    return {header[a:b].strip(): row[a:b].strip() for a, b in bounds}


def test_apply_example_and_watch_columns_fill_in(cluster: Cluster, operator: Operator, tmp_path: Path) -> None:
    applied = kubectl(cluster, "apply", "--validate=false", "-f", str(EXAMPLE))
    assert f"finetunejob.kubetune.io/{NAME} created" in applied.stdout
    cluster.wait_rayjob(f"{NAME}-train")
    cluster.report_rayjob(f"{NAME}-train", jobDeploymentStatus="Running", jobStatus="RUNNING")
    cluster.wait_phase("Running", NAME)
    reporter = StatusReporter(server=cluster.api.url, namespace="default", name=NAME)
    reporter.progress(Progress(epoch=3, total_epochs=10, step=300, total_steps=1000, val_perplexity=1.42))
    reporter.epoch_done([EpochResult(epoch=e, train_loss=1.0 / e, val_loss=0.5, val_perplexity=p)
                         for e, p in ((1, 1.61), (2, 1.48), (3, 1.42))],
                        BestCheckpoint(uri="s3://b/epoch-3", epoch=3, val_perplexity=1.42))

    got = columns(kubectl(cluster, "get", "ftj", NAME).stdout)
    assert got["NAME"] == NAME
    assert (got["STATUS"], got["EPOCH"], got["VAL-PPL"], got["BEST-PPL"]) == ("Running", "3", "1.42", "1.42")
    assert "AGE" in got


def test_wide_output_shows_model_workers_and_rayjob(cluster: Cluster, operator: Operator) -> None:
    kubectl(cluster, "apply", "--validate=false", "-f", str(EXAMPLE))
    cluster.wait_phase("Pending", NAME)
    got = columns(kubectl(cluster, "get", "finetunejobs", "-o", "wide").stdout)
    assert (got["MODEL"], got["WORKERS"], got["RAYJOB"]) == ("meta-llama/Llama-2-7b-hf", "16", f"{NAME}-train")


def test_kubectl_wait_for_succeeded(cluster: Cluster, operator: Operator) -> None:
    kubectl(cluster, "apply", "--validate=false", "-f", str(EXAMPLE))
    cluster.wait_rayjob(f"{NAME}-train")
    waiter = subprocess.Popen([str(KUBECTL), "--kubeconfig", str(cluster.kubeconfig),
                               "--cache-dir", str(cluster.kubeconfig.parent / "kubectl-cache"), "wait",
                               "--for=condition=Succeeded", f"ftj/{NAME}", "--timeout=30s"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cluster.report_rayjob(f"{NAME}-train", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, out
    assert "condition met" in out


def test_short_name_and_category_list_the_job(cluster: Cluster, operator: Operator) -> None:
    kubectl(cluster, "apply", "--validate=false", "-f", str(EXAMPLE))
    eventually(lambda: NAME in kubectl(cluster, "get", "kubetune").stdout, what="kubectl get kubetune")
