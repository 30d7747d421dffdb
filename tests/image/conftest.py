"""Fixtures for the image tests: the `operator` image built from this source (scripts/build_image.py), run
without Docker (scripts/run_image.py) with the container settings the chart renders, against the fake API."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator

import psutil
import pytest
import yaml
from imagerun import HELM, ROOT, Rendered, RunningOperator

import build_image
from run_image import Container, ImageConfig
from support.harness import Cluster, eventually, free_port, start_api

KUBECONFIG_IN_POD = "/var/run/secrets/kubetune/kubeconfig"
LOCAL_REPOSITORY = build_image.TARGETS["operator"].image.rsplit(":", 1)[0]


@pytest.fixture(scope="session")
def image() -> str:
    """The operator image, rebuilt when the source changed since it was built."""
    return build_image.build("operator", if_changed=True)


@pytest.fixture(scope="session")
def config(image: str) -> ImageConfig:
    return ImageConfig.of(image)


@pytest.fixture(scope="session")
def rendered() -> Rendered:
    """`helm template` of the chart: the image repository set to the local build (its tag left to the chart's
    appVersion), ports that are free on this host, and a kubeconfig through `operator.extraEnv`."""
    metrics_port, health_port = free_port(), free_port()
    values = {"image": {"repository": LOCAL_REPOSITORY}, "metrics": {"port": metrics_port},
              "healthPort": health_port,
              "operator": {"extraEnv": [{"name": "KUBECONFIG", "value": KUBECONFIG_IN_POD}]}}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(values, file)
        file.flush()
        out = subprocess.run([str(HELM), "template", "kt", str(ROOT / "charts" / "kubetune"), "--namespace",
                              "kubetune-system", "--values", file.name], text=True, capture_output=True,
                             check=True, timeout=60).stdout
    deployment = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return Rendered(pod, container, metrics_port, health_port)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    api, kubeconfig = start_api(tmp_path_factory.mktemp("fakekube"))
    try:
        yield Cluster(api, kubeconfig)
    finally:
        api.stop()


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[Container]:
    with Container(image) as working:
        yield working


@pytest.fixture(scope="module")
def operator(container: Container, cluster: Cluster, rendered: Rendered,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningOperator]:
    """The image's entrypoint with the chart's args and env, its root filesystem read-only and /tmp a tmpfs
    (the chart's emptyDir), the fake API's kubeconfig bound where KUBECONFIG points."""
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    mounts = [m["mountPath"] for m in rendered.container.get("volumeMounts", [])]
    with log_path.open("ab") as log:
        launcher = container.popen(rendered.container.get("args", []), env=rendered.env,
                                   binds={str(cluster.kubeconfig): KUBECONFIG_IN_POD}, tmpfs=tuple(mounts),
                                   read_only=rendered.container["securityContext"]["readOnlyRootFilesystem"],
                                   stdout=log, stderr=subprocess.STDOUT)
    running = RunningOperator(launcher, rendered, log_path)
    try:
        eventually(running.healthy, timeout=60, what=f"the operator container's /healthz (log: {log_path})")
        yield running
    finally:
        if launcher.poll() is None:
            try:
                running.process.terminate()
                launcher.wait(20)
            except (psutil.Error, ValueError, subprocess.TimeoutExpired):
                launcher.kill()
                launcher.wait(10)
