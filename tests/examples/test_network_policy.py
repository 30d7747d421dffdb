"""One NetworkPolicy per Ray cluster kubetune starts: only the cluster's own pods, KubeRay's operator (on the
head's ports) and, for serving, the EvalJob's evaluator (on Serve's port) may reach it. Checked on a default
FineTuneJob and every example, against the networking/v1 schema."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from test_examples import EVALJOBS, JOBS, built
from test_pod_security import example_job, pod_templates, training

from factories import ftj
from kubetune.api.finetunejob import FineTuneJob
from kubetune.operator import builders, evalbuilders

Obj = dict[str, Any]
KUBERAY = "ray-system"
KUBE_VERSIONS = ["1.29.0", "1.35.0"]  # as the chart is checked


def training_policy(job: FineTuneJob) -> Obj:
    return builders.training_network_policy(job, builders.children(job), KUBERAY)


def ingress_from(policy: Obj, peer: Obj) -> list[Obj]:
    """The ingress rules whose `from` is exactly [peer]."""
    return [rule for rule in policy["spec"]["ingress"] if rule["from"] == [peer]]


def test_the_training_policy_selects_every_pod_of_its_ray_cluster() -> None:
    job = ftj()
    policy, rayjob = training_policy(job), training(job)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    pods = list(pod_templates(rayjob))
    assert len(pods) == 3  # head, workers, submitter
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"],
                 rayjob["spec"]["submitterPodTemplate"]]
    assert all(selector.items() <= t["metadata"]["labels"].items() for t in templates)
    assert policy["metadata"]["name"] == rayjob["metadata"]["name"]
    assert policy["metadata"]["ownerReferences"] == [builders.owner_reference(job)]


def test_only_its_own_pods_reach_every_port() -> None:
    policy = training_policy(ftj())
    own = {"podSelector": {"matchLabels": policy["spec"]["podSelector"]["matchLabels"]}}
    assert ingress_from(policy, own) == [{"from": [own]}]
    assert all("ports" in rule for rule in policy["spec"]["ingress"] if rule["from"] != [own])
    assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_kuberay_reaches_the_head_ports_only() -> None:
    policy = training_policy(ftj())
    (rule,) = ingress_from(policy, {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": KUBERAY}}})
    assert {p["port"] for p in rule["ports"]} == {6379, 8265, 10001, 8000, 52365}


def test_a_serving_cluster_admits_its_evaluator_on_serves_port_only() -> None:
    name = next(iter(EVALJOBS))
    job, services, rayjob = built(name)
    names = evalbuilders.children(job)
    policies = {p["metadata"]["name"]: p for p in evalbuilders.network_policies(job, names, KUBERAY)}
    assert set(policies) == {*names.ray_services, names.ray_job}
    evaluator = {"podSelector": {"matchLabels": {builders.LABEL_RAY_CLUSTER: names.ray_job}}}
    evaluator_labels = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert evaluator["podSelector"]["matchLabels"].items() <= evaluator_labels.items()
    for service in services:
        (rule,) = ingress_from(policies[service["metadata"]["name"]], evaluator)
        assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert ingress_from(policies[names.ray_job], evaluator) == [{"from": [evaluator]}]  # its own pods


def all_policies() -> list[tuple[str, Obj]]:
    found = [("default", training_policy(ftj()))]
    found += [(name, training_policy(example_job(name))) for name in JOBS]
    for name in EVALJOBS:
        job, _, _ = built(name)
        found += [(name, p) for p in evalbuilders.network_policies(job, evalbuilders.children(job), KUBERAY)]
    return found


POLICIES = all_policies()


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize(("where", "policy"), POLICIES, ids=[f"{w}-{p['metadata']['name']}" for w, p in POLICIES])
def test_every_policy_validates_against_networking_v1(where: str, policy: Obj, version: str) -> None:
    kubernetes_validate.validate(policy, version, strict=True)
