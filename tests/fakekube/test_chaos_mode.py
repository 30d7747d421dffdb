"""The fake API's fault modes: seeded random faults for chosen clients (`ChaosConfig`), and stalled requests
(`hold_next`). One behaviour per test; every random draw is seeded, so each test sees the same faults.

The chaos tests (tests/chaos) stand on these: a fault replaces an answer and never follows one, the
operator's clients get faults while the test's own client never does, and what was injected is counted.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from test_contract import CONFIGMAPS, configmap, status_error

from support.fakekube import FAULT_KINDS, ChaosConfig, FakeKubeAPI, FaultKind
from support.harness import eventually

OPERATOR = {"User-Agent": "kopf/1.45.2"}  # a client the default ChaosConfig targets


def faults(*kinds: FaultKind, rate: float = 1.0, **options: Any) -> ChaosConfig:
    """Faults of `kinds` only (all kinds when none given), on every request by default."""
    return ChaosConfig(seed=7, rate=rate, kinds=frozenset(kinds or FAULT_KINDS), **options)


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as server:
        yield server


def call(api: FakeKubeAPI, method: str, path: str, body: Any = None,
         headers: dict[str, str] = OPERATOR) -> requests.Response:
    data = json.dumps(body) if body is not None else None
    return requests.request(method, api.url + path, data=data, headers=headers, timeout=10)


def names(api: FakeKubeAPI) -> list[str]:
    return [o["metadata"]["name"] for o in api.store.list("", "v1", "configmaps", "default")]


def watch_lines(api: FakeKubeAPI, since: int, headers: dict[str, str] = OPERATOR,
                after_open: Any = None) -> tuple[list[dict[str, Any]], str | None]:
    """A watch of ConfigMaps from `since`: its events until the stream ends, and how it ended (None: cleanly;
    else the client's error). `after_open()` runs once the stream is open."""
    events: list[dict[str, Any]] = []
    params: dict[str, str | int] = {"watch": "true", "resourceVersion": since, "timeoutSeconds": 2}
    try:
        with requests.get(api.url + CONFIGMAPS, params=params, headers=headers, stream=True,
                          timeout=10) as response:
            assert response.status_code == 200, response.text
            if after_open is not None:
                threading.Timer(0.2, after_open).start()
            for line in response.iter_lines():
                if line:
                    events.append(json.loads(line))
    except requests.RequestException as exc:
        return events, type(exc).__name__
    return events, None


# -- off by default, and only for the chosen clients ---------------------------------------------


def test_without_chaos_every_request_is_served(api: FakeKubeAPI) -> None:
    codes = {call(api, "POST", CONFIGMAPS, configmap(f"c{i}")).status_code for i in range(30)}
    assert codes == {201} and api.chaos is None


def test_a_client_that_is_not_targeted_never_gets_a_fault(api: FakeKubeAPI) -> None:
    api.inject_random_faults(faults())
    test_client = {"User-Agent": "Python-urllib/3.11"}
    codes = {call(api, "POST", CONFIGMAPS, configmap(f"c{i}"), headers=test_client).status_code for i in range(20)}
    assert codes == {201}


def test_discovery_and_health_never_fail(api: FakeKubeAPI) -> None:
    api.inject_random_faults(faults())
    assert [call(api, "GET", path).status_code for path in ("/api", "/apis", "/version", "/healthz")] == [200] * 4


# -- each kind of fault, as a real apiserver answers it --------------------------------------------


def test_conflict_answers_a_write_409_and_writes_nothing(api: FakeKubeAPI) -> None:
    api.inject_random_faults(faults("conflict"))
    status = status_error(call(api, "POST", CONFIGMAPS, configmap("c1")), 409, "Conflict")
    assert status["message"].startswith('Operation cannot be fulfilled on configmaps "c1"')
    assert names(api) == []


def test_conflict_is_never_answered_to_a_read(api: FakeKubeAPI) -> None:
    api.inject_random_faults(faults("conflict"))
    assert call(api, "GET", CONFIGMAPS).status_code == 200


def test_internal_error_is_500_and_the_request_is_not_served(api: FakeKubeAPI) -> None:
    call(api, "POST", CONFIGMAPS, configmap("c1"))
    api.inject_random_faults(faults("internal"))
    status_error(call(api, "DELETE", CONFIGMAPS + "/c1"), 500, "InternalError")
    assert names(api) == ["c1"]


def test_throttling_is_429_with_retry_after(api: FakeKubeAPI) -> None:
    api.inject_random_faults(faults("throttle", retry_after=2))
    response = call(api, "GET", CONFIGMAPS)
    status = status_error(response, 429, "TooManyRequests")
    assert response.headers["Retry-After"] == "2" and status["details"]["retryAfterSeconds"] == 2


def test_watch_expired_when_opening_is_a_410_error_event_that_ends_the_stream(api: FakeKubeAPI) -> None:
    api.inject_random_faults(faults("watch-expired"))
    events, error = watch_lines(api, since=api.store.resource_version)
    assert error is None
    assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == [("ERROR", 410, "Expired")]


def test_watch_expired_mid_stream_replaces_the_events_with_a_410_error(api: FakeKubeAPI) -> None:
    def then_faults_and_a_write() -> None:
        api.inject_random_faults(faults("watch-expired"))
        call(api, "POST", CONFIGMAPS, configmap("c1"), headers={})  # the test's write: served

    events, error = watch_lines(api, since=api.store.resource_version, after_open=then_faults_and_a_write)
    assert error is None and [e["type"] for e in events] == ["ERROR"]
    assert names(api) == ["c1"]


def test_watch_drop_cuts_the_connection_mid_stream(api: FakeKubeAPI) -> None:
    api.inject_random_faults(faults("watch-drop"))  # nothing to drop when it opens: it drops at the first event
    events, error = watch_lines(api, since=api.store.resource_version,
                                after_open=lambda: call(api, "POST", CONFIGMAPS, configmap("c1"), headers={}))
    assert events == [] and error is not None


# -- seeded, counted, bounded -----------------------------------------------------------------------


def statuses(config: ChaosConfig) -> list[int]:
    with FakeKubeAPI(chaos=config) as api:
        return [call(api, "POST", CONFIGMAPS, configmap(f"c{i}")).status_code for i in range(40)]


def test_the_same_seed_gives_the_same_faults() -> None:
    config = faults(rate=0.3)
    first = statuses(config)
    assert first == statuses(config) and set(first) > {201}


def test_faults_are_counted_by_kind(api: FakeKubeAPI) -> None:
    chaos = api.inject_random_faults(faults(rate=0.5))
    codes = [call(api, "POST", CONFIGMAPS, configmap(f"c{i}")).status_code for i in range(40)]
    stats = chaos.stats()
    assert stats["requests"] == 40 and stats["faults"] == 40 - codes.count(201)
    assert stats["by_kind"]["conflict"] == codes.count(409) and stats["by_kind"]["throttle"] == codes.count(429)
    assert stats["by_kind"]["internal"] == codes.count(500)


def test_limit_bounds_the_faults_in_all(api: FakeKubeAPI) -> None:
    api.inject_random_faults(faults(limit=3))
    codes = [call(api, "GET", CONFIGMAPS).status_code for _ in range(6)]
    assert codes[3:] == [200, 200, 200] and 200 not in codes[:3]


def test_a_create_is_recorded_with_its_body(api: FakeKubeAPI) -> None:
    chaos = api.inject_random_faults(faults(rate=0.0))
    call(api, "POST", CONFIGMAPS, configmap("c1"))
    [record] = chaos.records
    assert (record.method, record.fault, json.loads(record.body or b"")["metadata"]["name"]) == ("POST", None, "c1")


def test_stopping_random_faults_serves_faithfully_again(api: FakeKubeAPI) -> None:
    api.inject_random_faults(faults())
    api.stop_random_faults()
    assert call(api, "GET", CONFIGMAPS).status_code == 200


# -- stalled requests --------------------------------------------------------------------------------


def post_in_background(api: FakeKubeAPI, name: str) -> list[Any]:
    """POST a ConfigMap from another thread; the list gets the status code, or the client's error."""
    outcome: list[Any] = []

    def post() -> None:
        try:
            outcome.append(call(api, "POST", CONFIGMAPS, configmap(name)).status_code)
        except requests.RequestException as exc:
            outcome.append(exc)

    threading.Thread(target=post, daemon=True).start()
    return outcome


def test_a_held_request_waits_unserved_until_released(api: FakeKubeAPI) -> None:
    hold = api.hold_next("POST", r"/configmaps$")
    outcome = post_in_background(api, "c1")
    held = hold.wait(timeout=5)
    assert held is not None and held.object()["metadata"]["name"] == "c1"
    assert names(api) == [] and outcome == []
    hold.release(serve=True)
    eventually(lambda: outcome == [201], what="the create served")
    assert names(api) == ["c1"]


def test_a_held_request_dropped_on_release_writes_nothing(api: FakeKubeAPI) -> None:
    hold = api.hold_next("POST", r"/configmaps$")
    outcome = post_in_background(api, "c1")
    assert hold.wait(timeout=5) is not None
    hold.release(serve=False)
    eventually(lambda: len(outcome) == 1, what="the client to give up")
    assert isinstance(outcome[0], requests.ConnectionError) and names(api) == []


def test_a_hold_stalls_only_the_next_matching_request(api: FakeKubeAPI) -> None:
    api.hold_next("POST", r"/configmaps$", clients="^kopf/")
    assert call(api, "POST", CONFIGMAPS, configmap("c1"), headers={}).status_code == 201  # another client


def test_a_hold_with_a_condition_stalls_only_the_requests_it_accepts(api: FakeKubeAPI) -> None:
    hold = api.hold_next("POST", r"/configmaps$", when=lambda held: held.object()["metadata"]["name"] == "c2")
    assert call(api, "POST", CONFIGMAPS, configmap("c1")).status_code == 201
    post_in_background(api, "c2")
    held = hold.wait(timeout=5)
    assert held is not None and held.object()["metadata"]["name"] == "c2" and names(api) == ["c1"]
    hold.release(serve=True)
