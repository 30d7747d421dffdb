"""Test support: run the real operator (`python -m kubetune.operator`) against the fake Kubernetes API over HTTP.

The test plays the user (creating FineTuneJobs) and KubeRay (patching RayJob status).
"""

from __future__ import annotations

import builtins
import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from kubetune.operator import kube
from support import shared
from support.client import SyncKube
from support.fakekube import FakeKubeAPI

# This harness runs from a source checkout (tests, benchmarks): the repository root and ../shared.
ROOT = shared.ROOT

T = TypeVar("T")

def minimal_kuberay_crd(kind: str, plural: str) -> dict[str, Any]:
    """A schemaless stand-in CRD for a KubeRay kind, where ../shared is absent (never under CI=true):
    objects still need a home."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.ray.io"},
        "spec": {
            "group": "ray.io",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                          "schema": {"openAPIV3Schema": {"type": "object",
                                                         "x-kubernetes-preserve-unknown-fields": True}}}],
        },
    }


# Where ../shared is absent, RayJobs and RayServices still need a kind to live in.
MINIMAL_RAYJOB_CRD: dict[str, Any] = minimal_kuberay_crd("RayJob", "rayjobs")
MINIMAL_RAYSERVICE_CRD: dict[str, Any] = minimal_kuberay_crd("RayService", "rayservices")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eventually(check: Callable[[], T | None | Literal[False]], timeout: float = 15.0, interval: float = 0.05,
               what: str = "condition") -> T:
    """Poll `check` until it returns a truthy value (returned) or raises nothing; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except (AssertionError, KeyError, kube.NotFound) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def _kuberay_crd(plural: str) -> dict[str, Any] | None:
    """KubeRay's CRD from ../shared, parsed once per process (parsing is most of a fake API's start-up);
    None where ../shared is absent, which fails the calling test under CI=true (support.shared)."""
    path = shared.kuberay_crd_path(plural)
    if not shared.available(path, f"{plural} are admitted by a schemaless stand-in CRD, not KubeRay's schema"):
        return None
    crd: dict[str, Any] = shared.load_yaml(path)
    return crd


def start_api(tmp: Path, **options: Any) -> tuple[FakeKubeAPI, Path]:
    """A started fake API with kubetune's CRDs and KubeRay's RayJob and RayService CRDs, and a kubeconfig."""
    kuberay = [_kuberay_crd(plural) or minimal  # first: under CI=true, ../shared's absence fails here
               for plural, minimal in (("rayjobs", MINIMAL_RAYJOB_CRD), ("rayservices", MINIMAL_RAYSERVICE_CRD))]
    api = FakeKubeAPI(**options)
    api.start()
    api.install_crds_from_files(sorted((ROOT / "crds").glob("*.yaml")))
    for crd in kuberay:
        api.install_crd(copy.deepcopy(crd))
    kubeconfig = tmp / "kubeconfig"
    api.kubeconfig(kubeconfig)
    return api, kubeconfig


class Operator:
    """The operator as a child process; `kill()` is SIGKILL, i.e. a crash at an arbitrary point."""

    def __init__(self, kubeconfig: Path, log_path: Path, *args: str, verbose: bool = True, **env: str) -> None:
        self.kubeconfig = kubeconfig
        self.verbose = verbose
        self.log_path = log_path
        self.args = args
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_BATCH_WINDOW": "0.01",
            "KUBETUNE_WAIT_DELAY": "0.5",
            "KUBETUNE_TIMER_INTERVAL": "0.2",
            "KUBETUNE_WATCH_TIMEOUT": "60",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kubetune.operator", *(["--verbose"] if self.verbose else []),
             "--metrics-port", str(self.metrics_port),
             "--liveness", f"http://127.0.0.1:{self.liveness_port}/healthz", *self.args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        eventually(self.alive, timeout=30, what=f"operator liveness (log: {self.log_path})")
        return self

    def alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"operator exited with {self.process.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def end(self) -> None:
        """A test's teardown: SIGTERM with 1 s of grace, then SIGKILL. kopf exits at once when idle, but after a
        timer was re-spawned during its shutdown it waits 5 s for that "hung" task, which no test looks at:
        5 s per operator test (`stop()` where a test checks what the operator does while it stops)."""
        self.stop(grace=1.0)


class Cluster:
    """The test's view of the cluster: a user creating jobs and KubeRay reporting RayJob status."""

    def __init__(self, api: FakeKubeAPI, kubeconfig: Path) -> None:
        self.api = api
        self.kubeconfig = kubeconfig
        self.kube = SyncKube(api.url)

    # the user
    def create_ftj(self, spec: dict[str, Any], name: str = "viggo", namespace: str = "default") -> dict[str, Any]:
        body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        return self.kube.create(body)

    def ftj(self, name: str = "viggo", namespace: str = "default") -> dict[str, Any]:
        return self.kube.get(kube.ftj_ref(namespace, name))

    def status(self, name: str = "viggo", namespace: str = "default") -> dict[str, Any]:
        return dict(self.ftj(name, namespace).get("status") or {})

    def condition(self, type_: str, name: str = "viggo", namespace: str = "default") -> dict[str, Any]:
        return next(c for c in self.status(name, namespace).get("conditions", []) if c["type"] == type_)

    def wait_phase(self, phase: str, name: str = "viggo", namespace: str = "default",
                   timeout: float = 15.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(name, namespace)
            return status if status.get("phase") == phase else None

        result: dict[str, Any] = eventually(reached, timeout=timeout, what=f"{namespace}/{name} phase {phase}")
        return result

    # KubeRay
    def rayjob(self, name: str = "viggo-train", namespace: str = "default") -> dict[str, Any]:
        return self.kube.get(kube.rayjob_ref(namespace, name))

    def wait_rayjob(self, name: str = "viggo-train", namespace: str = "default") -> dict[str, Any]:
        return eventually(lambda: self.rayjob(name, namespace), what=f"RayJob {namespace}/{name}")

    def report_rayjob(self, name: str = "viggo-train", namespace: str = "default", **status: Any) -> None:
        generation = self.rayjob(name, namespace)["metadata"].get("generation", 1)
        self.kube.patch_status(kube.rayjob_ref(namespace, name), {"observedGeneration": generation, **status})

    def list(self, api_version: str, kind: str, namespace: str = "default") -> builtins.list[dict[str, Any]]:
        return self.kube.list(kube.Ref(api_version, kind, namespace))

    def events(self, name: str = "viggo", namespace: str = "default") -> builtins.list[dict[str, Any]]:
        return [e for e in self.list("v1", "Event", namespace)
                if (e.get("involvedObject") or {}).get("name") == name]
