"""Factories for test objects: valid by default, one override per behaviour under test.

The one override style: keyword arguments are dotted paths with '__' for '.', set over the valid default
(`ftj_manifest(spec__hyperparameters__epochs=3)`, `evj(spec__serving={"replicas": 2})`). For what a keyword
cannot say (list items, removal), edit the returned manifest with `set_path`, `del_path` and `get_path`,
whose paths are the apiserver's field paths (`spec.resources.tolerations[0].operator`).
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Any

from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob

ROOT = Path(__file__).resolve().parents[1]

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parts(path: str) -> list[str | int]:
    return [name if name else int(index) for name, index in _PART.findall(path)]


def _parent(doc: dict[str, Any], parts: list[str | int]) -> Any:
    node: Any = doc
    for part, nxt in itertools.pairwise(parts):
        node = node[part] if isinstance(part, int) else node.setdefault(part, [] if isinstance(nxt, int) else {})
    return node


def set_path(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """set_path(d, "spec.dataset.maxLength", 8) (or "spec.candidates[1].name"): set a copy of `value` in
    place, creating missing objects on the way. Returns `doc`."""
    parts = _parts(path)
    _parent(doc, parts)[parts[-1]] = copy.deepcopy(value)
    return doc


def del_path(doc: dict[str, Any], path: str) -> dict[str, Any]:
    """Remove the field at a path in place (KeyError when absent). Returns `doc`."""
    parts = _parts(path)
    del _parent(doc, parts)[parts[-1]]
    return doc


def get_path(doc: Any, path: str) -> Any:
    """The value at a path (KeyError/IndexError when absent)."""
    for part in _parts(path):
        doc = doc[part]
    return doc


def _override(body: dict[str, Any], paths: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in paths.items():
        set_path(body, dotted.replace("__", "."), value)
    return body


def ftj_manifest(name: str = "viggo", namespace: str = "default", **paths: Any) -> dict[str, Any]:
    """A valid FineTuneJob manifest (a dict, as kubectl would send it); keyword args are dotted paths with
    '__' for '.' (`spec__suspend=True`)."""
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"name": "meta-llama/Llama-2-7b-hf"},
            "dataset": {
                "train": {"uri": "s3://bucket/viggo/train.jsonl"},
                "validation": {"uri": "s3://bucket/viggo/valid.jsonl"},
                "template": {
                    "specialTokens": ["<START_Q>", "<END_Q>", "<START_A>", "<END_A>"],
                    "prompt": "<START_Q>{ref}<END_Q>",
                    "completion": "<START_A>{mr}",
                    "stop": "<END_A>",
                },
            },
            "output": {"uri": "s3://bucket/runs/viggo"},
        },
    }
    return _override(body, paths)


def ftj(name: str = "viggo", uid: str = "uid-1", generation: int = 1, status: dict[str, Any] | None = None,
        **paths: Any) -> FineTuneJob:
    """A parsed FineTuneJob as the operator sees it (uid and generation assigned)."""
    body = ftj_manifest(name, **paths)
    body["metadata"].update(uid=uid, generation=generation)
    if status is not None:
        body["status"] = copy.deepcopy(status)
    return FineTuneJob.from_body(body)


def evj_manifest(name: str = "viggo-eval", namespace: str = "default", **paths: Any) -> dict[str, Any]:
    """A valid EvalJob manifest: the FineTuneJob `viggo` against the base model few-shot, scored with viggo.

    Keyword args are dotted paths with '__' for '.', like ftj_manifest (`spec__keepServing=True`).
    """
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "EvalJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "candidates": [
                {"name": "fine-tuned", "model": {"fineTuneJobRef": {"name": "viggo"}}},
                {"name": "base", "model": {"name": "meta-llama/Llama-2-7b-hf"},
                 "prompt": {"instruction": "Give the meaning representation.",
                            "template": "Sentence: {ref}\nMeaning representation:", "answer": " {mr}",
                            "fewShot": {"k": 2, "source": {"uri": "s3://bucket/viggo/train.jsonl"}}},
                 "generation": {"stop": ["\n"]}},
            ],
            "dataset": {"uri": "s3://bucket/viggo/test.jsonl", "reference": "{mr}"},
            "scorer": {"name": "viggo"},
            "output": {"uri": "s3://bucket/viggo/eval"},
        },
    }
    return _override(body, paths)


def evj(name: str = "viggo-eval", uid: str = "evj-uid-1", generation: int = 1,
        status: dict[str, Any] | None = None, **paths: Any) -> EvalJob:
    """A parsed EvalJob as the operator sees it (uid and generation assigned)."""
    body = evj_manifest(name, **paths)
    body["metadata"].update(uid=uid, generation=generation)
    if status is not None:
        body["status"] = copy.deepcopy(status)
    return EvalJob.from_body(body)


def rayjob(name: str = "viggo-train", generation: int = 1, **status: Any) -> dict[str, Any]:
    """A RayJob as KubeRay would report it."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": "default", "generation": generation},
        "status": status,
    }


# Everything podTemplate accepts, at once: an IRSA ServiceAccount, a Secret as env, a CSI secret store, scratch
# space, a token for workload identity federation, placement.
_FULL_POD_TEMPLATE: dict[str, Any] = {
    "serviceAccountName": "ml-team-s3",
    "labels": {"team": "nlp", "cost-center": "ml-42"},
    "annotations": {"example.com/owner": "nlp@example.com"},
    "priorityClassName": "batch-high",
    "schedulerName": "volcano",
    "imagePullSecrets": [{"name": "registry-creds"}],
    "env": [{"name": "AWS_REGION", "value": "us-east-1"},
            {"name": "MLFLOW_TRACKING_TOKEN", "valueFrom": {"secretKeyRef": {"name": "mlflow", "key": "token"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "MEM_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}}],
    "envFrom": [{"secretRef": {"name": "s3-credentials"}}, {"configMapRef": {"name": "team-env"}, "prefix": "TEAM_"}],
    "volumes": [
        {"name": "scratch", "emptyDir": {"sizeLimit": "200Gi"}},
        {"name": "secrets-store", "csi": {"driver": "secrets-store.csi.k8s.io", "readOnly": True,
                                          "volumeAttributes": {"secretProviderClass": "ml-team"}}},
        {"name": "wif-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "sts.amazonaws.com", "expirationSeconds": 3600, "path": "token"}}]}},
        {"name": "ca", "configMap": {"name": "corp-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"name": "tls", "secret": {"secretName": "client-tls", "defaultMode": 0o440}},
        {"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
        {"name": "podinfo", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"
                                                                                                     "['team']"}}]}},
        {"name": "cache", "ephemeral": {"volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"], "storageClassName": "gp3", "resources": {"requests": {"storage": "500Gi"}}}}}},
    ],
    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"},
                     {"name": "secrets-store", "mountPath": "/mnt/secrets", "readOnly": True},
                     {"name": "wif-token", "mountPath": "/var/run/secrets/wif"},
                     {"name": "ca", "mountPath": "/etc/ssl/corp", "readOnly": True},
                     {"name": "tls", "mountPath": "/etc/tls"},
                     {"name": "datasets", "mountPath": "/data", "subPath": "viggo"},
                     {"name": "podinfo", "mountPath": "/etc/podinfo"},
                     {"name": "cache", "mountPath": "/cache", "mountPropagation": "None"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-east-1a"]},
                {"key": "example.com/gpu-generation", "operator": "Gt", "values": ["8"]}]}]},
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 50, "preference": {
                "matchExpressions": [{"key": "karpenter.sh/capacity-type", "operator": "In",
                                      "values": ["on-demand"]}]}}]},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"team": "nlp"}}, "topologyKey": "kubernetes.io/hostname"}}]},
        "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
            "namespaceSelector": {}, "topologyKey": "topology.kubernetes.io/zone"}]},
    },
}
# Extra resources of a Ray pod, one of each kind: local scratch, huge pages, an extended resource (EFA).
EXTRA_RESOURCES: dict[str, Any] = {"ephemeral-storage": "200Gi", "hugepages-2Mi": "1Gi", "vpc.amazonaws.com/efa": 4}


def full_pod_template() -> dict[str, Any]:
    """A spec.podTemplate with every field podTemplate offers (a fresh copy)."""
    return copy.deepcopy(_FULL_POD_TEMPLATE)
