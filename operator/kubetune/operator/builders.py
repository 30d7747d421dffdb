"""Builders: a parsed FineTuneJob in, the exact child objects (plain dicts) out. No I/O here."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import yaml

from kubetune.api.common import API_VERSION, GPU_PRODUCT_LABEL, GPU_PRODUCTS, GROUP, PodResources
from kubetune.api.finetunejob import PLURAL, Children, FineTuneJob
from kubetune.api.pods import PRIORITY_CLASS_LABEL, QUEUE_LABEL, PodTemplate
from kubetune.operator import podtemplate
from kubetune.operator.kube import RAY_API_VERSION, Obj
from kubetune.operator.podtemplate import Role
from kubetune.operator.tracking import tracking_env

_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when PyYAML has it: same output, faster
LABEL_JOB = f"{GROUP}/finetunejob"
# On every pod of one Ray cluster (head, workers, job submitter): the Ray object it belongs to. Its
# NetworkPolicy selects the cluster's pods, and lets them reach each other, by this label.
LABEL_RAY_CLUSTER = f"{GROUP}/ray-cluster"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune-operator"
# Before per-job identities, one ServiceAccount/Role/RoleBinding of this name served every job of a
# namespace. The operator no longer creates or touches them (README: how to remove them).
RETIRED_SHARED_ACCOUNT = "kubetune-trainer"

CONFIG_DIR = "/etc/kubetune"
CONFIG_KEY = "finetunejob.yaml"
DEEPSPEED_DIR = "/etc/kubetune/deepspeed"
PVC_ROOT = "/mnt/pvc"
# Ray's token authentication (Ray >= 2.52, KubeRay >= 1.5.1) on every Ray cluster kubetune starts: KubeRay
# generates the token Secret and gives it to the cluster's pods and its job submitter, so the dashboard,
# job API and GCS refuse anyone without it (ShadowRay, CVE-2023-48022).
RAY_TOKEN_AUTH = {"mode": "token"}
# Pod Security "restricted" for every pod kubetune creates: the runtime image's non-root `ray` user (UID and
# GID 1000, Dockerfile), no privilege escalation, no capabilities, the runtime's default seccomp profile.
RUNTIME_UID = 1000


def pod_security_context() -> Obj:
    """The pod-level securityContext of every pod kubetune creates (Pod Security "restricted")."""
    return {"runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID, "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> Obj:
    """The securityContext of every container kubetune creates (Pod Security "restricted")."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}}


def submitter_pod_template(image: str, labels_: dict[str, str], service_account: str,
                           template: PodTemplate | None = None) -> Obj:
    """The pod KubeRay runs `ray job submit` in (K8sJobMode): KubeRay's default one sets no securityContext,
    which a namespace enforcing Pod Security "restricted" refuses. KubeRay fills in the command, the
    dashboard address and, with token authentication, the token. Of `template`, it gets what every pod
    gets (labels, annotations, priority, scheduler, pull Secrets), not env or volumes."""
    limits = {"cpu": "1", "memory": "1Gi"}
    return podtemplate.apply({
        "metadata": {"labels": labels_},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": service_account,
            "automountServiceAccountToken": False,  # it talks to the Ray job API only
            "securityContext": pod_security_context(),
            "containers": [{"name": "ray-job-submitter", "image": image,
                            "resources": {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": limits},
                            "securityContext": container_security_context()}],
        },
    }, template, Role.SUBMITTER)


def queue_labels(queue_name: str | None, workload_priority_class_name: str | None) -> dict[str, str]:
    """Kueue's labels on a RayJob: its LocalQueue and WorkloadPriorityClass (none without a queue)."""
    if queue_name is None:
        return {}
    out = {QUEUE_LABEL: queue_name}
    if workload_priority_class_name is not None:
        out[PRIORITY_CLASS_LABEL] = workload_priority_class_name
    return out


def queued(job: FineTuneJob) -> bool:
    """Kueue admits the job's RayJob: it is created suspended, and only Kueue unsuspends it."""
    return job.spec.queue_name is not None


# The ports on a Ray head that anything outside its own cluster has a reason to reach: KubeRay's operator
# polls the dashboard (job status, Serve applications) and the dashboard agent, and checks GCS; Ray
# client; Serve's HTTP proxy.
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, SERVE_PORT, DASHBOARD_AGENT_PORT = 6379, 8265, 10001, 8000, 52365


def network_policy(name: str, namespace: str, owner: Obj, labels_: dict[str, str], kuberay_namespace: str,
                   serve_clients: dict[str, str] | None = None) -> Obj:
    """Ingress to the pods of the Ray cluster `name` (by LABEL_RAY_CLUSTER): from its own pods on any port
    (GCS, raylets, object transfer, the submitter's job API calls); from the KubeRay operator's namespace
    on the head's ports only; and, for a serving cluster, from `serve_clients` pods (the EvalJob's
    evaluator) on Serve's HTTP port only. Nothing else in the cluster can reach it (ShadowRay)."""
    cluster = {LABEL_RAY_CLUSTER: name}
    head_ports = [{"protocol": "TCP", "port": p}
                  for p in (GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, SERVE_PORT, DASHBOARD_AGENT_PORT)]
    ingress: list[Obj] = [
        {"from": [{"podSelector": {"matchLabels": cluster}}]},
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": kuberay_namespace}}}],
         "ports": head_ports},
    ]
    if serve_clients:
        ingress.append({"from": [{"podSelector": {"matchLabels": serve_clients}}],
                        "ports": [{"protocol": "TCP", "port": SERVE_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": labels_, "ownerReferences": [owner]},
        "spec": {"podSelector": {"matchLabels": cluster}, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def training_network_policy(job: FineTuneJob, names: Children, kuberay_namespace: str) -> Obj:
    """The NetworkPolicy of the job's Ray cluster (named after its RayJob)."""
    assert names.ray_job
    return network_policy(names.ray_job, job.metadata.namespace, owner_reference(job),
                          labels(job, "network-policy"), kuberay_namespace)


# KubeRay derives RayCluster and submitter names from the RayJob's and rejects longer RayJob names.
MAX_RAYJOB_NAME = 47


def child_name(owner: str, suffix: str, limit: int) -> str:
    """`<owner>-<suffix>`, shortened with a stable hash when it would exceed `limit` characters."""
    name = f"{owner}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(owner.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 2
    return f"{owner[:keep].rstrip('-')}-{digest}-{suffix}"


def children(job: FineTuneJob) -> Children:
    """The deterministic names of everything the operator creates for `job`."""
    name = job.metadata.name
    return Children(
        ray_job=child_name(name, "train", MAX_RAYJOB_NAME),
        config_map=child_name(name, "trainer-config", 253),
        # The user's ServiceAccount (cloud identity), or the job's own, named like its Role and RoleBinding.
        service_account=service_account_of(job.spec.pod_template) or identity_name(job),
    )


def service_account_of(template: PodTemplate | None) -> str | None:
    """The ServiceAccount a job's podTemplate names (a cloud identity), if any."""
    return template.service_account_name if template is not None else None


def identity_name(job: FineTuneJob) -> str:
    """The name of the job's Role and RoleBinding, and of its own ServiceAccount where it needs one."""
    return child_name(job.metadata.name, "trainer", 253)


def owner_reference(job: FineTuneJob) -> Obj:
    """Controller owner reference: deleting the FineTuneJob deletes its children."""
    return {
        "apiVersion": API_VERSION,
        "kind": job.kind,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(job: FineTuneJob, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/component": component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB: job.metadata.name,
    }


def _metadata(job: FineTuneJob, name: str, component: str) -> Obj:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": labels(job, component),
        "ownerReferences": [owner_reference(job)],
    }


def trainer_config(job: FineTuneJob, base_model_uri: str | None = None) -> Obj:
    """The FineTuneJob the trainer reads: spec as applied, with fineTuneJobRef resolved to a uri."""
    spec = job.spec.to_wire()
    if base_model_uri is not None:
        spec["baseModel"] = {"uri": base_model_uri}
    return {
        "apiVersion": API_VERSION,
        "kind": job.kind,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace,
                     "uid": job.metadata.uid},
        "spec": spec,
    }


def config_map(job: FineTuneJob, names: Children, base_model_uri: str | None = None) -> Obj:
    """ConfigMap holding the resolved trainer config, mounted at /etc/kubetune in every Ray pod."""
    assert names.config_map
    document = yaml.dump(trainer_config(job, base_model_uri), Dumper=_DUMPER, sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names.config_map, "trainer-config"),
        "data": {CONFIG_KEY: document},
    }


def claims_of(uris: Iterable[str | None]) -> list[str]:
    """PersistentVolumeClaims named by the pvc://claim/path URIs among `uris`, in order, once each."""
    claims: list[str] = []
    for uri in uris:
        if uri and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            if claim and claim not in claims:
                claims.append(claim)
    return claims


def pvc_claims(job: FineTuneJob, base_model_uri: str | None = None) -> list[str]:
    """PersistentVolumeClaims named by pvc://claim/path URIs anywhere in the spec, in order."""
    spec = job.spec
    return claims_of([base_model_uri or spec.base_model.uri, spec.dataset.train.uri,
                      spec.dataset.validation.uri if spec.dataset.validation else None, spec.output.uri,
                      *(spec.tracking.uris() if spec.tracking else [])])


def pvc_volumes(claims: list[str]) -> tuple[list[Obj], list[Obj]]:
    """(volumes, mounts) for `claims`, each mounted at PVC_ROOT/<claim> (how pvc:// URIs resolve in pods)."""
    volumes = [{"name": f"kubetune-pvc-{i}", "persistentVolumeClaim": {"claimName": claim}}
               for i, claim in enumerate(claims)]
    mounts = [{"name": f"kubetune-pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}"} for i, claim in enumerate(claims)]
    return volumes, mounts


def _volumes(job: FineTuneJob, names: Children, claims: list[str]) -> tuple[list[Obj], list[Obj]]:
    volumes: list[Obj] = [
        {"name": "kubetune-config", "configMap": {"name": names.config_map}},
        # NCCL and DeepSpeed need more shared memory than the container default of 64 MiB.
        {"name": "kubetune-dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[Obj] = [
        {"name": "kubetune-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "kubetune-dshm", "mountPath": "/dev/shm"},
    ]
    ds_ref = job.spec.deepspeed.config_map_ref
    if ds_ref is not None:
        volumes.append({"name": "kubetune-deepspeed-config", "configMap": {"name": ds_ref.name}})
        mounts.append({"name": "kubetune-deepspeed-config", "mountPath": DEEPSPEED_DIR, "readOnly": True})
    pvc_vols, pvc_mounts = pvc_volumes(claims)
    return volumes + pvc_vols, mounts + pvc_mounts


def _env(job: FineTuneJob) -> list[Obj]:
    env: list[Obj] = [
        {"name": "KUBETUNE_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "KUBETUNE_FINETUNEJOB", "value": job.metadata.name},
        {"name": "KUBETUNE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBETUNE_PVC_ROOT", "value": PVC_ROOT},
    ]
    if job.spec.deepspeed.config_map_ref is not None:
        key = job.spec.deepspeed.config_map_ref.key
        env.append({"name": "KUBETUNE_DEEPSPEED_CONFIG", "value": f"{DEEPSPEED_DIR}/{key}"})
    token = job.spec.base_model.token_secret_ref
    if token is not None:
        env.append({"name": "HF_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    env += tracking_env(job.spec.tracking)  # spec.tracking's credentials (head and workers: rank 0 logs)
    return env


def _container(job: FineTuneJob, name: str, pod: PodResources, gpus: int, mounts: list[Obj],
               ports: list[Obj] | None = None) -> Obj:
    container: Obj = {
        "name": name,
        "image": job.spec.resources.image,
        "env": _env(job),
        "resources": podtemplate.resources(pod.cpu, pod.memory, gpus, pod.extra),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
    if ports:
        container["ports"] = ports
    return container


def worker_node_selector(job: FineTuneJob) -> dict[str, str]:
    res = job.spec.resources
    return gpu_node_selector(res.gpus_per_worker, res.gpu_type, res.node_selector)


def gpu_node_selector(gpus: int, gpu_type: str, extra: dict[str, str]) -> dict[str, str]:
    """The GPU product label (when the pod takes GPUs), then the spec's own nodeSelector on top."""
    selector: dict[str, str] = {GPU_PRODUCT_LABEL: GPU_PRODUCTS.get(gpu_type, gpu_type)} if gpus else {}
    selector.update(extra)
    return selector


def ray_job(job: FineTuneJob, names: Children, base_model_uri: str | None = None) -> Obj:
    """The KubeRay RayJob: a CPU head and `workers` GPU workers running `python -m kubetune.trainer`."""
    assert names.ray_job and names.service_account
    spec, res = job.spec, job.spec.resources
    volumes, mounts = _volumes(job, names, pvc_claims(job, base_model_uri))
    head_ports = [{"containerPort": 6379, "name": "gcs-server"},
                  {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}]
    template = spec.pod_template
    head_pod = podtemplate.apply({
        "metadata": {"labels": {**labels(job, "ray-head"), LABEL_RAY_CLUSTER: names.ray_job}},
        "spec": {
            "serviceAccountName": names.service_account,
            "securityContext": pod_security_context(),
            "containers": [_container(job, "ray-head", res.head, 0, mounts, head_ports)],
            "volumes": volumes,
        },
    }, template, Role.HEAD)
    worker_pod = podtemplate.apply({
        "metadata": {"labels": {**labels(job, "ray-worker"), LABEL_RAY_CLUSTER: names.ray_job}},
        "spec": {
            "serviceAccountName": names.service_account,
            "securityContext": pod_security_context(),
            "containers": [_container(job, "ray-worker", res.worker, res.gpus_per_worker, mounts)],
            "volumes": volumes,
            "nodeSelector": worker_node_selector(job),
            "tolerations": [t.to_wire() for t in res.tolerations],
        },
    }, template, Role.WORKER)
    rayjob_spec: Obj = {
        "entrypoint": f"python -m kubetune.trainer --config {CONFIG_DIR}/{CONFIG_KEY}",
        "submissionMode": "K8sJobMode",
        # Kueue requires it of the RayJobs it admits: a finished job's Ray cluster gives its quota back.
        "shutdownAfterJobFinishes": True,
        "backoffLimit": spec.backoff_limit,
        # A queued RayJob is created suspended and only Kueue unsuspends it (admission); kubetune never does.
        "suspend": True if queued(job) else spec.suspend,
        "metadata": {"kubetune.io/finetunejob": f"{job.metadata.namespace}/{job.metadata.name}"},
        "submitterPodTemplate": submitter_pod_template(
            res.image, {**labels(job, "submitter"), LABEL_RAY_CLUSTER: names.ray_job}, names.service_account,
            template),
        "rayClusterSpec": {
            "rayVersion": res.ray_version,
            "authOptions": dict(RAY_TOKEN_AUTH),
            "headGroupSpec": {
                "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                "template": head_pod,
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu-workers",
                    "replicas": res.workers,
                    "minReplicas": res.workers,
                    "maxReplicas": res.workers,
                    "rayStartParams": {},
                    "template": worker_pod,
                }
            ],
        },
    }
    optional = {
        "activeDeadlineSeconds": spec.active_deadline_seconds,
        "preRunningDeadlineSeconds": spec.pre_running_deadline_seconds,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
    }
    rayjob_spec.update({k: v for k, v in optional.items() if v is not None})
    metadata = _metadata(job, names.ray_job, "trainer")
    metadata["labels"].update(queue_labels(spec.queue_name, spec.workload_priority_class_name))
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": metadata,
        "spec": rayjob_spec,
    }


def identity(name: str, namespace: str, plural: str, job_name: str, owner: Obj, labels_: dict[str, str],
             service_account: str | None = None) -> list[Obj]:
    """One job's own identity: a ServiceAccount, and a Role bound to it that may read and patch the status
    of that one job (`resourceNames`) and nothing else. Owned by the job: garbage-collected with it.

    The pods that report (the training driver its progress, the evaluator its results) run as it; a pod of
    one job cannot write another job's status. `service_account`: the user's own (a cloud identity): the
    Role is bound to that one and no ServiceAccount is created (nor ever touched).
    """
    meta = {"name": name, "namespace": namespace, "labels": labels_, "ownerReferences": [owner]}
    account = service_account or name
    own = [] if service_account else [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)}]
    return [
        *own,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": [{"apiGroups": [GROUP], "resources": [f"{plural}/status"], "resourceNames": [job_name],
                       "verbs": ["get", "patch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(meta),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    ]


def trainer_identity(job: FineTuneJob, names: Children) -> list[Obj]:
    """The FineTuneJob's ServiceAccount (unless spec.resources names one), Role and RoleBinding (`identity`)."""
    return identity(identity_name(job), job.metadata.namespace, PLURAL, job.metadata.name, owner_reference(job),
                    labels(job, "identity"), service_account_of(job.spec.pod_template))
