"""Render charts/kubetune with the real helm binary (fetched by `make tools`), offline.

`render(scenario)` runs `helm template` once per scenario and caches the parsed documents. The
scenarios are the value sets the chart promises to support; every chart test runs over all of them
unless it is about one.
"""

from __future__ import annotations

import functools
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"
CHART = ROOT / "charts" / "kubetune"
RELEASE = "kt"
NAMESPACE = "kubetune-system"
FULLNAME = f"{RELEASE}-kubetune"

Obj = dict[str, Any]

SCENARIOS: dict[str, Obj] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "crds-disabled": {"crds": {"enabled": False}},
    "crds-not-kept": {"crds": {"keep": False}},
    "no-user-roles": {"rbac": {"aggregateToDefaultRoles": False}},
    "no-network-policies": {"networkPolicy": {"enabled": False}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "customised": {
        "fullnameOverride": "tuner",
        "image": {"repository": "registry.example.com/kubetune/operator",
                  "digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccount": {"create": False, "name": "existing-sa"},
        "operator": {"verbose": True, "waitForModelDelaySeconds": 10, "reconcileIntervalSeconds": 30,
                     "secretWaitSeconds": 0,
                     "extraEnv": [{"name": "KUBETUNE_BATCH_WINDOW", "value": "0.1"},
                                  {"name": "HTTPS_PROXY",
                                   "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "url"}}}]},
        "metrics": {"port": 9090, "service": {"port": 9090, "annotations": {"a": "b"}}},
        "healthPort": 9091,
        "securityContext": {"runAsUser": None, "runAsGroup": None},
        "podAnnotations": {"example.com/owner": "ml-platform"},
        "podLabels": {"team": "ml"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]}]}}},
        "resources": {"requests": {"cpu": "200m", "memory": "300Mi"}, "limits": {"memory": "1Gi"}},
    },
}


def helm_missing() -> bool:
    return not HELM.exists()


requires_helm = pytest.mark.skipif(helm_missing(), reason="run `make tools` to fetch helm into .tools/bin")


def helm(*args: str, values: Obj | None = None) -> subprocess.CompletedProcess[str]:
    """Run helm with `values` written to a values file; never touches a cluster or the network."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        # JSON is YAML: a None stays null, which is how a user unsets a default.
        json.dump(values or {}, file)
        file.flush()
        return subprocess.run([str(HELM), *args, "--values", file.name], capture_output=True, text=True,
                              timeout=60, check=False)


def template(values: Obj | None = None) -> subprocess.CompletedProcess[str]:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values)


@functools.cache
def _render(scenario: str) -> tuple[Obj, ...]:
    result = template(SCENARIOS[scenario])
    assert result.returncode == 0, f"helm template ({scenario}) failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(scenario: str) -> list[Obj]:
    """The rendered objects of a scenario (fresh copies: tests may mutate them)."""
    return json.loads(json.dumps(_render(scenario)))


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str) -> Obj:
    found = of_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]
