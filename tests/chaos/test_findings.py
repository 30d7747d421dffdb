"""What the chaos runs found, each reduced to one deterministic reproduction (no random draw, no timing).

A stalled request (`hold_next`) puts a SIGKILL exactly between two of the operator's requests; a one-shot
fault (`fail_next`) fails exactly one. Each test states the behaviour the operator owes; each was a strict
xfail naming its finding (R1/R2) until the operator was fixed:
- R1/R2: EvalJob teardown ran only right after the verdict was written; a crash in between (or a failed
  DELETE) left the RayServices serving. The finished EvalJob's timer now tears serving down again.
- R2: follow-rayjob logged a failed status write ("the job's timer repairs") but the timer only checked
  that the RayJob existed, so the RayJob's end was never mirrored. The timer now mirrors it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lifecycles import OPERATOR_CLIENTS
from test_evaljob_operator import GOOD, evaluate, rayservices, serve_all, wait_phase
from test_evaljob_operator import create as create_evaljob
from test_operator import RUNNING, SUCCEEDED
from test_operator import create as create_finetunejob

from support.harness import Cluster, Operator, eventually, start_api

TIMER_INTERVAL = 0.5  # the operator's level-triggered pass: "repaired by the timer" means within a few of these


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    api, kubeconfig = start_api(tmp_path)
    try:
        yield Cluster(api, kubeconfig)
    finally:
        api.stop()


@pytest.fixture
def operator(cluster: Cluster, tmp_path: Path) -> Iterator[Operator]:
    op = Operator(cluster.kubeconfig, tmp_path / "operator.log", KUBETUNE_TIMER_INTERVAL=str(TIMER_INTERVAL)).start()
    try:
        yield op
    finally:
        op.end()


def test_a_crash_between_an_evaljobs_verdict_and_its_teardown_still_tears_serving_down(
        cluster: Cluster, operator: Operator) -> None:
    create_evaljob(cluster)
    serve_all(cluster)
    # Every teardown DELETE is stalled (the EvalJob's handlers may run the teardown more than once, at once).
    teardown = cluster.api.hold_next("DELETE", r"/rayservices/", clients=OPERATOR_CLIENTS.pattern, times=100)
    evaluate(cluster, GOOD)
    assert teardown.wait(timeout=15) is not None  # the verdict is written; the teardown has begun
    operator.kill()
    teardown.release(serve=False)
    operator.start()
    wait_phase(cluster, "Succeeded")
    eventually(lambda: rayservices(cluster) == [], timeout=4 * TIMER_INTERVAL, what="serving torn down")


def test_a_failed_status_write_does_not_strand_a_finished_finetunejob(cluster: Cluster, operator: Operator) -> None:
    create_finetunejob(cluster)
    cluster.wait_rayjob()
    cluster.report_rayjob(**RUNNING)
    cluster.wait_phase("Running")
    cluster.api.fail_next("PATCH", r"/finetunejobs/viggo/status$", 500, "InternalError",
                          "Internal error occurred: etcdserver: request timed out")
    cluster.report_rayjob(**SUCCEEDED)
    cluster.wait_phase("Succeeded", timeout=4 * TIMER_INTERVAL)
