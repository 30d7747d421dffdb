"""Factories for test objects: valid by default, one override per behaviour under test."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
KUBERAY_CRDS = SHARED / "kuberay-crds"


def set_path(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """set_path(d, "spec.dataset.maxLength", 8): set a dotted path, creating dicts on the way."""
    *parents, last = path.split(".")
    node = obj
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return obj


def ftj_manifest(name: str = "viggo", namespace: str = "default", **paths: Any) -> dict[str, Any]:
    """A valid FineTuneJob manifest; keyword args are dotted paths with '__' for '.'."""
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
    for dotted, value in paths.items():
        set_path(body, dotted.replace("__", "."), value)
    return body


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
    for dotted, value in paths.items():
        set_path(body, dotted.replace("__", "."), value)
    return body


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


@functools.cache
def kuberay_crd(plural: str) -> dict[str, Any] | None:
    """The KubeRay v1.7.0 CRD for `plural` from ../shared, or None where that folder is absent.

    Parsed once per session (the CRDs are ~20k lines: with libyaml where present); shared between tests,
    so never change it.
    """
    path = KUBERAY_CRDS / f"ray.io_{plural}.yaml"
    if not path.exists():
        return None
    crd: dict[str, Any] = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return crd
