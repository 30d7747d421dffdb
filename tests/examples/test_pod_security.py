"""Every pod kubetune creates passes Pod Security "restricted", field by field.

A namespace that enforces the restricted profile refuses any other pod, and KubeRay's RayJob or RayService
then waits forever. The rules below are the profile's (https://kubernetes.io/docs/concepts/security/
pod-security-standards/, baseline and restricted, Kubernetes 1.30+), checked on every pod template the
builders make: training head, workers and job submitter; serving heads and workers; the evaluator's head
and submitter; for a default FineTuneJob and EvalJob and for every example.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from test_examples import EVALJOBS, JOBS, built

from factories import EXTRA_RESOURCES, evj, ftj, full_pod_template
from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract.evalplan import cluster_base_url, plan, service_name
from kubetune.operator import builders, evalbuilders

Obj = dict[str, Any]

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: Obj) -> list[str]:
    """Why Pod Security "restricted" would refuse a pod with this spec (empty: it admits it)."""
    found: list[str] = []
    pod_ctx = pod.get("securityContext") or {}
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]
    if not containers:
        found.append("no containers")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"{key}: true")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    for sysctl in pod_ctx.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    if pod_ctx.get("runAsUser") == 0:
        found.append("pod runAsUser: 0")
    pod_seccomp = (pod_ctx.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        found.append(f"pod seccompProfile {pod_seccomp}")
    for c in containers:
        ctx, name = c.get("securityContext") or {}, c.get("name")
        if ctx.get("privileged"):
            found.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if not (ctx.get("runAsNonRoot") is True or (pod_ctx.get("runAsNonRoot") is True
                                                      and ctx.get("runAsNonRoot") is not False)):
            found.append(f"{name}: runAsNonRoot is not true")
        if ctx.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = (ctx.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities add {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{name}: hostPort")
        if ctx.get("procMount") not in (None, "Default"):
            found.append(f"{name}: procMount {ctx['procMount']}")
        if (ctx.get("seLinuxOptions") or {}).get("user") or (ctx.get("seLinuxOptions") or {}).get("role"):
            found.append(f"{name}: seLinuxOptions user/role")
    return found


def pod_templates(obj: Obj) -> Iterator[tuple[str, Obj]]:
    """(where, pod spec) of every pod template in a RayJob or RayService."""
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    name = obj["metadata"]["name"]
    yield f"{name} head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"{name} {group['groupName']}", group["template"]["spec"]
    if "submitterPodTemplate" in spec:
        yield f"{name} submitter", spec["submitterPodTemplate"]["spec"]


def training(job: FineTuneJob) -> Obj:
    ref = job.spec.base_model.fine_tune_job_ref
    resolved = f"s3://kubetune-examples/runs/{ref.name}/best" if ref else None
    return builders.ray_job(job, builders.children(job), base_model_uri=resolved)


def example_job(name: str) -> FineTuneJob:
    body = copy.deepcopy(JOBS[name][1])
    body["metadata"] = {**body["metadata"], "namespace": "default", "uid": "uid-1", "generation": 1}
    return FineTuneJob.from_body(body)


def with_pod_template() -> Iterator[tuple[str, Obj]]:
    """The Ray objects of a FineTuneJob and an EvalJob using every podTemplate field (and extra resources):
    nothing a user can set there may break the profile."""
    template = full_pod_template()
    yield "podTemplate", training(ftj(spec__podTemplate=template,
                                      spec__resources__worker={"cpu": "8", "memory": "48Gi", "extra": EXTRA_RESOURCES}))
    job = evj(spec__podTemplate=template)
    base_urls = {c.name: cluster_base_url(service_name(job.metadata.name, c.name), "default")
                 for c in job.spec.candidates if c.model.served}
    resolved = plan(job, {"fine-tuned": "s3://bucket/runs/viggo/best", "base": "meta-llama/Llama-2-7b-hf"},
                    {"viggo": ftj()}, base_urls)
    for planned in resolved.candidates:
        yield "podTemplate", evalbuilders.ray_service(job, planned)
    yield "podTemplate", evalbuilders.eval_ray_job(job, evalbuilders.children(job), resolved)


def all_ray_objects() -> Iterator[tuple[str, Obj]]:
    """(label, RayJob or RayService) for a default FineTuneJob, for every example of either kind, and for jobs
    using every podTemplate field."""
    yield "default", training(ftj())
    yield from with_pod_template()
    for name in JOBS:
        yield name, training(example_job(name))
    for name in EVALJOBS:
        _, services, rayjob = built(name)
        for obj in (*services, rayjob):
            yield name, obj


CASES = [(f"{label}: {obj['kind']} {where}", pod) for label, obj in all_ray_objects()
         for where, pod in pod_templates(obj)]


@pytest.mark.parametrize(("where", "pod"), CASES, ids=[c[0] for c in CASES])
def test_every_pod_template_passes_the_restricted_profile(where: str, pod: Obj) -> None:
    assert restricted_violations(pod) == []


def test_every_kind_of_pod_is_checked() -> None:
    kinds = {where.split(": ", 1)[1].rsplit(" ", 1)[0].split(" ")[0] + " " + where.rsplit(" ", 1)[1]
             for where, _ in CASES}
    assert {"RayJob head", "RayJob gpu-workers", "RayJob submitter", "RayService head",
            "RayService serve-workers"} <= kinds


def test_serving_pods_have_no_api_token() -> None:
    for name in EVALJOBS:
        _, services, _ = built(name)
        for service in services:
            for _, pod in pod_templates(service):
                assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("breach, expected", [
    ({"securityContext": None}, "runAsNonRoot is not true"),
    ({"containers.securityContext.allowPrivilegeEscalation": True}, "allowPrivilegeEscalation is not false"),
    ({"containers.securityContext.capabilities": {"drop": []}}, "capabilities do not drop ALL"),
    ({"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}, "volume host"),
    ({"hostNetwork": True}, "hostNetwork: true"),
])
def test_the_checker_catches_each_breach(breach: Obj, expected: str) -> None:
    """The checker itself: a compliant pod with one field broken is refused, naming that field."""
    pod = copy.deepcopy(next(pod for _, pod in pod_templates(training(ftj()))))
    assert restricted_violations(pod) == []
    for path, value in breach.items():
        if path.startswith("containers."):
            target = pod["containers"][0]
            *parents, leaf = path.split(".")[1:]
            for key in parents:
                target = target[key]
            target[leaf] = value
        elif value is None:
            pod.pop(path)
            for c in pod["containers"]:
                c["securityContext"].pop("runAsNonRoot")
        else:
            pod[path] = value
    assert any(expected in v for v in restricted_violations(pod))
