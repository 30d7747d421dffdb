"""The pods' reporter sends the ServiceAccount token as it is now: the kubelet rotates projected tokens
(about hourly, and the old one expires), and a training run outlives several."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from kubetune.contract.progress import StatusReporter
from support.httpserver import JsonHandler, LocalServer


class _Recorder(JsonHandler):
    seen: ClassVar[list[str | None]] = []

    def do_PATCH(self) -> None:
        self.read_json()
        type(self).seen.append(self.headers.get("Authorization"))
        self.send_json(200, {})


@pytest.fixture
def server() -> Iterator[str]:
    _Recorder.seen = []
    with LocalServer(_Recorder) as httpd:
        yield httpd.base


def test_a_rotated_token_is_used_from_the_next_request_on(server: str, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    reporter = StatusReporter(server=server, namespace="default", name="viggo", token_file=token)
    assert reporter.patch({"progress": {}})
    token.write_text("rotated\n")  # what the kubelet does to a projected token
    assert reporter.patch({"progress": {}})
    assert _Recorder.seen == ["Bearer first", "Bearer rotated"]


def test_an_unreadable_token_file_sends_no_token_rather_than_a_stale_one(server: str, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first")
    reporter = StatusReporter(server=server, namespace="default", name="viggo", token_file=token)
    token.unlink()
    reporter.patch({"progress": {}})
    assert _Recorder.seen == [None]
