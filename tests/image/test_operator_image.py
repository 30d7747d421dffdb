"""The `operator` image, built from the Dockerfile (`make image-operator`) and run as the chart runs it.

Run by name (`make test-image`, marker `image`): the build needs root, buildah and mmdebstrap, and takes a
minute or more when the source changed. The container runs without Docker (scripts/run_image.py): the
image's own user, env and entrypoint, the chart's args and env, a read-only root filesystem, no
capabilities, the host's network; the fake API plays the cluster and KubeRay.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from imagerun import Rendered, RunningOperator, requires_buildah
from packaging.utils import canonicalize_name

from factories import ftj_manifest
from kubetune.operator import kube
from run_image import Container, ImageConfig
from support.harness import Cluster, eventually

pytestmark = [pytest.mark.image, requires_buildah]

# What the operator image must never contain (nor import): the trainer's and serving's stack.
ML = {"torch", "ray", "deepspeed", "vllm", "transformers", "accelerate", "tokenizers", "safetensors", "triton",
      "flash-attn", "datasets", "numpy"}
RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "viggo-train-x7k2p"}
SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": "2026-11-22T10:00:00Z"}


def owned_by(obj: dict, owner: dict) -> bool:
    return any(r["uid"] == owner["metadata"]["uid"] and r.get("controller")
               for r in obj["metadata"].get("ownerReferences", []))


# -- the image -------------------------------------------------------------------------------------


def test_the_image_is_the_one_the_chart_names(image: str, rendered: Rendered) -> None:
    """The chart's image tag defaults to its appVersion, which is the version the image is built at."""
    assert rendered.container["image"] == image


def test_the_image_user_is_numeric_non_root_and_the_charts(config: ImageConfig, rendered: Rendered) -> None:
    uid, _, gid = config.user.partition(":")
    assert uid.isdigit() and gid.isdigit(), "a numeric USER lets the kubelet verify runAsNonRoot"
    assert int(uid) != 0 and int(gid) != 0
    context = rendered.pod["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid))


def test_the_image_holds_no_ml_package(container: Container) -> None:
    freeze = container.run(command=["python", "-m", "pip", "freeze", "--all"], env={"PIP_NO_CACHE_DIR": "1"})
    assert freeze.returncode == 0, freeze.stderr
    installed = {canonicalize_name(re.split(r"[=@ ]", line, maxsplit=1)[0])
                 for line in freeze.stdout.splitlines() if line and not line.startswith("#")}
    assert {"kopf", "kubernetes", "prometheus-client", "kubetune"} <= installed
    assert not installed & ML, installed & ML


def test_the_operator_imports_no_ml_framework(container: Container) -> None:
    """What `kubetune-operator` imports (its entry module and the handlers it registers), in the image."""
    probe = ("import importlib.util, json, sys\n"
             "import kubetune.operator.__main__, kubetune.operator.handlers, kopf\n"
             f"ml = {sorted(ML)!r}\n"
             "print(json.dumps({'loaded': sorted({m.split('.')[0] for m in sys.modules}),\n"
             "                  'findable': [m for m in ml if importlib.util.find_spec(m.replace('-', '_'))]}))\n")
    result = container.run(command=["python", "-c", probe])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "kopf" in report["loaded"] and "kubernetes" in report["loaded"]
    assert not set(report["loaded"]) & {m.replace("-", "_") for m in ML}
    assert report["findable"] == []


# -- the running operator --------------------------------------------------------------------------


def test_the_operator_process_runs_as_the_image_user(operator: RunningOperator, config: ImageConfig) -> None:
    uid, _, gid = config.user.partition(":")
    process = operator.process
    assert "kubetune-operator" in " ".join(process.cmdline())
    assert set(process.uids()) == {int(uid)} and set(process.gids()) == {int(gid)}
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                  if ":\t" in line)
    assert status["NSpid"].split()[-1] == "1", "the entrypoint is the container's PID 1"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0


def test_the_running_operator_has_no_ml_library_mapped(operator: RunningOperator) -> None:
    maps = Path(f"/proc/{operator.process.pid}/maps").read_text()
    assert "site-packages/kopf" not in maps  # pure Python: nothing of it is mapped ...
    assert "site-packages" in maps  # ... but compiled extensions are (pydantic-core, yarl, ...)
    assert not re.search(r"site-packages/(torch|ray|deepspeed|vllm|numpy)", maps)


def test_it_serves_healthz_on_the_charts_health_port(operator: RunningOperator, rendered: Rendered) -> None:
    assert f"--liveness=http://0.0.0.0:{rendered.health_port}/healthz" in rendered.container["args"]
    status, _, _ = operator.get(rendered.health_port, "/healthz")
    assert status == 200


def test_it_serves_prometheus_metrics_on_the_charts_metrics_port(operator: RunningOperator, rendered: Rendered,
                                                                  cluster: Cluster) -> None:
    assert f"--metrics-port={rendered.metrics_port}" in rendered.container["args"]
    cluster.create_ftj(ftj_manifest("metrics", "image-metrics")["spec"], "metrics", "image-metrics")
    cluster.wait_rayjob("metrics-train", "image-metrics")

    def scraped() -> str | None:
        status, content_type, body = operator.get(rendered.metrics_port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        return body if re.search(r'^kubetune_api_requests_total\{verb="POST"\} [1-9]', body, re.MULTILINE) else None

    body = eventually(scraped, timeout=30, what="the operator's POST requests counted in /metrics")
    phases = dict(re.findall(r'^kubetune_finetunejobs\{phase="(\w+)"\} (\S+)$', body, re.MULTILINE))
    assert sum(float(v) for v in phases.values()) >= 1
    assert "# TYPE kubetune_reconcile_duration_seconds histogram" in body


def test_it_reconciles_a_finetunejob(operator: RunningOperator, cluster: Cluster) -> None:
    job = cluster.create_ftj(ftj_manifest("viggo", "default")["spec"], "viggo", "default")
    rayjob = cluster.wait_rayjob("viggo-train", "default")
    config = cluster.kube.get(kube.Ref("v1", "ConfigMap", "default", "viggo-trainer-config"))
    assert owned_by(rayjob, job) and owned_by(config, job)
    pending = cluster.wait_phase("Pending", timeout=30)
    assert pending["children"]["rayJob"] == "viggo-train"
    cluster.report_rayjob(**RUNNING)
    assert cluster.wait_phase("Running", timeout=30)["children"]["rayCluster"] == "viggo-train-x7k2p"
    cluster.report_rayjob(**SUCCEEDED)
    done = cluster.wait_phase("Succeeded", timeout=30)
    assert done["completionTime"] == "2026-11-22T10:00:00Z"
    assert cluster.condition("Ready")["status"] == "True"


def test_it_stops_on_sigterm(operator: RunningOperator) -> None:
    """The kubelet stops a pod with SIGTERM to PID 1: the operator must handle it (PID 1 ignores what it
    does not handle) and exit on its own well within the default 30 s grace period."""
    operator.process.send_signal(signal.SIGTERM)
    assert operator.launcher.wait(25) == 0, operator.log()
