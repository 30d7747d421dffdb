"""Many FineTuneJob and EvalJob lifecycles at once against the fake API: the workload of the chaos runs.

The test plays the user (creates the jobs, a few at a time), KubeRay (brings RayJobs and RayServices up, and
reports each RayJob's end) and the evaluator (reports an EvalJob's metrics), level-triggered from what it
lists each tick, as the real ones are: a RayJob or RayService that appears again is driven again. How each
job ends is planned up front from the seed, so every job has one expected terminal phase and condition.

The audit reads what happened from the API itself: the create history of every child name (a watch from
resourceVersion 1 replays it), and every object still owned by a job once the jobs are deleted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import itertools
import json
import os
import random
import re
import shutil
import statistics
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from test_evaljob_operator import BAD, GOOD, report_ready, report_results
from test_evaljob_operator import SUCCEEDED as EVALUATION_SUCCEEDED
from test_evaljob_operator import create as create_evaljob
from test_operator import RUNNING, SUCCEEDED
from test_operator import create as create_finetunejob

from kubetune.operator import kube
from support.fakekube import ChaosRecord, FakeKubeAPI, split_api_path, split_resource_path
from support.harness import ROOT, Cluster, eventually

# One seed for every random choice of a run (plans, kill points, faults): $KUBETUNE_CHAOS_SEED to vary it.
SEED = int(os.environ.get("KUBETUNE_CHAOS_SEED", "1122"))
# Where the full runs write their tallies (bench/results is not tracked).
RESULTS = Path(os.environ.get("KUBETUNE_CHAOS_RESULTS", str(ROOT / "bench" / "results")))
# The operator's level-triggered pass per job is its designed safety net for missed events: left on, at an
# interval (5 s) that does not dominate the requests per job (the harness's 0.2 s would).
TIMER_INTERVAL = "5"  # $KUBETUNE_TIMER_INTERVAL of the operator
# The operator's clients: kopf's own (`kopf/<version>`) and its API client (aiohttp's default User-Agent).
OPERATOR_CLIENTS = re.compile(r"^kopf/|aiohttp/")
TERMINAL = ("Succeeded", "Failed", "Cancelled")
TICK = 0.1  # seconds between two rounds of the user, KubeRay and the evaluator

Kind = Literal["FineTuneJob", "EvalJob"]


@dataclass(frozen=True)
class End:
    """How a job ends: what KubeRay reports last (and the evaluator before it), and the status that must follow."""

    name: str
    rayjob: dict[str, Any]  # the RayJob's final status
    metrics: dict[str, dict[str, float]] | None  # the evaluator's results (EvalJobs); None: it reports none
    phase: str
    condition: str  # the condition that is True at the end: Ready on success, Failed otherwise
    reason: str


APP_FAILED = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
              "message": "CUDA out of memory on worker 3"}
STOPPED = {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}
# Cycled through in this order, then shuffled: every kind of end appears in a run of five or more jobs.
FINETUNEJOB_ENDS = (
    End("Succeeded", SUCCEEDED, None, "Succeeded", "Ready", "Succeeded"),
    End("AppFailed", APP_FAILED, None, "Failed", "Failed", "AppFailed"),
    End("Cancelled", STOPPED, None, "Cancelled", "Failed", "Cancelled"),
    End("Succeeded", SUCCEEDED, None, "Succeeded", "Ready", "Succeeded"),
    End("Succeeded", SUCCEEDED, None, "Succeeded", "Ready", "Succeeded"),
)
EVALJOB_ENDS = (
    End("Succeeded", EVALUATION_SUCCEEDED, GOOD, "Succeeded", "Ready", "Succeeded"),
    End("GateFailed", EVALUATION_SUCCEEDED, BAD, "Failed", "Failed", "GateFailed"),
    End("EvaluationFailed", APP_FAILED, None, "Failed", "Failed", "EvaluationFailed"),
)


@dataclass
class Job:
    """One planned lifecycle, and what the test has seen and done of it."""

    kind: Kind
    name: str
    end: End
    dwell: int  # ticks KubeRay lets the RayJob run before it reports the end
    created: bool = False
    running_since: dict[str, int] = field(default_factory=dict)  # RayJob uid -> the tick it was reported running
    status: dict[str, Any] = field(default_factory=dict)  # as last listed
    uid: str | None = None

    @property
    def rayjob(self) -> str:
        return f"{self.name}-train" if self.kind == "FineTuneJob" else f"{self.name}-eval"

    @property
    def rayservices(self) -> list[str]:
        return [] if self.kind == "FineTuneJob" else [f"{self.name}-tuned", f"{self.name}-base"]

    @property
    def terminal(self) -> bool:
        return self.status.get("phase") in TERMINAL

    def children(self) -> list[str]:
        """The children's names as the operator recorded them in status (its ServiceAccount is shared)."""
        recorded = self.status.get("children") or {}
        return [*(recorded.get("rayServices") or []),
                *(name for name in (recorded.get("rayJob"), recorded.get("configMap")) if name)]

    def wrong_end(self) -> str | None:
        """How the job's status differs from its planned end; None when it ended as planned."""
        phase = self.status.get("phase")
        condition: dict[str, Any] = next(
            (c for c in self.status.get("conditions") or [] if c.get("type") == self.end.condition), {})
        if (phase, condition.get("status"), condition.get("reason")) == (self.end.phase, "True", self.end.reason):
            return None
        return (f"planned {self.end.phase} with {self.end.condition}=True/{self.end.reason}, got {phase} with "
                f"{self.end.condition}={condition.get('status')}/{condition.get('reason')}: "
                f"{str(condition.get('message'))[:200]}")


def plan(finetunejobs: int, evaljobs: int, seed: int) -> list[Job]:
    """The jobs in creation order, EvalJobs spread evenly among the FineTuneJobs; ends and dwells seeded."""
    rng = random.Random(seed)
    ftj_ends = [end for end, _ in zip(itertools.cycle(FINETUNEJOB_ENDS), range(finetunejobs), strict=False)]
    evj_ends = [end for end, _ in zip(itertools.cycle(EVALJOB_ENDS), range(evaljobs), strict=False)]
    rng.shuffle(ftj_ends)
    rng.shuffle(evj_ends)
    finetune = iter([Job("FineTuneJob", f"ft-{i:03d}", end, rng.randint(0, 8)) for i, end in enumerate(ftj_ends)])
    evaluate = iter([Job("EvalJob", f"ev-{i:02d}", end, rng.randint(0, 8)) for i, end in enumerate(evj_ends)])
    total = finetunejobs + evaljobs
    evaljob_slots = {round((i + 0.5) * total / evaljobs) for i in range(evaljobs)} if evaljobs else set()
    assert len(evaljob_slots) == evaljobs, "fewer FineTuneJobs than EvalJobs"
    return [next(evaluate) if i in evaljob_slots else next(finetune) for i in range(total)]


class Workload:
    """The user, KubeRay and the evaluator around the operator: `tick()` once per TICK until it says done."""

    def __init__(self, cluster: Cluster, jobs: list[Job], in_flight: int = 12) -> None:
        self.cluster = cluster
        self.jobs = jobs
        self.in_flight = in_flight
        self.allowed = len(jobs)  # how many jobs the user may have created so far (the R1 monkey paces this)
        self.ticks = 0
        self.reports: dict[str, int] = {"rayjob running": 0, "rayjob end": 0, "rayservice ready": 0,
                                        "evaluation results": 0}

    def tick(self) -> bool:
        """One round: list, create the next jobs, report what KubeRay and the evaluator would. True once every
        job is created and terminal."""
        self.ticks += 1
        rayjobs = self._listed("ray.io/v1", "RayJob")
        rayservices = self._listed("ray.io/v1", "RayService")
        for kind in ("FineTuneJob", "EvalJob"):
            for name, body in self._listed("kubetune.io/v1alpha1", kind).items():
                job = self.job(name)
                if job is not None:
                    job.status = dict(body.get("status") or {})
                    job.uid = body["metadata"]["uid"]
        self._create_more()
        for job in self.jobs:
            if job.created:
                for name in job.rayservices:
                    self._serve(rayservices.get(name))
                self._run(job, rayjobs.get(job.rayjob))
        return all(job.created and job.terminal for job in self.jobs)

    def job(self, name: str) -> Job | None:
        return next((job for job in self.jobs if job.name == name), None)

    def unfinished(self) -> dict[str, str]:
        return {job.name: str(job.status.get("phase") if job.created else "not created")
                for job in self.jobs if not (job.created and job.terminal)}

    def wrong_ends(self) -> dict[str, str]:
        return {job.name: wrong for job in self.jobs if (wrong := job.wrong_end()) is not None}

    def outcomes(self) -> dict[str, dict[str, int]]:
        """Per kind: how many jobs ended in each phase/reason."""
        tally: dict[str, dict[str, int]] = {}
        for job in self.jobs:
            ready = {c.get("type"): c.get("reason") for c in job.status.get("conditions") or []}.get("Ready")
            key = f"{job.status.get('phase')}/{ready}"
            tally.setdefault(job.kind, {}).setdefault(key, 0)
            tally[job.kind][key] += 1
        return tally

    # -- the user

    def _create_more(self) -> None:
        running = sum(1 for job in self.jobs if job.created and not job.terminal)
        for job in self.jobs:
            if running >= self.in_flight or sum(j.created for j in self.jobs) >= self.allowed:
                return
            if not job.created:
                if job.kind == "FineTuneJob":
                    create_finetunejob(self.cluster, job.name)
                else:
                    create_evaljob(self.cluster, job.name)
                job.created = True
                running += 1

    # -- KubeRay and the evaluator

    def _serve(self, rayservice: dict[str, Any] | None) -> None:
        if rayservice is not None and (rayservice.get("status") or {}).get("serviceStatus") != "Running":
            with _gone_meanwhile():
                report_ready(self.cluster, rayservice["metadata"]["name"])
                self.reports["rayservice ready"] += 1

    def _run(self, job: Job, rayjob: dict[str, Any] | None) -> None:
        if rayjob is None:
            return
        uid = rayjob["metadata"]["uid"]
        deployment = (rayjob.get("status") or {}).get("jobDeploymentStatus")
        with _gone_meanwhile():
            if not deployment:
                self.cluster.report_rayjob(job.rayjob, **RUNNING)
                job.running_since[uid] = self.ticks
                self.reports["rayjob running"] += 1
            elif deployment == "Running" and self.ticks - job.running_since.get(uid, 0) >= job.dwell:
                if job.end.metrics is not None:
                    report_results(self.cluster, job.end.metrics, job.name)
                    self.reports["evaluation results"] += 1
                self.cluster.report_rayjob(job.rayjob, **job.end.rayjob)
                self.reports["rayjob end"] += 1

    def _listed(self, api_version: str, kind: str) -> dict[str, dict[str, Any]]:
        return {obj["metadata"]["name"]: obj for obj in self.cluster.list(api_version, kind)}


def _gone_meanwhile() -> contextlib.suppress:
    """KubeRay reports only on objects that exist: one deleted since it was listed is skipped."""
    return contextlib.suppress(kube.NotFound)


# -- the audit ---------------------------------------------------------------------------------------


CHILD_COLLECTIONS = {
    "RayJob": "/apis/ray.io/v1/namespaces/default/rayjobs",
    "RayService": "/apis/ray.io/v1/namespaces/default/rayservices",
    "ConfigMap": "/api/v1/namespaces/default/configmaps",
    # Each job's own identity and its Ray clusters' NetworkPolicies (the data-plane security issue).
    "ServiceAccount": "/api/v1/namespaces/default/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies",
}


JOB_COLLECTIONS: dict[Kind, str] = {
    "FineTuneJob": "/apis/kubetune.io/v1alpha1/namespaces/default/finetunejobs",
    "EvalJob": "/apis/kubetune.io/v1alpha1/namespaces/default/evaljobs",
}
History = dict[str, list[dict[str, Any]]]  # collection path -> its watch events, oldest first


def history(api: FakeKubeAPI) -> History:
    """Every watch event since the start of the children's and the jobs' collections: a watch from
    resourceVersion 1 replays the API's own history (the fake keeps all of it); one second each, all at once."""
    parts = urllib.parse.urlsplit(api.url)

    def replay(path: str) -> list[dict[str, Any]]:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        try:
            conn.request("GET", f"{path}?watch=true&resourceVersion=1&timeoutSeconds=1")
            lines = conn.getresponse().read().splitlines()
        finally:
            conn.close()
        return [json.loads(line) for line in lines if line.strip()]

    paths = [*CHILD_COLLECTIONS.values(), *JOB_COLLECTIONS.values()]
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        return dict(zip(paths, pool.map(replay, paths), strict=True))


def create_history(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Every object ever created in a collection (its events): name -> uids, in creation order."""
    created: dict[str, list[str]] = {}
    for event in events:
        if event.get("type") == "ADDED":
            meta = event["object"]["metadata"]
            created.setdefault(meta["name"], []).append(meta["uid"])
    return created

# How far along a lifecycle each phase is: a job's phase only ever moves forward, and never out of an end.
PHASE_ORDER: dict[Kind, dict[str | None, int]] = {
    "FineTuneJob": {None: 0, "Pending": 1, "Waiting": 1, "Running": 2, "Suspended": 2,
                    "Succeeded": 3, "Failed": 3, "Cancelled": 3},
    "EvalJob": {None: 0, "Pending": 1, "Waiting": 1, "Serving": 2, "Evaluating": 3, "Succeeded": 4, "Failed": 4},
}


def phases_going_back(events: History) -> dict[str, list[str]]:
    """Per job: every change of its status.phase that went back in its lifecycle ("Running -> Pending"), or out
    of an end ("Succeeded -> Failed"), as the API recorded them."""
    found: dict[str, list[str]] = {}
    for kind, path in JOB_COLLECTIONS.items():
        order = PHASE_ORDER[kind]
        last: dict[str, str | None] = {}
        for event in events[path]:
            meta = event["object"]["metadata"]
            phase = (event["object"].get("status") or {}).get("phase")
            before = last.get(meta["name"])
            if event.get("type") != "MODIFIED" or phase == before:
                last[meta["name"]] = phase
                continue
            if before in TERMINAL or order.get(phase, 0) < order.get(before, 0):
                found.setdefault(meta["name"], []).append(f"{before} -> {phase}")
            last[meta["name"]] = phase
    return found


def duplicates(events: History, jobs: Iterable[Job]) -> dict[str, Any]:
    """Children created more than once (their uids), and objects of a child kind no job names as its child."""
    identity = {"FineTuneJob": "trainer", "EvalJob": "evaluator"}
    expected = {name for job in jobs for name in (job.rayjob, *job.rayservices, f"{job.name}-{identity[job.kind]}")}
    found: dict[str, Any] = {}
    for kind, path in CHILD_COLLECTIONS.items():
        for name, uids in create_history(events[path]).items():
            if len(uids) > 1:
                found[f"{kind} {name}"] = uids
            elif kind != "ConfigMap" and name not in expected:
                found[f"{kind} {name}"] = "not a child of any job"
    return found


def creates_per_child(events: History) -> dict[str, int]:
    """Per child kind: how many objects were created in all."""
    return {kind: sum(len(uids) for uids in create_history(events[path]).values())
            for kind, path in CHILD_COLLECTIONS.items()}


def ends_left(going_back: dict[str, list[str]]) -> dict[str, list[str]]:
    """Of `phases_going_back`: the changes out of an end (Succeeded, Failed, Cancelled), per job."""
    left = {name: [c for c in changes if c.split(" -> ")[0] in TERMINAL] for name, changes in going_back.items()}
    return {name: changes for name, changes in left.items() if changes}


def serving_after_the_verdict(cluster: Cluster, jobs: Iterable[Job], settle: float = 3 * float(TIMER_INTERVAL)
                              ) -> list[str]:
    """RayServices of EvalJobs that have their verdict (none sets keepServing), once teardowns in flight and
    the finished EvalJobs' timers (which tear serving down again after a crash or a failed DELETE) are given
    `settle` seconds."""
    finished = {job.name for job in jobs if job.kind == "EvalJob" and job.terminal}

    def serving() -> list[str]:
        return sorted(name for name in (s["metadata"]["name"] for s in cluster.list("ray.io/v1", "RayService"))
                      if name.rsplit("-", 1)[0] in finished)

    with contextlib.suppress(AssertionError):
        eventually(lambda: not serving(), timeout=settle, what="teardowns in flight")
    return serving()


def delete_jobs(cluster: Cluster, jobs: Iterable[Job]) -> set[str]:
    """The user deletes every job (background propagation: the API's garbage collector takes the children).
    Returns the deleted jobs' uids."""
    uids = set()
    for job in jobs:
        if job.uid is not None:
            ref = kube.ftj_ref if job.kind == "FineTuneJob" else kube.evj_ref
            cluster.kube.delete(ref("default", job.name))
            uids.add(job.uid)
    return uids


def owned_by(api: FakeKubeAPI, uids: set[str]) -> list[str]:
    """Every object, of any resource, with an owner reference to one of `uids`."""
    found = []
    for key in api.registry.storage_keys():
        rt = api.registry.storage_type(key)
        if rt is None:
            continue
        for obj in api.store.list(rt.group, rt.version, rt.plural):
            meta = obj["metadata"]
            if any(ref.get("uid") in uids for ref in meta.get("ownerReferences") or []):
                found.append(f"{rt.kind} {meta.get('namespace', '')}/{meta['name']}")
    return found


def operator_requests(records: Iterable[ChaosRecord], jobs: Iterable[Job]) -> tuple[dict[str, int], int]:
    """The operator's requests per job (the job itself, its children, Events about it), and the rest (lists,
    watches, shared objects such as the trainer RBAC)."""
    owner = {name: job.name for job in jobs for name in (job.name, *job.children())}
    per_job = dict.fromkeys({job.name for job in jobs}, 0)
    shared = 0
    for record in records:
        subject = _subject(record)
        if subject in owner:
            per_job[owner[subject]] += 1
        else:
            shared += 1
    return per_job, shared


def _subject(record: ChaosRecord) -> str | None:
    """The name of the object a request is about: in its path, or in a create's body (an Event: its object)."""
    split = split_api_path(record.path)
    if split is None or not split[2]:
        return None
    _, plural, name, _ = split_resource_path(split[0], split[2])
    if name is not None or record.method != "POST" or not record.body:
        return name
    try:
        body = json.loads(record.body)
    except ValueError:
        return None
    if plural == "events":  # core/v1 names the object in involvedObject, events.k8s.io/v1 in regarding
        about = body.get("involvedObject") or body.get("regarding") or {}
        return about.get("name")
    return (body.get("metadata") or {}).get("name")


def distribution(values: Iterable[int]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    p95 = statistics.quantiles(ordered, n=20, method="inclusive")[18] if len(ordered) > 1 else ordered[0]
    return {"n": len(ordered), "min": ordered[0], "median": statistics.median(ordered), "p95": round(p95, 1),
            "max": ordered[-1]}


def write_tally(name: str, tally: dict[str, Any], directory: Path, operator_log: Path) -> Path:
    """`chaos-<name>.json` in `directory`, with the operator's log beside it (what a finding is read from)."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / f"chaos-{name}-operator.log"
    if operator_log.resolve() != log.resolve():
        shutil.copyfile(operator_log, log)
    path = directory / f"chaos-{name}.json"
    path.write_text(json.dumps({**tally, "operator log": str(log)}, indent=2) + "\n")
    print(f"\nchaos-{name}: {json.dumps(tally)}")
    return path
