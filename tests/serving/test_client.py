"""kubetune.serving.client against a scripted OpenAI-compatible server (no Ray, no model).

The server answers each prompt by its name: "flaky:..." fails with 503 the first time, "bad:..." is a
permanent 400, "echo:..." a 400 quoting the key and the prompt, anything else is completed
with its reversal. It records how many requests were in flight.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kubetune.serving.client import complete_all_sync, wait_ready


class Script:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict[str, Any]] = []


def handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.reply(200, {"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                         "owned_by": "test"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            chat = self.path.endswith("/chat/completions")
            prompt = body["messages"][0]["content"] if chat else body["prompt"]
            with script.lock:
                script.bodies.append(body)
                script.seen[prompt] += 1
                first = script.seen[prompt] == 1
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
            try:
                time.sleep(0.02)  # let requests overlap
            finally:  # done before the answer leaves: the client may send its next request as soon as it has it
                with script.lock:
                    script.in_flight -= 1
            if prompt.startswith("flaky:") and first:
                self.reply(503, {"error": {"message": "busy", "type": "ServiceUnavailable"}},
                           {"retry-after-ms": "10"})
            elif prompt.startswith("echo:"):  # a server that quotes what it got
                self.reply(400, {"error": {"message": f"refused {self.headers.get('Authorization')} for "
                                                      f"{prompt!r}\n" + "etc. " * 100}})
            elif prompt.startswith("bad:"):
                self.reply(400, {"error": {"message": f"cannot take {prompt!r}", "type": "BadRequestError",
                                           "param": "prompt", "code": 400}})
            else:
                text = prompt[::-1]
                usage = {"prompt_tokens": len(prompt), "completion_tokens": len(text),
                         "total_tokens": 2 * len(prompt)}
                choice: dict[str, Any] = (
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    if chat else {"index": 0, "text": text, "finish_reason": "length", "logprobs": None})
                self.reply(200, {"id": "x", "object": "chat.completion" if chat else "text_completion",
                                 "created": 0, "model": body["model"], "choices": [choice], "usage": usage})

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(script))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", script
    httpd.shutdown()
    httpd.server_close()


def test_results_come_back_in_input_order(server: tuple[str, Script]) -> None:
    url, _ = server
    prompts = [f"prompt number {i}" for i in range(20)]
    results = complete_all_sync(url, "m", prompts, max_tokens=8, concurrency=8)
    assert [r.text for r in results] == [p[::-1] for p in prompts]
    assert [r.prompt_tokens for r in results] == [len(p) for p in prompts]
    assert all(r.error is None and r.latency_s > 0 and r.finish_reason == "length" for r in results)


def test_no_more_than_concurrency_requests_are_in_flight(server: tuple[str, Script]) -> None:
    url, script = server
    complete_all_sync(url, "m", [f"p{i}" for i in range(24)], max_tokens=4, concurrency=4)
    assert 1 < script.max_in_flight <= 4


def test_a_transient_error_is_retried(server: tuple[str, Script]) -> None:
    url, script = server
    (result,) = complete_all_sync(url, "m", ["flaky:once"], max_tokens=4)
    assert result.error is None and result.text == "flaky:once"[::-1]
    assert script.seen["flaky:once"] == 2


def test_a_permanent_error_is_recorded_on_its_item_only(server: tuple[str, Script]) -> None:
    url, script = server
    good, bad, other = complete_all_sync(url, "m", ["good", "bad:one", "other"], max_tokens=4)
    assert bad.error is not None and "HTTP 400" in bad.error and "bad:one" in bad.error
    assert bad.text == "" and bad.finish_reason is None
    assert script.seen["bad:one"] == 1  # not retried
    assert (good.text, other.text) == ("doog", "rehto")


def test_an_error_shows_a_bounded_excerpt_without_the_key_or_the_prompt(server: tuple[str, Script]) -> None:
    url, _ = server
    key, prompt = "sk-client-test-8c2f51", "echo: CANARY-5be0a7 the row's text"
    (result,) = complete_all_sync(url, "m", [prompt], max_tokens=4, api_key=key)
    assert result.error is not None and result.error.startswith("HTTP 400: refused Bearer <redacted> for ")
    assert "<data>" in result.error and "…(+" in result.error and len(result.error) < 260
    assert key not in result.error and "CANARY" not in result.error and "\n" not in result.error


def test_a_transient_error_past_the_retries_is_recorded(server: tuple[str, Script]) -> None:
    url, script = server
    (result,) = complete_all_sync(url, "m", ["flaky:twice"], max_tokens=4, retries=0)
    assert result.error is not None and "HTTP 503" in result.error
    assert script.seen["flaky:twice"] == 1


def test_chat_sends_the_prompt_as_one_user_message(server: tuple[str, Script]) -> None:
    url, script = server
    (result,) = complete_all_sync(url, "m", ["hello"], max_tokens=4, chat=True, stop=["\n"])
    assert result.text == "olleh" and result.finish_reason == "stop"
    assert script.bodies[0]["messages"] == [{"role": "user", "content": "hello"}]
    assert script.bodies[0]["stop"] == ["\n"] and script.bodies[0]["max_tokens"] == 4


def test_sampling_parameters_and_extra_body_are_sent(server: tuple[str, Script]) -> None:
    url, script = server
    complete_all_sync(url, "m", ["x"], max_tokens=3, temperature=0.0, extra_body={"stop_token_ids": [7]})
    assert script.bodies[0]["temperature"] == 0.0
    assert script.bodies[0]["stop_token_ids"] == [7]


def test_wait_ready_sees_the_listed_model(server: tuple[str, Script]) -> None:
    url, _ = server
    wait_ready(url, "m", timeout_s=5)
    with pytest.raises(TimeoutError, match="not 'other'"):
        wait_ready(url, "other", timeout_s=0.2, poll_s=0.05)


def test_wait_ready_times_out_when_nothing_listens() -> None:
    with pytest.raises(TimeoutError, match="APIConnectionError"):
        wait_ready("http://127.0.0.1:9/v1", "m", timeout_s=0.2, poll_s=0.05)
