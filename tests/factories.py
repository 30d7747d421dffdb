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
