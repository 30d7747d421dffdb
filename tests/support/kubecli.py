"""A cluster for the CLI's tests: the fake Kubernetes API over HTTP with kubetune's and KubeRay's CRDs, where
the test plays the operator (creating the RayJob its builders make), KubeRay (the submitter
Job, the RayCluster and their pods) and the kubelet (pod phases and logs)."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from factories import evj_manifest, ftj, ftj_manifest
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract.evalplan import cluster_base_url, plan, service_name
from kubetune.operator import builders, evalbuilders
from support import shared
from support.fakekube import FakeKubeAPI
from support.harness import minimal_kuberay_crd, start_api

Obj = dict[str, Any]


def owner(obj: Obj, controller: bool = True) -> Obj:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": controller, "blockOwnerDeletion": True}


@dataclass
class Started:
    """What KubeRay made for one RayJob."""

    submitter_job: Obj | None
    submitter_pod: Obj | None
    ray_cluster: Obj | None
    head_pod: Obj | None


class FakeCluster:
    """The fake API and the roles the test plays in it, in one namespace (the kubeconfig's)."""

    def __init__(self, api: FakeKubeAPI, kubeconfig: Path, namespace: str = "default") -> None:
        self.api = api
        self.kubeconfig = kubeconfig
        self.namespace = namespace

    def in_namespace(self, namespace: str, kubeconfig: Path) -> FakeCluster:
        """The same API seen from another namespace, with a kubeconfig whose context defaults to it."""
        return FakeCluster(self.api, self.api.kubeconfig(kubeconfig, namespace=namespace), namespace)

    # -- plain HTTP
    def create(self, path: str, body: Obj) -> Obj:
        response = requests.post(f"{self.api.url}{path}", json=body, timeout=10)
        assert response.status_code == 201, response.text
        created: Obj = response.json()
        return created

    def patch(self, path: str, body: Obj, subresource: str = "") -> Obj:
        response = requests.patch(f"{self.api.url}{path}{subresource}", json=body, timeout=10,
                                  headers={"Content-Type": "application/merge-patch+json"})
        assert response.status_code == 200, response.text
        patched: Obj = response.json()
        return patched

    # -- the user
    def create_ftj(self, name: str = "viggo", **paths: Any) -> Obj:
        return self.create(f"/apis/kubetune.io/v1alpha1/namespaces/{self.namespace}/finetunejobs",
                           ftj_manifest(name, self.namespace, **paths))

    def create_evj(self, name: str = "viggo-eval", **paths: Any) -> Obj:
        return self.create(f"/apis/kubetune.io/v1alpha1/namespaces/{self.namespace}/evaljobs",
                           evj_manifest(name, self.namespace, **paths))

    def job_status(self, job: Obj, status: Obj) -> Obj:
        plural = "finetunejobs" if job["kind"] == "FineTuneJob" else "evaljobs"
        path = f"/apis/kubetune.io/v1alpha1/namespaces/{self.namespace}/{plural}/{job['metadata']['name']}"
        return self.patch(path, {"status": status}, "/status")

    # -- the operator
    def operator_rayjob(self, job: Obj, name: str | None = None) -> Obj:
        """The RayJob the operator's builders make for `job` (under another `name` if given), created."""
        if job["kind"] == "FineTuneJob":
            parsed = FineTuneJob.from_body(job)
            body = builders.ray_job(parsed, builders.children(parsed))
        else:
            evaljob = EvalJob.from_body(job)
            uris = {c.name: c.model.uri or c.model.name or "s3://bucket/runs/viggo/best"
                    for c in evaljob.spec.candidates if c.model.served}
            urls = {c: cluster_base_url(service_name(evaljob.metadata.name, c), self.namespace) for c in uris}
            resolved = plan(evaljob, uris, {"viggo": ftj("viggo")}, urls)
            body = evalbuilders.eval_ray_job(evaljob, evalbuilders.children(evaljob), resolved)
        if name is not None:
            body["metadata"]["name"] = name
        return self.create(f"/apis/ray.io/v1/namespaces/{self.namespace}/rayjobs", body)

    # -- KubeRay and the kubelet
    def pod(self, name: str, labels: dict[str, str], controller: Obj | None, containers: list[Obj],
            phase: str | None = "Running") -> Obj:
        meta: Obj = {"name": name, "labels": labels}
        if controller is not None:
            meta["ownerReferences"] = [owner(controller)]
        created = self.create(f"/api/v1/namespaces/{self.namespace}/pods",
                              {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                               "spec": {"containers": copy.deepcopy(containers)}})
        if phase is not None:
            self.set_phase(created, phase)
        return created

    def set_phase(self, pod: Obj, phase: str) -> None:
        self.patch(f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}",
                   {"status": {"phase": phase}}, "/status")

    def submitter(self, rayjob: Obj, *, labels: tuple[str, ...] = ("batch.kubernetes.io/job-name", "job-name"),
                  phase: str | None = "Running") -> tuple[Obj, Obj]:
        """KubeRay's submitter Job (named like the RayJob) and the pod the Job controller makes for it."""
        name = rayjob["metadata"]["name"]
        template = copy.deepcopy(rayjob["spec"]["submitterPodTemplate"])
        job = self.create(f"/apis/batch/v1/namespaces/{self.namespace}/jobs", {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": {"ray.io/originated-from-cr-name": name,
                                                  "ray.io/originated-from-crd": "RayJob"},
                         "ownerReferences": [owner(rayjob)]},
            "spec": {"backoffLimit": 2, "template": template}})
        pod_labels = {**template["metadata"]["labels"], **dict.fromkeys(labels, name),
                      "controller-uid": job["metadata"]["uid"]}
        pod = self.pod(f"{name}-{uuid.uuid4().hex[:5]}", pod_labels, job, template["spec"]["containers"], phase)
        return job, pod

    def ray_cluster(self, rayjob: Obj, *, phase: str | None = "Running") -> tuple[Obj, Obj]:
        """The RayCluster KubeRay makes for `rayjob` and its head pod."""
        name = f"{rayjob['metadata']['name']}-{uuid.uuid4().hex[:5]}"
        cluster = self.create(f"/apis/ray.io/v1/namespaces/{self.namespace}/rayclusters", {
            "apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": name, "labels": {"ray.io/originated-from-cr-name": rayjob["metadata"]["name"],
                                                  "ray.io/originated-from-crd": "RayJob"},
                         "ownerReferences": [owner(rayjob)]},
            "spec": copy.deepcopy(rayjob["spec"]["rayClusterSpec"])})
        head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        labels = {**head["metadata"]["labels"], "ray.io/cluster": name, "ray.io/node-type": "head",
                  "ray.io/group": "headgroup"}
        pod = self.pod(f"{name}-head-{uuid.uuid4().hex[:5]}", labels, cluster, head["spec"]["containers"], phase)
        return cluster, pod

    def kuberay_starts(self, rayjob: Obj, *, submitter: bool = True, head: bool = True) -> Started:
        job, submitter_pod = self.submitter(rayjob) if submitter else (None, None)
        cluster, head_pod = self.ray_cluster(rayjob) if head else (None, None)
        return Started(job, submitter_pod, cluster, head_pod)

    def log(self, pod: Obj, text: str, container: str | None = None) -> None:
        self.api.write_pod_log(self.namespace, pod["metadata"]["name"], text, container)


def start_cluster(tmp: Path) -> FakeCluster:
    """A started fake API with kubetune's CRDs and KubeRay's RayJob, RayService and RayCluster CRDs."""
    api, kubeconfig = start_api(tmp)
    path = shared.kuberay_crd_path("rayclusters")
    crd = copy.deepcopy(shared.load_yaml(path)) if shared.available(
        path, "RayClusters are admitted by a schemaless stand-in CRD") else minimal_kuberay_crd("RayCluster", "rayclusters")
    api.install_crd(crd)
    return FakeCluster(api, kubeconfig)
