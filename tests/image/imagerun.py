"""The image tests' view of the chart's operator container and of the container's process."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"


def missing_for_running_images() -> str | None:
    """Why the operator image cannot be built and run here, or None."""
    missing = [tool for tool in ("buildah", "mmdebstrap", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install buildah mmdebstrap)"
    if os.geteuid() != 0:
        return "needs root (buildah with vfs storage, chroot, mount namespaces)"
    if not HELM.exists():
        return "needs helm to render the chart's container: make tools"
    return None


requires_buildah = pytest.mark.skipif(missing_for_running_images() is not None,
                                      reason=str(missing_for_running_images()))


@dataclass
class Rendered:
    """The chart's operator container, rendered with this image and free ports."""

    pod: dict[str, Any]
    container: dict[str, Any]
    metrics_port: int
    health_port: int

    @property
    def env(self) -> dict[str, str]:
        return {e["name"]: e["value"] for e in self.container["env"] if "value" in e}


@dataclass
class RunningOperator:
    """The operator container's process as the host sees it, and its endpoints."""

    launcher: subprocess.Popen[bytes]
    rendered: Rendered
    log_path: Path

    @property
    def process(self) -> psutil.Process:
        """The entrypoint: the launcher's only child (PID 1 in the container's PID namespace)."""
        (child,) = psutil.Process(self.launcher.pid).children()
        return child

    def get(self, port: int, path: str) -> tuple[int, str, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read().decode()

    def healthy(self) -> bool:
        if self.launcher.poll() is not None:
            raise RuntimeError(f"the operator container exited with {self.launcher.returncode}:\n{self.log()}")
        try:
            return self.get(self.rendered.health_port, "/healthz")[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]
