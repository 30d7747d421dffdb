"""Fixtures for the CLI's cluster commands (support.kubecli): one fake API for the session, a namespace of
its own for each test (the kubeconfig's context defaults to it)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.kubecli import FakeCluster, start_cluster
from support.s3 import LocalS3, local_s3

BUCKETS = ("kubetune-examples", "kubetune-reports")


@pytest.fixture(scope="session")
def shared_fake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("fakekube"))
    try:
        yield cluster
    finally:
        cluster.api.stop()


@pytest.fixture
def fake_cluster(shared_fake_cluster: FakeCluster, tmp_path: Path) -> FakeCluster:
    return shared_fake_cluster.in_namespace(f"t-{uuid.uuid4().hex[:8]}", tmp_path / "kubeconfig")


@pytest.fixture(scope="session")
def s3() -> Iterator[LocalS3]:
    """One local S3 (moto's server) for the session, with BUCKETS."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with local_s3(*BUCKETS) as server:
        yield server
