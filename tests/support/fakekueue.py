"""Kueue and KubeRay, played over HTTP against the fake API, for the RayJobs of one namespace.

Kueue's part (sigs.k8s.io/kueue, its ray.io/rayjob integration), reduced to what kubetune relies on:
- a RayJob labelled `kueue.x-k8s.io/queue-name` is Kueue's; its webhook requires it created suspended with
  `shutdownAfterJobFinishes: true` (`violations` records any that is not);
- admission sets the RayJob's spec.suspend to false, `capacity` RayJobs at a time, by WorkloadPriorityClass
  (label `kueue.x-k8s.io/priority-class`, values in `priorities`) then age;
- preemption sets spec.suspend back to true: `preempt(name)`, or by itself when a RayJob of a higher
  priority waits and `capacity` is used up;
- a RayJob someone else unsuspended without admission is suspended again, as Kueue's job reconciler does
  (`fights` counts them: kubetune must never cause one);
- a RayJob deleted or finished frees its place.

KubeRay's part: the RayJob's jobDeploymentStatus, one step per pass, with observedGeneration = generation:
suspended: "" -> Initializing -> Suspending -> Suspended (a RayJob created suspended passes Initializing and
Suspending without a cluster); unsuspended: Suspended | "" -> Initializing -> Running/RUNNING. Finished ones
(Complete, Failed: reported by the test) are left alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kubetune.operator import kube
from support.client import SyncKube

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
FINISHED = ("Complete", "Failed", "ValidationFailed")

Obj = dict[str, Any]


class FakeKueue:
    """A thread playing Kueue and KubeRay for the queued RayJobs of `namespace`."""

    def __init__(self, server: str, namespace: str = "default", capacity: int = 1,
                 priorities: dict[str, int] | None = None, check: Callable[[Obj], list[str]] | None = None,
                 interval: float = 0.02) -> None:
        self.kube = SyncKube(server)
        self.namespace = namespace
        self.capacity = capacity
        self.priorities = priorities or {}
        self.check = check  # extra admission check of every RayJob, e.g. KubeRay's CRD schema
        self.interval = interval
        self.admitted: dict[str, str] = {}  # uid -> name
        self.admissions: list[str] = []  # names, in the order admitted (once per admission)
        self.preemptions: list[str] = []
        self.violations: list[str] = []
        self.fights: list[str] = []
        self.seen: set[str] = set()  # uids
        self._lock = threading.Lock()
        self._preempt: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-kueue", daemon=True)
        self.errors: list[BaseException] = []

    # -- the test's controls

    def start(self) -> FakeKueue:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def preempt(self, name: str) -> None:
        """Evict the admitted RayJob `name` (as a higher-priority workload or a quota change would)."""
        with self._lock:
            self._preempt.append(name)

    def set_capacity(self, capacity: int) -> None:
        with self._lock:
            self.capacity = capacity

    # -- the loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except kube.KubeError:
                pass  # a write raced another writer (409) or the object is gone: the next pass sees it again
            except Exception as exc:  # noqa: BLE001 (surfaced by the test through `errors`)
                self.errors.append(exc)
            self._stop.wait(self.interval)

    def step(self) -> None:
        """One pass: Kueue's webhook and scheduler, then KubeRay's status, over every queued RayJob."""
        rayjobs = [r for r in self.kube.list(kube.Ref("ray.io/v1", "RayJob", self.namespace))
                   if QUEUE_LABEL in (r["metadata"].get("labels") or {})]
        live = {r["metadata"]["uid"] for r in rayjobs
                if (r.get("status") or {}).get("jobDeploymentStatus") not in FINISHED}
        with self._lock:
            for uid in [u for u in self.admitted if u not in live]:
                del self.admitted[uid]  # deleted or finished: its quota is free
            preempt, self._preempt = self._preempt, []
            capacity = self.capacity
        for rayjob in rayjobs:
            self._webhook(rayjob)
        by_name = {r["metadata"]["name"]: r for r in rayjobs}
        for name in preempt:
            if name in by_name:
                self._suspend(by_name[name], preempted=True)
        self._schedule([r for r in rayjobs if r["metadata"]["uid"] in live], capacity)
        for rayjob in self.kube.list(kube.Ref("ray.io/v1", "RayJob", self.namespace)):
            if QUEUE_LABEL in (rayjob["metadata"].get("labels") or {}):
                self._kuberay(rayjob)

    def _webhook(self, rayjob: Obj) -> None:
        meta, spec = rayjob["metadata"], rayjob["spec"]
        if meta["uid"] in self.seen:
            return
        self.seen.add(meta["uid"])
        if spec.get("suspend") is not True:
            self.violations.append(f"{meta['name']}: created unsuspended")
        if spec.get("shutdownAfterJobFinishes") is not True:
            self.violations.append(f"{meta['name']}: shutdownAfterJobFinishes is not true")
        if self.check is not None:
            self.violations += [f"{meta['name']}: {problem}" for problem in self.check(rayjob)]

    def _priority(self, rayjob: Obj) -> int:
        return self.priorities.get((rayjob["metadata"].get("labels") or {}).get(PRIORITY_LABEL, ""), 0)

    def _schedule(self, rayjobs: list[Obj], capacity: int) -> None:
        for rayjob in rayjobs:  # unsuspended without admission: suspended again
            if rayjob["spec"].get("suspend") is False and rayjob["metadata"]["uid"] not in self.admitted:
                self.fights.append(rayjob["metadata"]["name"])
                self._suspend(rayjob, preempted=False)
        waiting = sorted((r for r in rayjobs if r["metadata"]["uid"] not in self.admitted),
                         key=lambda r: (-self._priority(r), int(r["metadata"]["resourceVersion"])))
        by_uid = {r["metadata"]["uid"]: r for r in rayjobs}
        for rayjob in waiting:
            if len(self.admitted) >= capacity:
                running = [by_uid[u] for u in self.admitted if u in by_uid]
                lowest = min(running, key=self._priority, default=None)
                if lowest is None or self._priority(lowest) >= self._priority(rayjob):
                    break
                self._suspend(lowest, preempted=True)
            self.kube.patch(kube.rayjob_ref(self.namespace, rayjob["metadata"]["name"]), {"spec": {"suspend": False}})
            rayjob["spec"]["suspend"] = False
            self.admitted[rayjob["metadata"]["uid"]] = rayjob["metadata"]["name"]
            self.admissions.append(rayjob["metadata"]["name"])

    def _suspend(self, rayjob: Obj, preempted: bool) -> None:
        self.kube.patch(kube.rayjob_ref(self.namespace, rayjob["metadata"]["name"]), {"spec": {"suspend": True}})
        rayjob["spec"]["suspend"] = True  # this pass's copy too
        if self.admitted.pop(rayjob["metadata"]["uid"], None) is not None and preempted:
            self.preemptions.append(rayjob["metadata"]["name"])

    def _kuberay(self, rayjob: Obj) -> None:
        status = rayjob.get("status") or {}
        deployment = status.get("jobDeploymentStatus") or ""
        if deployment in FINISHED:
            return
        suspend = rayjob["spec"].get("suspend") is True
        name = rayjob["metadata"]["name"]
        if suspend:
            following = {"": "Initializing", "Initializing": "Suspending", "Running": "Suspending",
                         "Retrying": "Suspending", "Suspending": "Suspended"}.get(deployment)
        else:
            following = {"": "Initializing", "Suspended": "Initializing", "Suspending": "Suspended",
                         "Initializing": "Running"}.get(deployment)
        generation = rayjob["metadata"].get("generation", 1)
        if following is None:
            if status.get("observedGeneration") != generation:
                self._report(name, generation, {})
            return
        report: Obj = {"jobDeploymentStatus": following}
        if following == "Running":
            report |= {"jobStatus": "RUNNING", "rayClusterName": f"{name}-raycluster"}
        elif following in ("Suspending", "Suspended", "Initializing"):
            report |= {"jobStatus": "", "rayClusterName": None}
        self._report(name, generation, report)

    def _report(self, name: str, generation: int, status: Obj) -> None:
        self.kube.patch_status(kube.rayjob_ref(self.namespace, name), {"observedGeneration": generation, **status})

