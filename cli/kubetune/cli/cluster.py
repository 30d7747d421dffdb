"""`kubetune logs` and `kubetune report`: a job's driver logs and its report, through the Kubernetes API.

Every object is found the way the operator finds its own children: by its deterministic name, and only
when its controller owner reference is the parent's uid; never by a name read from a status (the pods of
a job and its status are writable by the job's own pods) and never by a label alone:

    FineTuneJob/EvalJob --(<job>-train | <evj>-eval, controlled by the job)--> RayJob
    RayJob --(Job named like the RayJob, controlled by it)--> KubeRay's submitter Job
        --(pods labelled batch.kubernetes.io/job-name or job-name, controlled by the Job)--> submitter pod
    RayJob --(RayCluster labelled ray.io/originated-from-cr-name, controlled by it)--> RayCluster
        --(pods labelled ray.io/cluster + ray.io/node-type=head, controlled by it)--> head pod

The submitter pod runs `ray job submit`, which prints the driver's output: that is what `kubetune logs`
shows; without one (not created yet, or gone) it shows the Ray head pod's.

The Kubernetes client (`pip install 'kubetune[cli]'`) is read from --kubeconfig, $KUBECONFIG or
~/.kube/config, else the pod's in-cluster service account.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubetune.api.common import GROUP, VERSION
from kubetune.cli.errors import CliError, Exit
from kubetune.contract.redact import excerpt

Obj = dict[str, Any]
T = TypeVar("T")

KINDS = {"finetunejob": "FineTuneJob", "finetunejobs": "FineTuneJob", "ftj": "FineTuneJob",
         "evaljob": "EvalJob", "evaljobs": "EvalJob", "evj": "EvalJob"}
PLURALS = {"FineTuneJob": "finetunejobs", "EvalJob": "evaljobs"}
RAY_GROUP, RAY_VERSION = "ray.io", "v1"
SUBMITTER_CONTAINER = "ray-job-submitter"  # KubeRay's name for the submitter container
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")  # set by the Job controller (new, old)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
POLL_SECONDS = float(os.environ.get("KUBETUNE_POLL_SECONDS", "2"))
TERMINAL_PHASES = ("Succeeded", "Failed")


def job_kind(word: str) -> str | None:
    """`ftj` -> FineTuneJob, `evaljob` -> EvalJob, ... (case-insensitive); None for anything else."""
    return KINDS.get(word.lower()) or next((k for k in PLURALS if k.lower() == word.lower()), None)


# --------------------------------------------------------------------------------------------- the API


class Cluster:
    """A Kubernetes API connection (the `kubernetes` client), with errors turned into CliErrors."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None,
                 namespace: str | None = None) -> None:
        try:
            from kubernetes import client, config
        except ImportError:
            raise CliError(Exit.USAGE, "this command needs the Kubernetes client: pip install 'kubetune[cli]'") \
                from None
        self._client = client
        try:
            if kubeconfig or context or _kubeconfig_present():
                self.api = config.new_client_from_config(config_file=kubeconfig, context=context,
                                                         persist_config=False)
                contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
                chosen = next((c for c in contexts if c["name"] == context), active) if context else active
                default_ns = (chosen or {}).get("context", {}).get("namespace")
            else:
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                self.api = client.ApiClient(configuration)
                default_ns = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() \
                    if SERVICE_ACCOUNT_NAMESPACE.exists() else None
        except config.ConfigException as exc:
            raise CliError(Exit.UNAVAILABLE, f"no usable Kubernetes configuration: {exc}") from None
        self.namespace: str = namespace or default_ns or "default"
        self.host = str(self.api.configuration.host)
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)

    def call(self, what: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)`; NotFound (404) -> CliError NOT_FOUND naming `what`, any other API
        answer or connection failure -> CliError UNAVAILABLE."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return function(*args, **kwargs)
        except ApiException as exc:
            if not exc.status:  # the client's own wrapping of a connection failure
                raise CliError(Exit.UNAVAILABLE, f"cannot reach the Kubernetes API at {self.host}: "
                                                 f"{excerpt(str(exc.reason or ''))}") from None
            message = _status_message(exc)
            if exc.status == 404:
                raise CliError(Exit.NOT_FOUND, f"{what} not found") from None
            if exc.status in (401, 403):
                raise CliError(Exit.UNAVAILABLE, f"{what}: not allowed ({exc.status}): {message}") from None
            raise CliError(Exit.UNAVAILABLE, f"{what}: the Kubernetes API answered {exc.status} "
                                             f"{exc.reason}: {message}") from None
        except (HTTPError, OSError) as exc:
            raise CliError(Exit.UNAVAILABLE, f"cannot reach the Kubernetes API at {self.host}: "
                                             f"{type(exc).__name__}") from None

    def plain(self, obj: Any) -> Obj:
        """A typed client object as the API's JSON (camelCase)."""
        data: Obj = self.api.sanitize_for_serialization(obj)
        return data

    def get_custom(self, group: str, version: str, plural: str, name: str, what: str) -> Obj:
        obj: Obj = self.call(what, self.custom.get_namespaced_custom_object, group, version, self.namespace,
                             plural, name)
        return obj

    def list_custom(self, group: str, version: str, plural: str, selector: str, what: str) -> list[Obj]:
        found = self.call(what, self.custom.list_namespaced_custom_object, group, version, self.namespace,
                          plural, label_selector=selector)
        items: list[Obj] = found.get("items") or []
        return items

    def list_pods(self, selector: str) -> list[Obj]:
        pods = self.call(f"pods {selector} in {self.namespace}", self.core.list_namespaced_pod, self.namespace,
                         label_selector=selector)
        return [self.plain(p) for p in pods.items or []]


def _kubeconfig_present() -> bool:
    return bool(os.environ.get("KUBECONFIG")) or Path("~/.kube/config").expanduser().exists()


def _status_message(exc: Any) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return excerpt(str(body.get("message") or exc.reason or ""))


# --------------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """A FineTuneJob or EvalJob as stored."""

    kind: str
    name: str
    namespace: str
    body: Obj

    @property
    def uid(self) -> str:
        return str(self.body["metadata"]["uid"])

    @property
    def phase(self) -> str:
        return str((self.body.get("status") or {}).get("phase") or "Pending")

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def get_job(cluster: Cluster, ref: str, kinds: tuple[str, ...] = ("FineTuneJob", "EvalJob")) -> Job:
    """`name`, `<kind>/name` (finetunejob, ftj, evaljob, evj): the job; a bare name that is both a
    FineTuneJob and an EvalJob is ambiguous (USAGE)."""
    word, slash, name = ref.partition("/")
    if slash:
        kind = job_kind(word)
        if kind is None or kind not in kinds:
            raise CliError(Exit.USAGE, f"{ref!r}: expected {' or '.join(k.lower() for k in kinds)}/<name>")
        candidates = [kind]
    else:
        name, candidates = ref, list(kinds)
    found = []
    for kind in candidates:
        try:
            body = cluster.get_custom(GROUP, VERSION, PLURALS[kind], name, f"{kind} {cluster.namespace}/{name}")
        except CliError as exc:
            if exc.code != Exit.NOT_FOUND:
                raise
            continue
        found.append(Job(kind, name, cluster.namespace, body))
    if not found:
        raise CliError(Exit.NOT_FOUND, f"no {' or '.join(candidates)} {name!r} in namespace {cluster.namespace}")
    if len(found) > 1:
        raise CliError(Exit.USAGE, f"{name!r} is both a FineTuneJob and an EvalJob: say which "
                                   f"(finetunejob/{name} or evaljob/{name})")
    return found[0]


def controller_uid(obj: Obj) -> str | None:
    """The uid of `obj`'s controller owner reference."""
    from kubetune.operator.kube import controller_uid as uid_of

    return uid_of(obj)


def controlled(objs: list[Obj], owner_uid: str) -> list[Obj]:
    """Those of `objs` whose controller is `owner_uid`, newest first."""
    own = [o for o in objs if controller_uid(o) == owner_uid]
    return sorted(own, key=lambda o: str(o["metadata"].get("creationTimestamp") or ""), reverse=True)


def rayjob_name(job: Job) -> str:
    """The RayJob the operator creates for `job` (its deterministic name, as the operator's builders give)."""
    from kubetune.operator.builders import MAX_RAYJOB_NAME, child_name

    return child_name(job.name, "train" if job.kind == "FineTuneJob" else "eval", MAX_RAYJOB_NAME)


def get_rayjob(cluster: Cluster, job: Job) -> Obj:
    name = rayjob_name(job)
    try:
        rayjob = cluster.get_custom(RAY_GROUP, RAY_VERSION, "rayjobs", name, f"RayJob {job.namespace}/{name}")
    except CliError as exc:
        if exc.code == Exit.NOT_FOUND:
            raise CliError(Exit.NOT_FOUND, f"{job} has no RayJob yet (phase {job.phase})") from None
        raise
    if controller_uid(rayjob) != job.uid:
        raise CliError(Exit.NOT_FOUND, f"RayJob {job.namespace}/{name} is not controlled by {job}: not reading "
                                       "its pods")
    return rayjob


def submitter_pods(cluster: Cluster, rayjob: Obj) -> list[Obj]:
    """KubeRay's submitter pods of `rayjob` (K8sJobMode), newest first."""
    name = rayjob["metadata"]["name"]
    try:
        submitter = cluster.plain(cluster.call(f"Job {cluster.namespace}/{name}", cluster.batch.read_namespaced_job,
                                               name, cluster.namespace))
    except CliError as exc:
        if exc.code == Exit.NOT_FOUND:
            return []
        raise
    if controller_uid(submitter) != rayjob["metadata"]["uid"]:
        return []
    for label in JOB_NAME_LABELS:
        pods = controlled(cluster.list_pods(f"{label}={name}"), submitter["metadata"]["uid"])
        if pods:
            return pods
    return []


def head_pods(cluster: Cluster, rayjob: Obj) -> list[Obj]:
    """The Ray head pod(s) of the RayCluster `rayjob` created, newest first."""
    name = rayjob["metadata"]["name"]
    clusters = controlled(cluster.list_custom(
        RAY_GROUP, RAY_VERSION, "rayclusters",
        f"ray.io/originated-from-cr-name={name},ray.io/originated-from-crd=RayJob",
        f"RayClusters of RayJob {cluster.namespace}/{name}"), rayjob["metadata"]["uid"])
    pods: list[Obj] = []
    for ray_cluster in clusters:
        pods += controlled(cluster.list_pods(f"ray.io/cluster={ray_cluster['metadata']['name']},"
                                             "ray.io/node-type=head"), ray_cluster["metadata"]["uid"])
    return pods


# --------------------------------------------------------------------------------------------- logs


@dataclass
class LogSource:
    """The pod and container whose log is shown."""

    role: str  # "submitter" | "head"
    pod: Obj

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def container(self) -> str:
        names = [c["name"] for c in (self.pod.get("spec") or {}).get("containers") or []]
        if self.role == "submitter" and SUBMITTER_CONTAINER in names:
            return SUBMITTER_CONTAINER
        return names[0] if names else ""


def find_log_source(cluster: Cluster, job: Job, head: bool) -> LogSource:
    rayjob = get_rayjob(cluster, job)
    if not head:
        pods = submitter_pods(cluster, rayjob)
        if pods:
            return LogSource("submitter", pods[0])
    pods = head_pods(cluster, rayjob)
    if pods:
        return LogSource("head", pods[0])
    wanted = "Ray head pod" if head else "submitter or Ray head pod"
    raise CliError(Exit.NOT_FOUND, f"{job}: no {wanted} yet (phase {job.phase})")


def stream_log(cluster: Cluster, source: LogSource, *, follow: bool, tail: int | None,
               write: Callable[[str], None]) -> None:
    """Copy the pod's log to `write`, as it arrives with `follow`; CliError NOT_FOUND when it has not
    started (the API answers 400 "waiting to start")."""
    kwargs: dict[str, Any] = {"container": source.container, "follow": follow, "_preload_content": False}
    if tail is not None:
        kwargs["tail_lines"] = tail
    what = f"log of pod {cluster.namespace}/{source.name}"
    try:
        response = cluster.call(what, cluster.core.read_namespaced_pod_log, source.name, cluster.namespace,
                                **kwargs)
    except CliError as exc:
        if "waiting to start" in exc.message or "ContainerCreating" in exc.message or "PodInitializing" in \
                exc.message:
            raise CliError(Exit.NOT_FOUND, f"pod {cluster.namespace}/{source.name} ({source.role}) has not "
                                           "started yet") from None
        raise
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        for chunk in response.stream(4096, decode_content=True):
            write(decoder.decode(chunk))
        write(decoder.decode(b"", final=True))
    except OSError as exc:
        raise CliError(Exit.UNAVAILABLE, f"{what}: the stream broke ({type(exc).__name__})") from None
    finally:
        response.release_conn()


def logs(cluster: Cluster, ref: str, *, follow: bool, head: bool, tail: int | None,
         write: Callable[[str], None], note: Callable[[str], None]) -> None:
    """`kubetune logs`: the driver's log of a FineTuneJob or EvalJob; with `follow`, wait for the pod to
    start, then stream until its log ends."""
    job = get_job(cluster, ref)
    said: set[str] = set()

    def once(message: str) -> None:  # a note each time something new is found or waited for
        if message not in said:
            said.add(message)
            note(message)

    while True:
        try:
            source = find_log_source(cluster, job, head)
            once(f"{job}: {source.role} pod {source.name}, container {source.container}")
            stream_log(cluster, source, follow=follow, tail=tail, write=write)
            return
        except CliError as exc:
            if not follow or exc.code != Exit.NOT_FOUND or job.phase in TERMINAL_PHASES:
                raise
            once(f"waiting: {exc.message}")
        time.sleep(POLL_SECONDS)
        job = get_job(cluster, f"{job.kind}/{job.name}")


# --------------------------------------------------------------------------------------------- report


def evaljob_of(cluster: Cluster, ref: str) -> Job:
    """The EvalJob `ref` names, or the one a FineTuneJob's spec.evaluation made (controlled by it)."""
    job = get_job(cluster, ref)
    if job.kind == "EvalJob":
        return job
    from kubetune.contract.evalplan import evaljob_name

    if not (job.body.get("spec") or {}).get("evaluation"):
        raise CliError(Exit.USAGE, f"{job} has no spec.evaluation: name its EvalJob")
    name = evaljob_name(job.name)
    evaljob = get_job(cluster, f"evaljob/{name}")
    if controller_uid(evaljob.body) != job.uid:
        raise CliError(Exit.NOT_FOUND, f"EvalJob {job.namespace}/{name} is not controlled by {job}")
    return evaljob


def report_uri(job: Job) -> str:
    """Where the evaluator wrote `job`'s report: spec.output.uri + /report.html, once status.report says it
    has (the location is the spec's, not a status field's)."""
    from kubetune.contract.storage import join_uri

    status = job.body.get("status") or {}
    if not (status.get("report") or {}).get("uri"):
        if job.phase == "Failed":
            reason = next((c.get("reason") for c in status.get("conditions") or []
                           if c.get("type") == "Failed" and c.get("status") == "True"), None)
            raise CliError(Exit.NOT_FOUND, f"{job} failed{f' ({reason})' if reason else ''} without a report: "
                                           f"see kubetune logs evaljob/{job.name}")
        raise CliError(Exit.NOT_FOUND, f"{job} has no report yet (phase {job.phase})")
    return join_uri(str(job.body["spec"]["output"]["uri"]), "report.html")


def stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
