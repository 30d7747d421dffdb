"""EvalJob builders: a parsed EvalJob (and its resolved plan) in, the exact child objects out. No I/O.

Children of an EvalJob `<evj>`:
- `<evj>-eval-config`: ConfigMap holding `plan.json`, the resolved `evalplan.EvalPlan`;
- `<evj>-<candidate>` (`evalplan.service_name`): one KubeRay RayService per kubetune-served candidate,
  Ray Serve running `kubetune.serving.server:app_builder` on GPU workers;
- `<evj>-eval`: the RayJob running `python -m kubetune.serving.evaluate` on a head-only CPU Ray cluster.
"""

from __future__ import annotations

import json

import yaml

from kubetune.api.common import API_VERSION, GROUP, PodResources
from kubetune.api.evaljob import PLURAL, EvalChildren, EvalJob
from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract.evalplan import EvalPlan, PlannedCandidate, evaljob_for, service_name
from kubetune.operator import builders, podtemplate
from kubetune.operator.kube import RAY_API_VERSION, Obj
from kubetune.operator.podtemplate import Role
from kubetune.operator.tracking import tracking_env

LABEL_EVALJOB = f"{GROUP}/evaljob"
LABEL_CANDIDATE = f"{GROUP}/candidate"
PLAN_KEY = "plan.json"
PLAN_PATH = f"{builders.CONFIG_DIR}/{PLAN_KEY}"
SERVE_APP = "kubetune.serving.server:app_builder"
SERVE_PORT = builders.SERVE_PORT
EVALUATE_ENTRYPOINT = f"python -m kubetune.serving.evaluate --plan {PLAN_PATH}"

# Ray's accelerator_type names (ray.util.accelerators) where they differ from kubetune's gpuType. A
# replica asking for an accelerator type no Ray node advertises never schedules, so gpuType values Ray
# does not know are not passed on: the worker pods' node selector already puts them on that GPU.
_RAY_ACCELERATORS = {"A10G": "A10G", "A100-40GB": "A100-40G", "A100-80GB": "A100-80G", "H100": "H100",
                     "H200": "H200", "L4": "L4", "L40S": "L40S", "T4": "T4", "V100": "V100"}


def children(job: EvalJob) -> EvalChildren:
    """The deterministic names of everything the operator creates for `job`."""
    name = job.metadata.name
    return EvalChildren(
        ray_services=[service_name(name, c.name) for c in job.spec.candidates if c.model.served],
        ray_job=builders.child_name(name, "eval", builders.MAX_RAYJOB_NAME),
        config_map=builders.child_name(name, "eval-config", 253),
        # The user's ServiceAccount (cloud identity), or the EvalJob's own, named like its Role and RoleBinding.
        service_account=builders.service_account_of(job.spec.pod_template) or identity_name(job),
    )


def identity_name(job: EvalJob) -> str:
    """The name of the EvalJob's Role and RoleBinding, and of its own ServiceAccount where it needs one."""
    return builders.child_name(job.metadata.name, "evaluator", 253)


def owner_reference(job: EvalJob) -> Obj:
    """Controller owner reference: deleting the EvalJob deletes its RayServices, RayJob and ConfigMap."""
    return {"apiVersion": API_VERSION, "kind": job.kind, "name": job.metadata.name, "uid": job.metadata.uid,
            "controller": True, "blockOwnerDeletion": True}


def labels(job: EvalJob, component: str, candidate: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/component": component,
        builders.LABEL_MANAGED_BY: builders.MANAGED_BY,
        LABEL_EVALJOB: job.metadata.name,
    }
    if candidate is not None:
        out[LABEL_CANDIDATE] = candidate
    return out


def _metadata(job: EvalJob, name: str, component: str, candidate: str | None = None) -> Obj:
    return {"name": name, "namespace": job.metadata.namespace, "labels": labels(job, component, candidate),
            "ownerReferences": [owner_reference(job)]}


def evaluator_identity(job: EvalJob, names: EvalChildren) -> list[Obj]:
    """The EvalJob's ServiceAccount, Role and RoleBinding (`builders.identity`): the evaluator patches its
    own EvalJob's status and nothing else; serving pods run as it without a token."""
    return builders.identity(identity_name(job), job.metadata.namespace, PLURAL, job.metadata.name,
                             owner_reference(job), labels(job, "identity"),
                             builders.service_account_of(job.spec.pod_template))


def network_policies(job: EvalJob, names: EvalChildren, kuberay_namespace: str) -> list[Obj]:
    """One NetworkPolicy per Ray cluster of the EvalJob, named after its Ray object: each serving cluster
    admits its EvalJob's evaluator on Serve's port; the evaluation cluster admits no one else."""
    assert names.ray_job
    owner, namespace = owner_reference(job), job.metadata.namespace
    evaluator = {builders.LABEL_RAY_CLUSTER: names.ray_job}
    return [*[builders.network_policy(svc, namespace, owner, labels(job, "network-policy"), kuberay_namespace,
                                      serve_clients=evaluator) for svc in names.ray_services],
            builders.network_policy(names.ray_job, namespace, owner, labels(job, "network-policy"),
                                    kuberay_namespace)]


# -- the plan ----------------------------------------------------------------------------------------


def plan_config_map(job: EvalJob, names: EvalChildren, plan: EvalPlan) -> Obj:
    """ConfigMap holding the resolved plan, mounted at /etc/kubetune in the evaluation's Ray head."""
    assert names.config_map
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names.config_map, "eval-config"),
        "data": {PLAN_KEY: json.dumps(plan.to_wire(), indent=1)},
    }


def _container(name: str, image: str, pod: PodResources, gpus: int, env: list[Obj], mounts: list[Obj],
               ports: list[Obj] | None = None) -> Obj:
    container: Obj = {"name": name, "image": image, "env": env,
                      "resources": podtemplate.resources(pod.cpu, pod.memory, gpus, pod.extra), "volumeMounts": mounts,
                      "securityContext": builders.container_security_context()}
    if ports:
        container["ports"] = ports
    return container


def _head_ports(serve: bool) -> list[Obj]:
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}]
    if serve:
        ports.append({"containerPort": SERVE_PORT, "name": "serve"})
    return ports


# -- serving -----------------------------------------------------------------------------------------


def serve_args(job: EvalJob, planned: PlannedCandidate) -> Obj:
    """The camelCase `args` of `kubetune.serving.server:app_builder` for one candidate."""
    serving = job.spec.serving
    assert planned.model_uri is not None
    args: Obj = {
        "modelUri": planned.model_uri,
        "servedModelName": planned.model,
        "engine": serving.engine,
        "maxBatchSize": serving.max_batch_size,
        "numReplicas": serving.replicas,
        "numGpus": serving.gpus_per_replica,
    }
    accelerator = _RAY_ACCELERATORS.get(serving.gpu_type)
    if serving.gpus_per_replica and accelerator:
        args["acceleratorType"] = accelerator
    if serving.max_model_len is not None:
        args["maxModelLen"] = serving.max_model_len
    return args


def serve_config(job: EvalJob, planned: PlannedCandidate) -> str:
    """`spec.serveConfigV2`: one Serve application, named after the candidate, at the route root."""
    document = {"applications": [{"name": planned.name, "import_path": SERVE_APP, "route_prefix": "/",
                                  "args": serve_args(job, planned)}]}
    return yaml.safe_dump(document, sort_keys=False)


def worker_node_selector(job: EvalJob) -> dict[str, str]:
    serving = job.spec.serving
    return builders.gpu_node_selector(serving.gpus_per_replica, serving.gpu_type, serving.node_selector)


def ray_service(job: EvalJob, planned: PlannedCandidate) -> Obj:
    """The KubeRay RayService serving one candidate: a CPU head and `replicas` GPU workers.

    The pods run as the EvalJob's ServiceAccount (cloud identity bound to it reads the checkpoint back)
    without its API token: serving never talks to the Kubernetes API.
    """
    assert planned.service is not None and planned.model_uri is not None
    serving = job.spec.serving
    volumes, mounts = builders.pvc_volumes(builders.claims_of([planned.model_uri]))
    # vLLM and NCCL need more shared memory than the container default of 64 MiB.
    volumes = [{"name": "kubetune-dshm", "emptyDir": {"medium": "Memory"}}, *volumes]
    mounts = [{"name": "kubetune-dshm", "mountPath": "/dev/shm"}, *mounts]
    env: list[Obj] = [{"name": "KUBETUNE_PVC_ROOT", "value": builders.PVC_ROOT}]
    candidate = next(c for c in job.spec.candidates if c.name == planned.name)
    token = candidate.model.token_secret_ref
    if token is not None:  # a gated Hub model: this candidate's pods only
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    account = children(job).service_account
    template = job.spec.pod_template
    head_pod = podtemplate.apply({
        "metadata": {"labels": {**labels(job, "serving-head", planned.name),
                                builders.LABEL_RAY_CLUSTER: planned.service}},
        "spec": {
            "serviceAccountName": account,
            "automountServiceAccountToken": False,
            "securityContext": builders.pod_security_context(),
            "containers": [_container("ray-head", serving.image, serving.head, 0, env, mounts,
                                      _head_ports(serve=True))],
            "volumes": volumes,
        },
    }, template, Role.HEAD)
    worker_pod = podtemplate.apply({
        "metadata": {"labels": {**labels(job, "serving-worker", planned.name),
                                builders.LABEL_RAY_CLUSTER: planned.service}},
        "spec": {
            "serviceAccountName": account,
            "automountServiceAccountToken": False,
            "securityContext": builders.pod_security_context(),
            "containers": [_container("ray-worker", serving.image, serving.worker, serving.gpus_per_replica, env,
                                      mounts)],
            "volumes": volumes,
            "nodeSelector": worker_node_selector(job),
            "tolerations": [t.to_wire() for t in serving.tolerations],
        },
    }, template, Role.WORKER)
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(job, planned.service, "serving", planned.name),
        "spec": {
            "serveConfigV2": serve_config(job, planned),
            "rayClusterConfig": {
                "rayVersion": serving.ray_version,
                "authOptions": dict(builders.RAY_TOKEN_AUTH),
                # The head runs the Serve controller and proxy only; replicas go to the workers.
                "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0",
                                                     "num-gpus": "0"},
                                  "template": head_pod},
                "workerGroupSpecs": [{
                    "groupName": "serve-workers",
                    "replicas": serving.replicas,
                    "minReplicas": serving.replicas,
                    "maxReplicas": serving.replicas,
                    "rayStartParams": {},
                    "template": worker_pod,
                }],
            },
        },
    }


# -- the evaluation ----------------------------------------------------------------------------------


def _evaluator_env(job: EvalJob, plan: EvalPlan) -> list[Obj]:
    env: list[Obj] = [
        {"name": "KUBETUNE_EVALJOB", "value": job.metadata.name},
        {"name": "KUBETUNE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBETUNE_PLAN", "value": PLAN_PATH},
        {"name": "KUBETUNE_PVC_ROOT", "value": builders.PVC_ROOT},
    ]
    for c in plan.candidates:
        if c.api_key_env and c.api_key_secret_ref:
            ref = c.api_key_secret_ref
            # optional: a missing Secret must not leave the pod waiting unseen (the operator may not be
            # allowed to check it); the evaluator fails at once, naming the candidate's apiKeySecretRef.
            env.append({"name": c.api_key_env,
                        "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key, "optional": True}}})
    env += tracking_env(job.spec.tracking)  # spec.tracking's credentials: the evaluator logs the scores
    return env


def evaluator_claims(job: EvalJob) -> list[str]:
    """Claims the evaluator reads or writes: the dataset, few-shot sources and the output."""
    spec = job.spec
    few_shot = [c.prompt.few_shot.source.uri for c in spec.candidates
                if c.prompt and c.prompt.few_shot and c.prompt.few_shot.source]
    return builders.claims_of([spec.dataset.uri, *few_shot, spec.output.uri,
                               *(spec.tracking.uris() if spec.tracking else [])])


def eval_ray_job(job: EvalJob, names: EvalChildren, plan: EvalPlan) -> Obj:
    """The RayJob running the evaluation on a head-only CPU Ray cluster (it only sends HTTP requests).

    It reports results into the EvalJob's status as the EvalJob's own ServiceAccount.
    """
    assert names.ray_job and names.config_map and names.service_account
    serving = job.spec.serving
    claim_volumes, claim_mounts = builders.pvc_volumes(evaluator_claims(job))
    volumes = [{"name": "kubetune-config", "configMap": {"name": names.config_map}}, *claim_volumes]
    mounts = [{"name": "kubetune-config", "mountPath": builders.CONFIG_DIR, "readOnly": True}, *claim_mounts]
    template = job.spec.pod_template
    head_pod = podtemplate.apply({
        "metadata": {"labels": {**labels(job, "evaluator"), builders.LABEL_RAY_CLUSTER: names.ray_job}},
        "spec": {
            "serviceAccountName": names.service_account,
            "securityContext": builders.pod_security_context(),
            "containers": [_container("ray-head", serving.image, serving.head, 0, _evaluator_env(job, plan), mounts,
                                      _head_ports(serve=False))],
            "volumes": volumes,
        },
    }, template, Role.HEAD)
    spec: Obj = {
        "entrypoint": EVALUATE_ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,  # Kueue requires it of the RayJobs it admits
        "backoffLimit": 0,
        "metadata": {LABEL_EVALJOB: f"{job.metadata.namespace}/{job.metadata.name}"},
        "submitterPodTemplate": builders.submitter_pod_template(
            serving.image, {**labels(job, "submitter"), builders.LABEL_RAY_CLUSTER: names.ray_job},
            names.service_account, template),
        "rayClusterSpec": {
            "rayVersion": serving.ray_version,
            "authOptions": dict(builders.RAY_TOKEN_AUTH),
            "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                              "template": head_pod},
        },
    }
    if job.spec.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = job.spec.ttl_seconds_after_finished
    if job.spec.queue_name is not None:
        spec["suspend"] = True  # created suspended: only Kueue unsuspends it (admission), kubetune never does
    metadata = _metadata(job, names.ray_job, "evaluator")
    metadata["labels"].update(builders.queue_labels(job.spec.queue_name, job.spec.workload_priority_class_name))
    return {
        "apiVersion": RAY_API_VERSION,
        "kind": "RayJob",
        "metadata": metadata,
        "spec": spec,
    }


# -- FineTuneJob.spec.evaluation ---------------------------------------------------------------------


def evaluation_evaljob(ftj: FineTuneJob, base_model: str) -> Obj:
    """The EvalJob FineTuneJob.spec.evaluation asks for, owned by the FineTuneJob (deleted with it)."""
    manifest = evaljob_for(ftj, base_model)
    manifest["metadata"]["labels"] = {"app.kubernetes.io/name": "kubetune",
                                      "app.kubernetes.io/component": "evaluation",
                                      builders.LABEL_MANAGED_BY: builders.MANAGED_BY,
                                      builders.LABEL_JOB: ftj.metadata.name}
    manifest["metadata"]["ownerReferences"] = [builders.owner_reference(ftj)]
    return manifest
