"""The fake API's pod logs (`GET /api/v1/namespaces/<ns>/pods/<name>/log`), as a real apiserver serves
them through the kubelet: the `kubernetes` client's `read_namespaced_pod_log` against it over HTTP.

The test plays the kubelet: `FakeKubeAPI.write_pod_log` is a container's output, a status patch starts
or ends the container.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from support.fakekube import FakeKubeAPI


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as server:
        yield server


@pytest.fixture
def core(api: FakeKubeAPI, tmp_path: Path) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(k8s_config.new_client_from_config(str(api.kubeconfig(tmp_path / "kubeconfig"))))


def pod(core: k8s.CoreV1Api, name: str = "p", containers: tuple[str, ...] = ("main",),
        phase: str | None = "Running") -> dict[str, Any]:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": c, "image": "busybox"} for c in containers]}}
    created = core.create_namespaced_pod("default", body)
    if phase is not None:
        core.patch_namespaced_pod_status(name, "default", {"status": {"phase": phase}})
    return dict(created.to_dict())


def message(info: pytest.ExceptionInfo[ApiException]) -> str:
    """The API's Status message of a refused request."""
    return str(json.loads(info.value.body)["message"])


def container_status(state: dict[str, Any]) -> dict[str, Any]:
    return {"name": "main", "image": "busybox", "imageID": "", "ready": False, "restartCount": 0, "state": state}


def read_log(core: k8s.CoreV1Api, name: str = "p", **options: Any) -> str:
    """The log as text. (The client's own decoding of a `str` answer gives the repr of the bytes, on a real
    cluster too: read the raw response, as `kubetune logs` does.)"""
    response = core.read_namespaced_pod_log(name, "default", _preload_content=False, **options)
    try:
        return str(response.data.decode())
    finally:
        response.release_conn()


def test_a_log_is_what_the_container_wrote(api: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    pod(core)
    api.write_pod_log("default", "p", "one\n")
    api.write_pod_log("default", "p", "two\n")
    assert read_log(core, "p") == "one\ntwo\n"


def test_the_log_is_plain_text(api: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    pod(core)
    api.write_pod_log("default", "p", "x\n")
    response = requests.get(f"{api.url}/api/v1/namespaces/default/pods/p/log", timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")


def test_a_missing_pod_is_not_found(core: k8s.CoreV1Api) -> None:
    with pytest.raises(ApiException) as info:
        read_log(core, "nope")
    assert info.value.status == 404 and message(info) == 'pods "nope" not found'


def test_a_pod_of_several_containers_needs_one_named(api: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    pod(core, containers=("a", "b"))
    api.write_pod_log("default", "p", "from b\n", container="b")
    with pytest.raises(ApiException) as info:
        read_log(core, "p")
    assert info.value.status == 400
    assert message(info) == "a container name must be specified for pod p, choose one of: [a b]"
    assert read_log(core, "p", container="b") == "from b\n"


def test_an_unknown_container_is_a_bad_request(core: k8s.CoreV1Api) -> None:
    pod(core)
    with pytest.raises(ApiException) as info:
        read_log(core, "p", container="other")
    assert info.value.status == 400 and message(info) == "container other is not valid for pod p"


def test_a_pending_pod_is_waiting_to_start(core: k8s.CoreV1Api) -> None:
    pod(core, phase=None)  # pods start Pending
    with pytest.raises(ApiException) as info:
        read_log(core, "p")
    assert info.value.status == 400
    assert message(info) == 'container "main" in pod "p" is waiting to start: ContainerCreating'


def test_a_waiting_container_status_gives_its_reason(core: k8s.CoreV1Api) -> None:
    pod(core, phase=None)
    core.patch_namespaced_pod_status("p", "default", {"status": {"containerStatuses": [
        container_status({"waiting": {"reason": "ImagePullBackOff"}})]}})
    with pytest.raises(ApiException) as info:
        read_log(core, "p")
    assert message(info) == 'container "main" in pod "p" is waiting to start: ImagePullBackOff'


def test_tail_lines_keeps_the_last_lines(api: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    pod(core)
    api.write_pod_log("default", "p", "1\n2\n3\n")
    assert read_log(core, "p", tail_lines=2) == "2\n3\n"


def test_limit_bytes_cuts_the_log(api: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    pod(core)
    api.write_pod_log("default", "p", "abcdef")
    assert read_log(core, "p", limit_bytes=4) == "abcd"


def test_previous_has_no_terminated_container(core: k8s.CoreV1Api) -> None:
    pod(core)
    with pytest.raises(ApiException) as info:
        read_log(core, "p", previous=True)
    assert info.value.status == 400 and message(info) == 'previous terminated container "main" in pod "p" not found'


def test_unsupported_options_are_refused_not_ignored(core: k8s.CoreV1Api) -> None:
    pod(core)
    with pytest.raises(ApiException) as info:
        read_log(core, "p", timestamps=True)
    assert info.value.status == 400 and "not supported by the fake" in message(info)


def test_only_get_is_allowed(api: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    pod(core)
    assert requests.post(f"{api.url}/api/v1/namespaces/default/pods/p/log", timeout=5).status_code == 405


def test_a_pod_created_again_starts_with_an_empty_log(api: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    pod(core)
    api.write_pod_log("default", "p", "old\n")
    core.delete_namespaced_pod("p", "default")
    pod(core)
    assert read_log(core, "p") == ""


def _follow(core: k8s.CoreV1Api, chunks: list[bytes]) -> threading.Thread:
    def read() -> None:
        response = core.read_namespaced_pod_log("p", "default", follow=True, _preload_content=False)
        chunks.extend(response.stream(1024))  # each chunk as it arrives
        response.release_conn()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_follow_streams_what_is_written_until_the_pod_succeeds(api: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    pod(core)
    api.write_pod_log("default", "p", "before\n")
    chunks: list[bytes] = []
    thread = _follow(core, chunks)
    _wait_for(lambda: b"".join(chunks) == b"before\n")
    api.write_pod_log("default", "p", "after\n")
    _wait_for(lambda: b"".join(chunks) == b"before\nafter\n")
    assert thread.is_alive()  # still following: the container runs
    core.patch_namespaced_pod_status("p", "default", {"status": {"phase": "Succeeded"}})
    thread.join(5)
    assert not thread.is_alive() and b"".join(chunks) == b"before\nafter\n"


def test_follow_ends_when_the_container_terminates(api: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    pod(core)
    chunks: list[bytes] = []
    thread = _follow(core, chunks)
    core.patch_namespaced_pod_status("p", "default", {"status": {"containerStatuses": [
        container_status({"terminated": {"exitCode": 0}})]}})
    thread.join(5)
    assert not thread.is_alive()


def test_follow_ends_when_the_pod_is_deleted(api: FakeKubeAPI, core: k8s.CoreV1Api) -> None:
    pod(core)
    chunks: list[bytes] = []
    thread = _follow(core, chunks)
    time.sleep(0.1)
    core.delete_namespaced_pod("p", "default")
    thread.join(5)
    assert not thread.is_alive()
