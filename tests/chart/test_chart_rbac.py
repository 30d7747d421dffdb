"""The operator's RBAC: no wildcard, no cluster-wide Secret read, the same rules in both modes.

That the rules are exactly the verbs the operator uses is checked against the requests the running
operator sends, in tests/operator/test_rbac_usage.py. The last tests here tie the rules to what the
operator's builders create, so a new child kind without a matching rule fails here rather than with a
403 on a cluster.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import yaml
from helmchart import FULLNAME, NAMESPACE, Obj, of_kind, one, render, requires_helm, template

from factories import evj, ftj
from kubetune.contract.evalplan import cluster_base_url, plan, service_name
from kubetune.operator import builders, evalbuilders

pytestmark = requires_helm

RBAC_KINDS = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
SECRETS = ("", "secrets")
# Plural of each kind the operator creates (for the cross-check against builders).
PLURALS = {"ConfigMap": "configmaps", "RayJob": "rayjobs", "RayService": "rayservices",
           "ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings",
           "EvalJob": "evaljobs", "NetworkPolicy": "networkpolicies"}


def grants(rules: Iterable[Obj]) -> dict[tuple[str, str], set[str]]:
    """Flatten RBAC rules into (group, resource) -> verbs."""
    table: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def roles(objs: list[Obj]) -> list[Obj]:
    return of_kind(objs, "ClusterRole") + of_kind(objs, "Role")


def user_roles(objs: list[Obj]) -> list[Obj]:
    """The ClusterRoles for people, aggregated into view/edit/admin (rbac.aggregateToDefaultRoles)."""
    return [r for r in of_kind(objs, "ClusterRole")
            if any(k.startswith(AGGREGATE) for k in (r["metadata"].get("labels") or {}))]


def operator_roles(objs: list[Obj]) -> list[Obj]:
    """The (Cluster)Roles the operator's ServiceAccount is bound to."""
    return [r for r in roles(objs) if r not in user_roles(objs)]


def test_no_wildcard_anywhere(rendered: list[Obj]) -> None:
    for role in roles(rendered):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in value for value in rule.get(field, [])), (role["kind"], rule)


def test_cluster_wide_mode_reads_no_secret() -> None:
    for role in roles(render("default")):
        assert SECRETS not in grants(role["rules"])


def test_cluster_wide_mode_has_no_namespaced_roles() -> None:
    objs = render("default")
    assert of_kind(objs, "Role") == [] and of_kind(objs, "RoleBinding") == []


def test_cluster_role_is_bound_to_the_operators_service_account() -> None:
    objs = render("default")
    binding = one(objs, "ClusterRoleBinding")
    (role,) = operator_roles(objs)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]


def test_namespaced_mode_grants_the_operator_nothing_cluster_scoped() -> None:
    """Only the CRDs and the two user roles (which bind nothing) are cluster-scoped."""
    objs = render("namespaced")
    assert of_kind(objs, "ClusterRoleBinding") == []
    assert of_kind(objs, "ClusterRole") == user_roles(objs)


def test_user_roles_aggregate_into_view_edit_and_admin() -> None:
    view, edit = sorted(user_roles(render("default")), key=lambda r: r["metadata"]["name"], reverse=True)
    assert (view["metadata"]["name"], edit["metadata"]["name"]) == (f"{FULLNAME}-view", f"{FULLNAME}-edit")
    assert {k.removeprefix(AGGREGATE) for k in view["metadata"]["labels"] if k.startswith(AGGREGATE)} == {
        "view", "edit", "admin"}
    assert {k.removeprefix(AGGREGATE) for k in edit["metadata"]["labels"] if k.startswith(AGGREGATE)} == {
        "edit", "admin"}


def test_view_only_reads_and_edit_never_writes_status() -> None:
    view, edit = sorted(user_roles(render("default")), key=lambda r: r["metadata"]["name"], reverse=True)
    assert all(verbs <= {"get", "list", "watch"} for verbs in grants(view["rules"]).values())
    assert set(grants(edit["rules"])) == {("kubetune.io", "finetunejobs"), ("kubetune.io", "evaljobs")}


def test_user_roles_can_be_left_out() -> None:
    objs = render("no-user-roles")
    assert user_roles(objs) == [] and len(operator_roles(objs)) == 1


def test_the_operator_may_manage_network_policies_only_where_it_creates_them() -> None:
    (enabled,) = operator_roles(render("default"))
    (disabled,) = operator_roles(render("no-network-policies"))
    assert grants(enabled["rules"])[("networking.k8s.io", "networkpolicies")] == {"get", "create", "delete"}
    assert ("networking.k8s.io", "networkpolicies") not in grants(disabled["rules"])


def test_namespaced_mode_has_a_role_and_binding_in_each_watched_namespace() -> None:
    objs = render("namespaced")
    assert sorted(r["metadata"]["namespace"] for r in of_kind(objs, "Role")) == ["team-a", "team-b"]
    for binding in of_kind(objs, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["roleRef"]["name"] == FULLNAME
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert sorted(b["metadata"]["namespace"] for b in of_kind(objs, "RoleBinding")) == ["team-a", "team-b"]


def test_namespaced_mode_adds_only_secret_get_to_the_cluster_wide_rules() -> None:
    """To check that an EvalJob's apiKeySecretRef/tokenSecretRef exists; the value is never needed."""
    (operator_role,) = operator_roles(render("default"))
    cluster_wide = grants(operator_role["rules"])
    for role in of_kind(render("namespaced"), "Role"):
        table = grants(role["rules"])
        assert table.pop(SECRETS) == {"get"}
        assert table == cluster_wide


def test_rbac_create_false_renders_no_rbac() -> None:
    result = template({"rbac": {"create": False}, "watchNamespaces": ["team-a"]})
    assert result.returncode == 0, result.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(result.stdout) if d}
    assert kinds.isdisjoint(RBAC_KINDS)


# --------------------------------------------------------------------------- tied to the operator


def _covered(table: dict[tuple[str, str], set[str]], group: str, resource: str, verb: str) -> bool:
    return verb in table.get((group, resource), set())


@pytest.mark.parametrize("scenario_name", ["default", "namespaced"])
def test_operator_holds_everything_a_jobs_role_grants(scenario_name: str) -> None:
    """Kubernetes refuses to let the operator create a Role granting more than it holds (escalation)."""
    job, evaljob = ftj(namespace="team-a"), evj(namespace="team-a")
    job_roles = [next(o for o in objects if o["kind"] == "Role") for objects in (
        builders.trainer_identity(job, builders.children(job)),
        evalbuilders.evaluator_identity(evaljob, evalbuilders.children(evaljob)))]
    for role in operator_roles(render(scenario_name)):
        table = grants(role["rules"])
        for rule in [rule for job_role in job_roles for rule in job_role["rules"]]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert _covered(table, group, resource, verb), (
                            f"{role['kind']} lacks {verb} {group}/{resource} that a job's own Role grants")


EVALUATION = {"dataset": {"uri": "s3://bucket/viggo/test.jsonl", "reference": "{mr}"}, "scorer": {"name": "viggo"},
              "baselinePrompt": {"template": "Sentence: {ref}\nMeaning representation:", "answer": " {mr}"}}


def _children() -> list[Obj]:
    """One of each object the operator creates: for a FineTuneJob, and for an EvalJob once resolved."""
    job = ftj("viggo")
    names = builders.children(job)
    evaluation = evj()
    uris = {"fine-tuned": "s3://bucket/runs/viggo/best", "base": "meta-llama/Llama-2-7b-hf"}
    urls = {c: cluster_base_url(service_name(evaluation.metadata.name, c), "default") for c in uris}
    resolved = plan(evaluation, uris, {"viggo": job}, urls)
    return [
        builders.config_map(job, names), builders.ray_job(job, names), *builders.trainer_identity(job, names),
        builders.training_network_policy(job, names, "ray-system"),
        evalbuilders.evaluation_evaljob(ftj("viggo", spec__evaluation=EVALUATION), "meta-llama/Llama-2-7b-hf"),
        evalbuilders.plan_config_map(evaluation, evalbuilders.children(evaluation), resolved),
        evalbuilders.eval_ray_job(evaluation, evalbuilders.children(evaluation), resolved),
        *[evalbuilders.ray_service(evaluation, p) for p in resolved.candidates if p.served],
    ]


def test_the_cross_check_sees_every_kind_of_child() -> None:
    assert {c["kind"] for c in _children()} == set(PLURALS)


@pytest.mark.parametrize("scenario_name", ["default", "namespaced"])
def test_operator_may_create_every_child_the_builders_make(scenario_name: str) -> None:
    for role in operator_roles(render(scenario_name)):
        table = grants(role["rules"])
        for child in _children():
            group = child["apiVersion"].rpartition("/")[0]
            assert _covered(table, group, PLURALS[child["kind"]], "create"), child["kind"]
