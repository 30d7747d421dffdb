"""The objects the operator writes for one job, built by the operator's own builders."""

from __future__ import annotations

from typing import Any

from kubetune.api.finetunejob import FineTuneJob
from kubetune.operator import builders

SPEC: dict[str, Any] = {
    "baseModel": {"name": "meta-llama/Llama-2-7b-hf"},
    "dataset": {"train": {"uri": "s3://b/train.jsonl"}, "validation": {"uri": "s3://b/valid.jsonl"},
                "template": {"prompt": "<Q>{ref}", "completion": "<A>{mr}"}},
    "output": {"uri": "s3://b/runs"},
}


def job_objects(name: str, namespace: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(FineTuneJob manifest, its ConfigMap, its RayJob); owner uid is a placeholder."""
    manifest = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": namespace}, "spec": SPEC}
    job = FineTuneJob.from_body({**manifest, "metadata": {**manifest["metadata"], "uid": f"uid-{name}"}})
    names = builders.children(job)
    return manifest, builders.config_map(job, names), builders.ray_job(job, names)
