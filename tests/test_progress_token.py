"""The pods' reporter sends the ServiceAccount token as it is now: the kubelet rotates projected tokens
(about hourly, and the old one expires), and a training run outlives several."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from kubetune.contract.progress import StatusReporter


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[str | None]] = []

    def do_PATCH(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


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
