"""The image tests' view of the chart's operator container and of the container's process."""

from __future__ import annotations

import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


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
