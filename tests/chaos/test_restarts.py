"""R1: the operator SIGKILLed and restarted again and again while FineTuneJob and EvalJob lifecycles run.

The real `python -m kubetune.operator` runs against the fake API; the test plays the user, KubeRay and the
evaluator (tests/chaos/lifecycles.py) while a monkey kills the operator at seeded random points:

* between a job's status write and its child's create: the operator's create of a child (RayJob,
  RayService, ConfigMap) is stalled in the API, the operator killed, and the create dropped unserved; the
  kill counts as landing there when the job's status names the child and the child does not exist;
* after a create landed but before its answer: the same, the stalled create served after the kill;
* after a random number of the operator's requests since it last started.

Then every job must end with its planned condition, no child may ever have been created twice, and once the
jobs are deleted nothing they owned may remain. The short run is part of `make test`; the full one
(50 FineTuneJobs, 10 EvalJobs, 24 kills) runs in `make test-chaos` and writes bench/results/chaos-r1.json.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lifecycles import (
    OPERATOR_CLIENTS,
    RESULTS,
    SEED,
    TICK,
    TIMER_INTERVAL,
    Workload,
    creates_per_child,
    delete_jobs,
    duplicates,
    ends_left,
    history,
    owned_by,
    phases_going_back,
    plan,
    serving_after_the_verdict,
    write_tally,
)

from kubetune.operator import kube
from support.fakekube import FakeKubeAPI, HeldRequest, split_api_path, split_resource_path
from support.harness import Cluster, Operator, eventually, start_api

# The operator's creates of children, one of which a kill between a status write and a child's create stalls:
# the first after the status write (the ConfigMap), or the workload itself (the RayJob or a RayService).
CHILD_CREATES = (r"/configmaps$", r"/(rayjobs|rayservices)$")
OPERATOR_API_CLIENT = "aiohttp/"  # the operator's own API client (kopf's is kopf/<version>)


@dataclass(frozen=True)
class Size:
    finetunejobs: int
    evaljobs: int
    kills: int
    timeout: float  # seconds for the whole run: kills, then every job terminal
    results: Path | None  # where the tally goes (None: printed only)


SHORT = Size(finetunejobs=8, evaljobs=2, kills=4, timeout=100, results=None)
FULL = Size(finetunejobs=50, evaljobs=10, kills=24, timeout=420, results=RESULTS)


class Monkey(threading.Thread):
    """Kills the operator `kills` times at seeded points and restarts it at once. It paces the user: before
    kill i only the first (i+1)/kills of the jobs may be created, so that creates keep coming until the last
    kill (and a stalled create is there to kill on)."""

    def __init__(self, cluster: Cluster, operator: Operator, workload: Workload, kills: int, seed: int) -> None:
        super().__init__(name="chaos-monkey", daemon=True)
        self.cluster = cluster
        self.api: FakeKubeAPI = cluster.api
        self.operator = operator
        self.workload = workload
        self.rng = random.Random(seed)
        stalled = math.ceil(kills * 0.4)
        answered = math.ceil(kills * 0.15)
        self.plan = ["window"] * stalled + ["answer-lost"] * answered + ["random"] * (kills - stalled - answered)
        self.rng.shuffle(self.plan)
        self.kills: collections.Counter[str] = collections.Counter()
        self.window: collections.Counter[str] = collections.Counter()  # "<job kind> <child kind>" -> kills there
        self.outside: list[str] = []  # kills on a stalled create outside that window, and why
        self.error: Exception | None = None
        self.finished = threading.Event()
        self._seen = 0  # request_log entries already counted
        self._operator_requests = 0

    def run(self) -> None:
        jobs = len(self.workload.jobs)
        try:
            for i, kind in enumerate(self.plan):
                self.workload.allowed = math.ceil(jobs * (i + 1) / len(self.plan))
                if kind == "random":
                    self._kill_at_a_random_request()
                else:
                    self._kill_on_a_stalled_create(serve=kind == "answer-lost")
                self.operator.start()
        except Exception as exc:  # noqa: BLE001 (reported by the test's loop, which fails on it)
            self.error = exc
        finally:
            self.workload.allowed = jobs
            self.finished.set()

    def _kill_on_a_stalled_create(self, serve: bool) -> None:
        hold = self.api.hold_next("POST", self.rng.choice(CHILD_CREATES), clients=OPERATOR_API_CLIENT,
                                  when=self._creates_a_new_child)
        held = hold.wait(timeout=20)
        if held is None:  # nothing left to create: a random point instead
            hold.release(serve=True)
            self._kill_at_a_random_request("at a random request (no create left to stall)")
            return
        self.operator.kill()
        in_window, where = crash_point(self.cluster, held)
        hold.release(serve=serve)
        if serve:
            self.kills["after a create landed, before its answer"] += 1
        elif in_window:
            self.kills["between a status write and the child create"] += 1
            self.window[where] += 1
        else:
            self.kills["on a stalled create, outside that window"] += 1
            self.outside.append(where)

    def _creates_a_new_child(self, held: HeldRequest) -> bool:
        """Not a resumed launch's create of a child that exists already (that one is answered AlreadyExists)."""
        split = split_api_path(held.path)
        assert split is not None
        _, plural, _, _ = split_resource_path(split[0], split[2])
        name = (held.object().get("metadata") or {}).get("name") or ""
        return self.api.store.get(split[0], split[1], plural, "default", name) is None

    def _kill_at_a_random_request(self, label: str = "at a random request") -> None:
        """After 1-60 (seeded) more requests of the operator, or 5 s of an idle one."""
        after = self.rng.randint(1, 60)
        start = self._count_operator_requests()
        deadline = time.monotonic() + 5  # an idle operator is killed all the same
        pause = threading.Event()
        while self._count_operator_requests() - start < after and time.monotonic() < deadline:
            pause.wait(0.005)
        self.operator.kill()
        self.kills[label] += 1

    def _count_operator_requests(self) -> int:
        log = self.api.request_log
        while True:
            total = len(log)
            try:
                new = itertools.islice(reversed(log), total - self._seen)
                self._operator_requests += sum(1 for r in new if OPERATOR_CLIENTS.search(r.user_agent))
            except RuntimeError:  # the server appended meanwhile: count again
                continue
            self._seen = total
            return self._operator_requests


def crash_point(cluster: Cluster, held: HeldRequest) -> tuple[bool, str]:
    """Where a kill on a stalled create left the job, read once the operator is dead: (True, "<job kind> <child
    kind>") when the job's status names the child while the child does not exist (the crash came between the
    status write and the child's create); else (False, what was found)."""
    obj = held.object()
    meta = obj.get("metadata") or {}
    what = f"{obj.get('kind')} {meta.get('name')}"
    owner = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None)
    if owner is None:
        return False, f"{what}: no controller"
    job_ref = kube.ftj_ref if owner.get("kind") == "FineTuneJob" else kube.evj_ref
    status = cluster.kube.get(job_ref("default", owner["name"])).get("status") or {}
    children = status.get("children") or {}
    recorded = meta.get("name") in [*(children.get("rayServices") or []), children.get("rayJob"),
                                    children.get("configMap")]
    try:
        cluster.kube.get(kube.Ref(obj["apiVersion"], obj["kind"], "default", meta["name"]))
        return False, f"{what}: exists"
    except kube.NotFound:
        pass
    if not recorded:
        return False, f"{what}: not in the status of {owner['kind']} {owner['name']} ({status.get('phase')})"
    return True, f"{owner['kind']} {obj['kind']}"


@dataclass
class Run:
    size: Size
    kills: collections.Counter[str]
    unfinished: dict[str, str]
    wrong_ends: dict[str, str]
    duplicates: dict[str, Any]
    orphans: list[str]
    going_back: dict[str, list[str]] = field(default_factory=dict)  # job -> phase changes backwards
    tally: dict[str, Any] = field(default_factory=dict)

    @property
    def window_kills(self) -> int:
        return self.kills["between a status write and the child create"]


@pytest.fixture(scope="module", params=[
    pytest.param(SHORT, id="short"),
    pytest.param(FULL, id="full", marks=[pytest.mark.chaos, pytest.mark.timeout(900)]),
])
def r1(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    size: Size = request.param
    tmp = tmp_path_factory.mktemp("r1")
    api, kubeconfig = start_api(tmp)
    cluster = Cluster(api, kubeconfig)
    operator = Operator(kubeconfig, tmp / "operator.log", KUBETUNE_TIMER_INTERVAL=TIMER_INTERVAL).start()
    jobs = plan(size.finetunejobs, size.evaljobs, SEED)
    workload = Workload(cluster, jobs)
    monkey = Monkey(cluster, operator, workload, size.kills, SEED)
    started = time.monotonic()
    try:
        monkey.start()

        def all_terminal_after_the_kills() -> bool:
            if monkey.error is not None:
                raise RuntimeError(f"the monkey failed: {monkey.error!r}") from monkey.error
            return workload.tick() and monkey.finished.is_set()

        try:
            eventually(all_terminal_after_the_kills, timeout=size.timeout, interval=TICK,
                       what="every job terminal after the kills")
        except AssertionError:
            pass  # the jobs still running are the finding: test_every_job_ends_with_its_planned_condition
        monkey.finished.wait(30)
        seconds = time.monotonic() - started
        serving = serving_after_the_verdict(cluster, jobs)
        uids = delete_jobs(cluster, jobs)
        with contextlib.suppress(AssertionError):
            eventually(lambda: not owned_by(api, uids), timeout=10, what="garbage collection")
        events = history(api)  # after the deletions: a child created for a deleted job shows up too
        found = duplicates(events, jobs)
        run = Run(size, monkey.kills, workload.unfinished(), workload.wrong_ends(), found, owned_by(api, uids),
                  phases_going_back(events))
        run.tally = {
            "seed": SEED,
            "jobs": {"FineTuneJob": size.finetunejobs, "EvalJob": size.evaljobs},
            "kills": {"total": sum(monkey.kills.values()), **monkey.kills,
                      "between a status write and the child create, by child": dict(monkey.window),
                      "on a stalled create, outside that window: why": monkey.outside},
            "duplicate children": len(found),
            "orphans after GC": len(run.orphans),
            "outcomes": workload.outcomes(),
            "unfinished": run.unfinished,
            "wrong ends": run.wrong_ends,
            "phase changes going back": run.going_back,
            "RayServices left serving after their EvalJob's verdict": serving,
            "children created": creates_per_child(events),
            "test as KubeRay and evaluator": workload.reports,
            "wall seconds": round(seconds, 1),
        }
        write_tally("r1" if size.results else "r1-short", run.tally, size.results or tmp, operator.log_path)
        yield run
    finally:
        operator.stop()
        api.stop()


def test_the_operator_is_killed_at_every_planned_point(r1: Run) -> None:
    assert sum(r1.kills.values()) == r1.size.kills, r1.tally["kills"]


def test_kills_land_between_a_status_write_and_the_child_create(r1: Run) -> None:
    assert r1.window_kills >= r1.size.kills // 4, r1.tally["kills"]


def test_every_job_ends_with_its_planned_condition(r1: Run) -> None:
    assert (r1.unfinished, r1.wrong_ends) == ({}, {}), r1.tally


def test_no_job_leaves_its_end(r1: Run) -> None:
    assert ends_left(r1.going_back) == {}, r1.tally


def test_no_child_is_ever_created_twice(r1: Run) -> None:
    assert r1.duplicates == {}, r1.tally


def test_nothing_owned_by_a_deleted_job_remains(r1: Run) -> None:
    assert r1.orphans == [], r1.tally


def test_serving_is_torn_down_after_every_verdict(r1: Run) -> None:
    assert r1.tally["RayServices left serving after their EvalJob's verdict"] == []
