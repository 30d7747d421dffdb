"""Fixtures: a fake Kubernetes API over HTTP, the operator as a process, and clients for both roles."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.harness import Cluster, Operator, start_api


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    # `no_admission`: an apiserver that enforces neither schema nor CEL (older than 1.25, or a stale
    # CRD), where invalid specs reach the operator and it must reject them itself.
    admission = request.node.get_closest_marker("no_admission") is None
    api, kubeconfig = start_api(tmp_path, validate_schemas=admission)
    try:
        yield Cluster(api, kubeconfig)
    finally:
        api.stop()


@pytest.fixture
def operator(cluster: Cluster, tmp_path: Path) -> Iterator[Operator]:
    op = Operator(cluster.kubeconfig, tmp_path / "operator.log").start()
    try:
        yield op
    finally:
        op.end()
