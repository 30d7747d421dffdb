"""The chart's RBAC is exactly what the operator uses: derived from what the real operator sends.

The real operator process (`python -m kubetune.operator`) plays every path that talks to the API
against the fake API, once cluster-wide and once watching one namespace: a FineTuneJob with
spec.evaluation from creation to success (and the EvalJob it creates, from serving to teardown),
suspend and resume, ttlSecondsAfterFinished, a fineTuneJobRef wait, an EvalJob deadline and an
apiKeySecretRef check. The API's request log, split by User-Agent into the operator's requests
(kopf's and `kube.Kube`'s aiohttp) and the test's own (urllib: the user, KubeRay, the driver), gives
the (verb, apiGroup, resource) the operator used, mapped from HTTP as the apiserver does. The chart's
rendered ClusterRole and Role must grant all of them and nothing else, bar a commented allow-list.
"""

from __future__ import annotations

import functools
import json
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from test_evaljob_operator import (
    EVALUATION,
    GPT4,
    TUNED,
    evaluate,
    rayservice,
    rayservices,
    report_ready,
    serve_all,
    succeed_finetunejob,
    wait_phase,
)
from test_evaljob_operator import create as create_evj
from test_operator import RUNNING, SUCCEEDED, create

from chart.helmchart import requires_helm, template
from factories import evj, ftj
from kubetune.operator import builders, evalbuilders, kube
from support.fakekube import RequestRecord, split_api_path, split_resource_path
from support.harness import Cluster, Operator, eventually, start_api

Grant = tuple[str, str, str]  # (verb, apiGroup, resource or resource/subresource)

# Granted although the operator never sends them. Kubernetes' RBAC escalation check lets the operator
# create a job's own Role (builders.identity), and bind it, only if it holds every
# permission that Role grants to the Ray pods; among them `get` on the jobs' status subresources.
ESCALATION_ONLY: set[Grant] = {
    ("get", "kubetune.io", "finetunejobs/status"),
    ("get", "kubetune.io", "evaljobs/status"),
}
# Granted although the operator never sends them: children's owner references set blockOwnerDeletion,
# and with the OwnerReferencesPermissionEnforcement admission plugin (OpenShift) only whoever may update
# the owner's finalizers may set it.
ADMISSION_ONLY: set[Grant] = {
    ("update", "kubetune.io", "finetunejobs/finalizers"),
    ("update", "kubetune.io", "evaljobs/finalizers"),
}
# Sent although the chart does not grant it, in cluster-wide mode only: the operator never reads Secrets
# cluster-wide. Its check that an EvalJob's apiKeySecretRef exists gets a 403 there and is skipped as
# "cannot verify" (evalreconcile._check_secrets); the fake API, which authorizes nothing, answers it.
DENIED_BY_DESIGN: dict[str, set[Grant]] = {
    "cluster-wide": {("get", "", "secrets")},
    "namespaced": set(),
}
WATCHED = "default"  # the namespace the namespaced operator watches; every scenario runs in it
# The chart's values for each mode: a ClusterRole, or a Role in each of watchNamespaces.
CHART_VALUES: dict[str, dict[str, Any]] = {"cluster-wide": {}, "namespaced": {"watchNamespaces": [WATCHED]}}
JOBS = ("finetunejobs", "evaljobs")
OPERATOR_ARGS = {"cluster-wide": (), "namespaced": ("--namespace", WATCHED)}


# -- the request log -------------------------------------------------------------------------------


def sent_by_the_operator(record: RequestRecord) -> bool:
    """kopf says `kopf/<version>`; `kube.Kube` (aiohttp) says `Python/3.x aiohttp/<version>`."""
    return record.user_agent.startswith("kopf/") or " aiohttp/" in record.user_agent


def sent_by_the_test(record: RequestRecord) -> bool:
    """The test's clients (SyncKube for the user and KubeRay, StatusReporter for the driver): urllib."""
    return record.user_agent.startswith("Python-urllib/")


@dataclass(frozen=True)
class Request:
    """One resource request as RBAC sees it."""

    verb: str
    group: str
    resource: str  # plural, or plural/subresource
    namespace: str | None  # None: cluster-scoped, or across all namespaces

    @property
    def grant(self) -> Grant:
        return (self.verb, self.group, self.resource)


def as_rbac(record: RequestRecord) -> Request | None:
    """The RBAC verb and resource of a request, as the apiserver's request-info resolver derives them.

    None for non-resource URLs (discovery, /version, /openapi: every authenticated client may read
    those through the built-in system:discovery role).
    """
    split = split_api_path(record.path)
    if split is None or not split[2]:
        return None
    group, _, rest = split
    namespace, plural, name, subresource = split_resource_path(group, rest)
    watch = rest[0] == "watch" or urllib.parse.parse_qs(record.query).get("watch", [""])[0] in ("true", "1")
    if record.method == "GET":
        verb = "watch" if watch else "get" if name else "list"
    elif record.method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}[record.method]
    return Request(verb, group, f"{plural}/{subresource}" if subresource else plural, namespace)


def addresses_a_job(record: RequestRecord) -> bool:
    """A request to a FineTuneJob or EvalJob itself (not to its /status)."""
    request = as_rbac(record)
    return request is not None and request.group == "kubetune.io" and request.resource in JOBS


# -- the run ---------------------------------------------------------------------------------------


def play_every_api_path(cluster: Cluster) -> None:
    """Scenarios that, between them, take the operator down every code path that talks to the API."""
    # A FineTuneJob with spec.evaluation to success; its EvalJob from serving to teardown.
    succeed_finetunejob(cluster, spec__evaluation=EVALUATION)
    serve_all(cluster, ["viggo-eval-fine-tuned", "viggo-eval-base-few-shot"])
    evaluate(cluster, {"fine-tuned": {"exactMatch": 0.86}, "base-few-shot": {"exactMatch": 0.41}}, "viggo-eval")
    wait_phase(cluster, "Succeeded", name="viggo-eval")
    eventually(lambda: rayservices(cluster) == [], what="the evaluation's RayServices deleted")

    # Suspend and resume (the RayJob's spec.suspend follows).
    create(cluster, "paused")
    cluster.wait_rayjob("paused-train")
    cluster.report_rayjob("paused-train", **RUNNING)
    cluster.wait_phase("Running", "paused")
    cluster.kube.patch(kube.ftj_ref("default", "paused"), {"spec": {"suspend": True}})
    eventually(lambda: cluster.rayjob("paused-train")["spec"]["suspend"] is True, what="the RayJob suspended")
    cluster.kube.patch(kube.ftj_ref("default", "paused"), {"spec": {"suspend": False}})
    eventually(lambda: cluster.rayjob("paused-train")["spec"]["suspend"] is False, what="the RayJob resumed")

    # ttlSecondsAfterFinished: the children are deleted, the FineTuneJob stays.
    create(cluster, "short-lived", spec__ttlSecondsAfterFinished=0)
    cluster.wait_rayjob("short-lived-train")
    for step in (RUNNING, SUCCEEDED):
        cluster.report_rayjob("short-lived-train", **step)
    eventually(lambda: "ChildrenDeleted" in {e["reason"] for e in cluster.events("short-lived")},
               what="the TTL's ChildrenDeleted event")

    # A fineTuneJobRef to a job that does not exist yet: wait, then train from its best checkpoint.
    create(cluster, "stage-2", spec__baseModel={"fineTuneJobRef": {"name": "stage-1"}})
    cluster.wait_phase("Waiting", "stage-2")
    succeed_finetunejob(cluster, "stage-1")
    cluster.wait_rayjob("stage-2-train")

    # An EvalJob whose RayServices never come up: the deadline sweep fails it and tears serving down.
    create_evj(cluster, "late", spec__activeDeadlineSeconds=1)
    wait_phase(cluster, "Failed", "DeadlineExceeded", name="late")
    eventually(lambda: rayservices(cluster) == [], what="the late EvalJob's RayServices deleted")

    # An apiKeySecretRef: the operator waits for the Secret, then serves.
    create_evj(cluster, "keyed", spec__candidates=[TUNED, GPT4], spec__gate=None)
    wait_phase(cluster, "Waiting", "SecretNotFound", name="keyed")
    cluster.kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "openai", "namespace": "default"},
                         "stringData": {"api-key": "sk-test"}})
    eventually(lambda: rayservice(cluster, "keyed-tuned"), what="the keyed EvalJob's RayService")
    report_ready(cluster, "keyed-tuned")
    cluster.wait_rayjob("keyed-eval")


@dataclass(frozen=True)
class Run:
    mode: str
    log: list[RequestRecord]  # every request the API served, the test's own included

    @property
    def operator_requests(self) -> list[Request]:
        return [r for r in map(as_rbac, filter(sent_by_the_operator, self.log)) if r is not None]

    @property
    def used(self) -> set[Grant]:
        return {r.grant for r in self.operator_requests}


@pytest.fixture(scope="module", params=list(OPERATOR_ARGS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    mode = str(request.param)
    tmp = tmp_path_factory.mktemp(f"rbac-{mode}")
    api, kubeconfig = start_api(tmp)
    try:
        cluster = Cluster(api, kubeconfig)
        operator = Operator(kubeconfig, tmp / "operator.log", *OPERATOR_ARGS[mode]).start()
        try:
            play_every_api_path(cluster)
        finally:
            operator.stop()
        yield Run(mode, list(api.request_log))
    finally:
        api.stop()


@functools.cache
def chart_roles(mode: str) -> tuple[dict[str, Any], ...]:
    """The chart's rendered ClusterRoles and Roles in this mode."""
    result = template(CHART_VALUES[mode])
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in docs
             if b["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    # The operator's: those bound to it (not the user roles aggregated into view/edit/admin).
    return tuple(d for d in docs if d["kind"] in ("ClusterRole", "Role") and (d["kind"], d["metadata"]["name"]) in bound)


def chart_grants(mode: str, namespace: str | None) -> set[Grant]:
    """What the chart lets the operator do in a namespace (None: across namespaces, or cluster-scoped).

    A ClusterRole (bound by a ClusterRoleBinding) applies everywhere; a Role only in its own namespace.
    """
    return {grant for role in chart_roles(mode)
            if role["kind"] == "ClusterRole" or role["metadata"]["namespace"] == namespace
            for grant in flatten(role["rules"])}


def flatten(rules: Iterable[dict[str, Any]]) -> Iterator[Grant]:
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule["verbs"]:
                    yield (verb, group, resource)


# -- the tests -------------------------------------------------------------------------------------


def test_every_request_comes_from_the_operator_or_the_test(run: Run) -> None:
    """The User-Agent split is total: no request is left unattributed (and so unchecked)."""
    assert [(r.method, r.path, r.user_agent) for r in run.log
            if sent_by_the_operator(r) == sent_by_the_test(r)] == []
    assert any(map(sent_by_the_operator, run.log)) and any(map(sent_by_the_test, run.log))


@requires_helm
def test_the_chart_grants_every_request_the_operator_makes(run: Run) -> None:
    """Each request is checked in its own namespace: a namespaced operator must not leave its Roles."""
    ungranted = [r for r in run.operator_requests if r.grant not in chart_grants(run.mode, r.namespace)]
    assert {r.grant for r in ungranted} == DENIED_BY_DESIGN[run.mode], sorted(set(map(str, ungranted)))


@requires_helm
def test_the_chart_grants_nothing_the_operator_does_not_use(run: Run) -> None:
    assert chart_grants(run.mode, WATCHED) - run.used == ESCALATION_ONLY | ADMISSION_ONLY


def test_what_is_granted_only_for_escalation_is_what_the_trainer_role_grants() -> None:
    job = ftj()
    evaljob = evj()
    roles = [next(o for o in objects if o["kind"] == "Role") for objects in (
        builders.trainer_identity(job, builders.children(job)),
        evalbuilders.evaluator_identity(evaljob, evalbuilders.children(evaljob)))]
    assert ESCALATION_ONLY <= {grant for role in roles for grant in flatten(role["rules"])}


def test_what_is_granted_only_for_admission_is_what_block_owner_deletion_needs() -> None:
    assert builders.owner_reference(ftj())["blockOwnerDeletion"] is True
    assert {resource.split("/")[0] for _, _, resource in ADMISSION_ONLY} == {"finetunejobs", "evaljobs"}
    assert all(verb == "update" and resource.endswith("/finalizers") for verb, _, resource in ADMISSION_ONLY)


def test_the_operator_writes_only_metadata_of_finetunejobs_and_evaljobs(run: Run) -> None:
    """kopf keeps its bookkeeping in annotations and its timers' finalizer in metadata.finalizers; spec
    belongs to the user and status goes to /status."""
    writes = [r for r in run.log if sent_by_the_operator(r) and r.body is not None and addresses_a_job(r)]
    assert {r.method for r in writes} == {"PATCH"}  # a PUT would replace the spec, even if unchanged
    merges = [json.loads(r.body or b"{}") for r in writes if r.content_type == "application/merge-patch+json"]
    # JSON patches: kopf removes its finalizer by index, guarded by a test operation.
    operations = [op for r in writes if r.content_type == "application/json-patch+json"
                  for op in json.loads(r.body or b"[]")]
    assert len(merges) + sum(r.content_type == "application/json-patch+json" for r in writes) == len(writes)
    # A merge patch's top-level keys, and a JSON patch's paths, are the parts of the object it changes.
    assert {key for merge in merges for key in merge} == {"metadata"}
    assert all(op["path"].startswith("/metadata/") for op in operations), operations
