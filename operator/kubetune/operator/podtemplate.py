"""A job's `spec.podTemplate`, merged into the pod templates the builders make. Pure: dicts in, dicts out.

Which pods get what, and who wins (the model, `kubetune.api.pods`, rejects every collision at apply time,
so the merge below never has to choose; kubetune's entries come first and are never replaced):

- every pod: labels and annotations (added beside kubetune's), priorityClassName, schedulerName,
  imagePullSecrets; the ServiceAccount is the builders' (`children().service_account`);
- the Ray pods (head, workers, serving, evaluator), not the job submitter (it only calls the Ray job API):
  env after kubetune's own, envFrom, volumes after kubetune's, volumeMounts after kubetune's;
- the worker pods only (training workers, serving replicas): affinity, like nodeSelector and tolerations.

securityContext, containers, images, commands and ports are kubetune's alone: the template has no field
that reaches them.
"""

from __future__ import annotations

import copy
from enum import StrEnum

from kubetune.api.pods import PodTemplate
from kubetune.operator.kube import Obj


class Role(StrEnum):
    """What a pod is for, which decides what of the template it gets."""

    HEAD = "head"  # a Ray head: training driver, serving controller, the evaluator
    WORKER = "worker"  # a Ray worker: training, a serving replica
    SUBMITTER = "submitter"  # KubeRay's job submitter (K8sJobMode): `ray job submit`, nothing else


def apply(pod: Obj, template: PodTemplate | None, role: Role) -> Obj:
    """`pod` (a PodTemplateSpec the builders made) with `template` merged in for a pod of `role`; `pod` is not
    changed."""
    if template is None:
        return pod
    out = copy.deepcopy(pod)
    meta, spec = out.setdefault("metadata", {}), out["spec"]
    if template.labels:
        meta["labels"] = {**template.labels, **meta.get("labels", {})}  # kubetune's keys last: they win
    if template.annotations:
        meta["annotations"] = {**template.annotations, **meta.get("annotations", {})}
    if template.priority_class_name:
        spec["priorityClassName"] = template.priority_class_name
    if template.scheduler_name:
        spec["schedulerName"] = template.scheduler_name
    if template.image_pull_secrets:
        spec["imagePullSecrets"] = [s.to_wire() for s in template.image_pull_secrets]
    if role is Role.WORKER and template.affinity is not None:
        spec["affinity"] = template.affinity.to_wire()
    if role is Role.SUBMITTER:
        return out
    container = spec["containers"][0]  # the Ray container (the builders make one per pod)
    if template.env:
        container["env"] = [*container.get("env", []), *(e.to_wire() for e in template.env)]
    if template.env_from:
        container["envFrom"] = [*container.get("envFrom", []), *(e.to_wire() for e in template.env_from)]
    if template.volumes:
        spec["volumes"] = [*spec.get("volumes", []), *(v.to_wire() for v in template.volumes)]
    if template.volume_mounts:
        container["volumeMounts"] = [*container.get("volumeMounts", []), *(m.to_wire() for m in template.volume_mounts)]
    return out


def resources(cpu: str, memory: str, gpus: int, extra: dict[str, str] | None) -> Obj:
    """A Ray container's requests and limits (equal: Guaranteed QoS): cpu, memory, the GPUs, then the extras
    (ephemeral-storage, hugepages, extended resources; the model keeps cpu, memory and GPUs out of them)."""
    limits: Obj = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    for name, quantity in (extra or {}).items():
        limits.setdefault(name, quantity)
    return {"requests": dict(limits), "limits": limits}
