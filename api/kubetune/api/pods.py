"""`spec.podTemplate`: what a job's pods get besides what kubetune builds (both kinds share the model).

kubetune owns the containers (image, command, ports, securityContext); `podTemplate` adds the settings a
cluster needs to run them: the ServiceAccount of a cloud identity, environment variables and Secrets, extra
volumes and their mounts, labels and annotations, a PriorityClass, a scheduler, worker affinity, image pull
Secrets. It is a restricted subset of core/v1 (as Tekton's `podTemplate` is): typed, so the CRD rejects at
apply time what the apiserver would reject only at pod creation (the RayJob would sit with no pods), and
safe: nothing in it can make a pod privileged (no securityContext, no host namespaces, only the volume types
Pod Security "restricted" admits; no hostPath).

How it merges with what kubetune sets (docs: docs/reference.md "Pod template"):

| field                            | pods                                   | merge                               |
|----------------------------------|----------------------------------------|-------------------------------------|
| serviceAccountName               | all                                    | replaces the job's own account      |
| labels, annotations              | all                                    | added; kubetune's keys are reserved |
| priorityClassName, schedulerName | all                                    | set (kubetune sets none)            |
| imagePullSecrets                 | all                                    | set (kubetune sets none)            |
| env, envFrom                     | Ray pods (not the job submitter)       | appended; reserved names rejected   |
| volumes, volumeMounts            | Ray pods (not the job submitter)       | appended; reserved names and paths  |
| affinity                         | worker pods (as nodeSelector)          | set (kubetune sets none)            |

securityContext, containers, command, image and kubetune's own env, volumes and labels always win: a
podTemplate field that would collide with them is rejected at apply time, naming the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, JsonValue, model_validator

from kubetune.api.common import (
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN,
    ApiModel,
    LabelKey,
    LabelValue,
    Quantity,
    ServiceAccountName,
    cel_string,
)
from kubetune.api.errors import FieldError

JsonDict = dict[str, JsonValue]

# -- names kubetune reserves in the pods it builds ----------------------------------------------------

# Environment variables kubetune (or KubeRay, for the Ray cluster's own wiring and its token authentication)
# sets: a podTemplate.env entry of one of these names is rejected, so what a pod gets never depends on which
# of two entries of one name wins.
RESERVED_ENV_PREFIXES = ("KUBETUNE_", "RAY_AUTH_")
RESERVED_ENV_NAMES = ("HF_TOKEN", "RAY_ADDRESS", "RAY_CLUSTER_NAME", "RAY_IP", "RAY_PORT", "RAY_NODE_TYPE_NAME",
                      "RAY_CLOUD_INSTANCE_ID", "RAY_DASHBOARD_ADDRESS", "RAY_JOB_SUBMISSION_ID")
# Volumes kubetune mounts (`kubetune-config`, `kubetune-dshm`, `kubetune-pvc-0`, ...) and KubeRay adds.
RESERVED_VOLUME_PREFIX = "kubetune-"
RESERVED_VOLUME_NAMES = ("shared-mem", "ray-logs")
# Where kubetune mounts them: a podTemplate mount may be neither at, under nor above one of these.
RESERVED_MOUNT_PATHS = ("/etc/kubetune", "/dev/shm", "/mnt/pvc")
# Label keys kubetune and KubeRay set on every pod (its NetworkPolicy selects pods by them), and Kueue's
# (a queue-name label on a pod would queue it a second time, pod by pod): `spec.queueName` is the way in.
RESERVED_LABEL_KEYS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/managed-by")
RESERVED_LABEL_PREFIXES = ("kubetune.io/", "ray.io/", "kueue.x-k8s.io/")
RESERVED_ANNOTATION_PREFIXES = ("kubetune.io/", "ray.io/")
# The apiserver's limit on all annotations of one object together.
ANNOTATIONS_LIMIT = 256 * 1024

ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
CONFIG_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
# An absolute path of non-empty elements, none of them '.' or '..', without a trailing '/'.
MOUNT_PATH_PATTERN = r"^(/[^/]*[^/.][^/]*)+$"
# A relative path that never climbs out of its volume (no absolute path, no `..` element).
_ESCAPING_PATH = r"(^/|(^|/)[.][.](/|$))"
_FIELD_PATH_PATTERN = (r"^(metadata\.(name|namespace|uid)|metadata\.(labels|annotations)\['[^']+'\]"
                       r"|spec\.(nodeName|serviceAccountName)|status\.(hostIP|hostIPs|podIP|podIPs))$")
_RESOURCE_FIELD_PATTERN = r"^(limits|requests)\.(cpu|memory|ephemeral-storage)$"


def _rule(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    out: JsonDict = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def _cel_schema(*rules: JsonDict) -> ConfigDict:
    """A model's CEL rules (`x-kubernetes-validations` on its node of the CRD schema)."""
    validations: list[JsonValue] = list(rules)
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": validations})


def _exactly_one(self: ApiModel, fields: tuple[str, ...], what: str) -> None:
    given = [f for f in fields if getattr(self, f) is not None]
    if len(given) != 1:
        names = ", ".join(type(self).model_fields[f].alias or f for f in fields)
        raise ValueError(f"{what}: set exactly one of {names}")


def _exactly_one_rule(fields: tuple[str, ...], what: str) -> JsonDict:
    count = " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)
    return _rule(f"{count} == 1", f"{what}: set exactly one of {', '.join(fields)}")


def _relative_path(value: str) -> str:
    if re.search(_ESCAPING_PATH, value):
        raise ValueError(f"{value!r} must be a relative path without '..' elements")
    return value


RelativePath = Annotated[str, Field(min_length=1, max_length=1024, json_schema_extra={"x-kubernetes-validations": [
    _rule(f"!self.matches('{cel_string(_ESCAPING_PATH)}')", "must be a relative path without '..' elements")]}),
    AfterValidator(_relative_path)]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=rf"^{DNS_SUBDOMAIN}$")]
VolumeName = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
EnvName = Annotated[str, Field(min_length=1, max_length=256, pattern=ENV_NAME_PATTERN)]
ConfigKey = Annotated[str, Field(min_length=1, max_length=253, pattern=CONFIG_KEY_PATTERN)]
FileMode = Annotated[int, Field(ge=0, le=0o777)]


# -- env -------------------------------------------------------------------------------------------


class KeySelector(ApiModel):
    """A key of a Secret or ConfigMap in the job's namespace."""

    name: ObjectName = Field(description="Name of the Secret or ConfigMap.")
    key: ConfigKey = Field(description="The key to select.")
    optional: bool | None = Field(default=None, description="Start the pod even if the object or key is missing.")


class ObjectFieldSelector(ApiModel):
    """A field of the pod (downward API)."""

    field_path: str = Field(description="metadata.name, metadata.namespace, metadata.uid, metadata.labels['k'], "
                            "metadata.annotations['k'], spec.nodeName, spec.serviceAccountName, status.hostIP(s) or "
                            "status.podIP(s).", max_length=317, pattern=_FIELD_PATH_PATTERN)
    api_version: Literal["v1"] | None = Field(default=None, description="Version of the schema the path is in (v1).")


class ResourceFieldSelector(ApiModel):
    """A resource of the container itself (downward API)."""

    resource: str = Field(description="limits.cpu, limits.memory, limits.ephemeral-storage, requests.cpu, "
                          "requests.memory or requests.ephemeral-storage.", max_length=64,
                          pattern=_RESOURCE_FIELD_PATTERN)
    divisor: Quantity | None = Field(default=None, description="Unit the value is expressed in (default 1).")


class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from: exactly one source."""

    model_config = ApiModel.model_config | _cel_schema(_exactly_one_rule(
        ("secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef"), "valueFrom"))

    secret_key_ref: KeySelector | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: KeySelector | None = Field(default=None, description="A key of a ConfigMap.")
    field_ref: ObjectFieldSelector | None = Field(default=None, description="A field of the pod.")
    resource_field_ref: ResourceFieldSelector | None = Field(default=None, description="A resource of the container.")

    @model_validator(mode="after")
    def _one(self) -> EnvVarSource:
        _exactly_one(self, ("secret_key_ref", "config_map_key_ref", "field_ref", "resource_field_ref"), "valueFrom")
        return self


def _reserved_env(name: str) -> str | None:
    if name.startswith(RESERVED_ENV_PREFIXES) or name in RESERVED_ENV_NAMES:
        return (f"{name} is set by kubetune or KubeRay (reserved: {', '.join(RESERVED_ENV_NAMES)} and names "
                f"starting {', '.join(RESERVED_ENV_PREFIXES)}); use another name")
    return None


_RESERVED_ENV_CEL = " || ".join([*(f"self.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES),
                                 f"self in [{', '.join(repr(n) for n in RESERVED_ENV_NAMES)}]"])


def _check_env_name(name: str) -> str:
    if problem := _reserved_env(name):
        raise ValueError(problem)
    return name


UserEnvName = Annotated[EnvName, Field(json_schema_extra={"x-kubernetes-validations": [_rule(
    f"!({_RESERVED_ENV_CEL})", f"reserved for kubetune and KubeRay: {', '.join(RESERVED_ENV_NAMES)} and names "
    f"starting {', '.join(RESERVED_ENV_PREFIXES)}")]}), AfterValidator(_check_env_name)]


class EnvVar(ApiModel):
    """An environment variable of the job's Ray containers: a literal value or one read from a source."""

    model_config = ApiModel.model_config | _cel_schema(
        _rule("!(has(self.value) && has(self.valueFrom))", "env: set value or valueFrom, not both"))

    name: UserEnvName = Field(description="Variable name ([-._a-zA-Z][-._a-zA-Z0-9]*); kubetune's own names are "
                              "reserved.")
    value: str | None = Field(default=None, description="Literal value.", max_length=32768)
    value_from: EnvVarSource | None = Field(default=None, description="Read the value from a Secret, ConfigMap, "
                                            "or the pod.")

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("env: set value or valueFrom, not both")
        return self


class ObjectReference(ApiModel):
    """A Secret or ConfigMap in the job's namespace, as a whole."""

    name: ObjectName = Field(description="Its name.")
    optional: bool | None = Field(default=None, description="Start the pod even if it does not exist.")


def _check_prefix(value: str) -> str:
    if value.startswith(RESERVED_ENV_PREFIXES):
        raise ValueError(f"prefixes starting {', '.join(RESERVED_ENV_PREFIXES)} are reserved for kubetune")
    return value


class EnvFromSource(ApiModel):
    """Every key of a Secret or ConfigMap as an environment variable (kubetune's own variables still win:
    Kubernetes gives `env` precedence over `envFrom`)."""

    model_config = ApiModel.model_config | _cel_schema(_exactly_one_rule(("configMapRef", "secretRef"), "envFrom"))

    prefix: Annotated[str, AfterValidator(_check_prefix)] | None = Field(
        default=None, description="Prepended to every key.", max_length=256, pattern=ENV_NAME_PATTERN,
        json_schema_extra={"x-kubernetes-validations": [_rule(
            " && ".join(f"!self.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES),
            f"prefixes starting {', '.join(RESERVED_ENV_PREFIXES)} are reserved for kubetune")]})
    config_map_ref: ObjectReference | None = Field(default=None, description="A ConfigMap.")
    secret_ref: ObjectReference | None = Field(default=None, description="A Secret.")

    @model_validator(mode="after")
    def _one(self) -> EnvFromSource:
        _exactly_one(self, ("config_map_ref", "secret_ref"), "envFrom")
        return self


# -- volumes ---------------------------------------------------------------------------------------


class KeyToPath(ApiModel):
    """One key of a Secret or ConfigMap as a file."""

    key: ConfigKey = Field(description="The key.")
    path: RelativePath = Field(description="File path in the volume (relative, no '..').")
    mode: FileMode | None = Field(default=None, description="File mode bits (0-0777).")


class ConfigMapVolumeSource(ApiModel):
    """A ConfigMap's keys as files."""

    name: ObjectName = Field(description="The ConfigMap.")
    items: list[KeyToPath] | None = Field(default=None, description="Only these keys, at these paths.",
                                          max_length=64)
    default_mode: FileMode | None = Field(default=None, description="Mode of the files (0-0777).")
    optional: bool | None = Field(default=None, description="Start the pod even if it does not exist.")


class SecretVolumeSource(ApiModel):
    """A Secret's keys as files."""

    secret_name: ObjectName = Field(description="The Secret.")
    items: list[KeyToPath] | None = Field(default=None, description="Only these keys, at these paths.",
                                          max_length=64)
    default_mode: FileMode | None = Field(default=None, description="Mode of the files (0-0777).")
    optional: bool | None = Field(default=None, description="Start the pod even if it does not exist.")


class PersistentVolumeClaimVolumeSource(ApiModel):
    """A PersistentVolumeClaim of the namespace."""

    claim_name: ObjectName = Field(description="The claim.")
    read_only: bool | None = Field(default=None, description="Mount it read-only.")


class EmptyDirVolumeSource(ApiModel):
    """A scratch directory that lives as long as the pod."""

    medium: Literal["", "Memory"] | None = Field(default=None, description="'' (the node's disk) or Memory "
                                                  "(tmpfs, counted against the container's memory).")
    size_limit: Quantity | None = Field(default=None, description="Most it may hold, e.g. 100Gi.")


class CsiVolumeSource(ApiModel):
    """An inline CSI volume (e.g. the Secrets Store CSI driver for a cloud secret manager)."""

    driver: str = Field(description="The CSI driver's name, e.g. secrets-store.csi.k8s.io.", min_length=1,
                        max_length=63, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    read_only: bool | None = Field(default=None, description="Mount it read-only.")
    fs_type: str | None = Field(default=None, description="Filesystem type, e.g. ext4.", max_length=32)
    volume_attributes: dict[Annotated[str, Field(max_length=253)], Annotated[str, Field(max_length=4096)]] | None = (
        Field(default=None, description="Driver-specific attributes.", max_length=64))
    node_publish_secret_ref: ObjectReference | None = Field(default=None, description="A Secret the driver "
                                                            "reads (its name only).")


class DownwardApiVolumeFile(ApiModel):
    """One field of the pod as a file."""

    path: RelativePath = Field(description="File path in the volume (relative, no '..').")
    field_ref: ObjectFieldSelector = Field(description="The pod field.")
    mode: FileMode | None = Field(default=None, description="File mode bits (0-0777).")


class DownwardApiVolumeSource(ApiModel):
    """Fields of the pod as files."""

    items: list[DownwardApiVolumeFile] = Field(description="The files.", min_length=1, max_length=32)
    default_mode: FileMode | None = Field(default=None, description="Mode of the files (0-0777).")


class ProjectedKeys(ApiModel):
    """A Secret's or ConfigMap's keys, projected."""

    name: ObjectName = Field(description="Its name.")
    items: list[KeyToPath] | None = Field(default=None, description="Only these keys, at these paths.",
                                          max_length=64)
    optional: bool | None = Field(default=None, description="Start the pod even if it does not exist.")


class ProjectedDownwardApi(ApiModel):
    """Fields of the pod, projected."""

    items: list[DownwardApiVolumeFile] = Field(description="The files.", min_length=1, max_length=32)


class ServiceAccountTokenProjection(ApiModel):
    """A token of the pod's ServiceAccount for another audience (e.g. a cloud's workload identity federation)."""

    audience: str | None = Field(default=None, description="Who the token is for (default: the apiserver).",
                                 max_length=512)
    expiration_seconds: int | None = Field(default=None, description="Requested lifetime (at least 600 s).",
                                           ge=600, le=4294967296)
    path: RelativePath = Field(description="File path in the volume (relative, no '..').")


class VolumeProjection(ApiModel):
    """One source of a projected volume: exactly one of secret, configMap, downwardAPI, serviceAccountToken."""

    model_config = ApiModel.model_config | _cel_schema(_exactly_one_rule(
        ("secret", "configMap", "downwardAPI", "serviceAccountToken"), "projected source"))

    secret: ProjectedKeys | None = Field(default=None, description="A Secret's keys.")
    config_map: ProjectedKeys | None = Field(default=None, description="A ConfigMap's keys.")
    downward_api: ProjectedDownwardApi | None = Field(default=None, alias="downwardAPI",
                                                      description="Fields of the pod.")
    service_account_token: ServiceAccountTokenProjection | None = Field(default=None, description="A token of the "
                                                                        "pod's ServiceAccount.")

    @model_validator(mode="after")
    def _one(self) -> VolumeProjection:
        _exactly_one(self, ("secret", "config_map", "downward_api", "service_account_token"), "projected source")
        return self


class ProjectedVolumeSource(ApiModel):
    """Several sources in one directory."""

    sources: list[VolumeProjection] = Field(description="The sources.", min_length=1, max_length=16)
    default_mode: FileMode | None = Field(default=None, description="Mode of the files (0-0777).")


class ClaimRequests(ApiModel):
    """What a claim requests."""

    storage: Quantity = Field(description="The size, e.g. 500Gi.")


class ClaimResources(ApiModel):
    """The storage a claim asks for."""

    requests: ClaimRequests = Field(description="Its size.")


class ClaimSpec(ApiModel):
    """The PersistentVolumeClaim an ephemeral volume creates (a subset of its spec)."""

    access_modes: list[Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]] = Field(
        description="How it is mounted, e.g. [ReadWriteOnce].", min_length=1, max_length=4)
    storage_class_name: ObjectName | None = Field(default=None, description="StorageClass (default: the "
                                                  "cluster's default class).")
    resources: ClaimResources = Field(description="Its size.")


class ClaimMetadata(ApiModel):
    """Labels and annotations of the claim."""

    labels: dict[LabelKey, LabelValue] | None = Field(default=None, description="Labels.", max_length=32)
    annotations: dict[LabelKey, Annotated[str, Field(max_length=3500)]] | None = Field(
        default=None, description="Annotations.", max_length=32)


class ClaimTemplate(ApiModel):
    """The claim of an ephemeral volume."""

    metadata: ClaimMetadata | None = Field(default=None, description="Labels and annotations of the claim.")
    spec: ClaimSpec = Field(description="The claim.")


class EphemeralVolumeSource(ApiModel):
    """A PersistentVolumeClaim created with the pod and deleted with it (large scratch space)."""

    volume_claim_template: ClaimTemplate = Field(description="The claim.")


_VOLUME_SOURCES = ("configMap", "secret", "persistentVolumeClaim", "emptyDir", "csi", "downwardAPI", "projected",
                   "ephemeral")


class Volume(ApiModel):
    """A volume of the job's Ray pods: exactly one source, of the types Pod Security "restricted" admits (no
    hostPath, no in-tree network filesystems)."""

    model_config = ApiModel.model_config | _cel_schema(_exactly_one_rule(_VOLUME_SOURCES, "volume"))

    name: VolumeName = Field(description=f"Volume name (a DNS label); names starting {RESERVED_VOLUME_PREFIX!r} and "
                             f"{', '.join(RESERVED_VOLUME_NAMES)} are kubetune's and KubeRay's.")
    config_map: ConfigMapVolumeSource | None = Field(default=None, description="A ConfigMap's keys as files.")
    secret: SecretVolumeSource | None = Field(default=None, description="A Secret's keys as files.")
    persistent_volume_claim: PersistentVolumeClaimVolumeSource | None = Field(
        default=None, description="A PersistentVolumeClaim.")
    empty_dir: EmptyDirVolumeSource | None = Field(default=None, description="A scratch directory.")
    csi: CsiVolumeSource | None = Field(default=None, description="An inline CSI volume.")
    downward_api: DownwardApiVolumeSource | None = Field(default=None, alias="downwardAPI",
                                                         description="Fields of the pod as files.")
    projected: ProjectedVolumeSource | None = Field(default=None, description="Several sources in one directory.")
    ephemeral: EphemeralVolumeSource | None = Field(default=None, description="A claim created with the pod.")

    @model_validator(mode="after")
    def _one(self) -> Volume:
        _exactly_one(self, ("config_map", "secret", "persistent_volume_claim", "empty_dir", "csi", "downward_api",
                            "projected", "ephemeral"), "volume")
        return self


class VolumeMount(ApiModel):
    """Where one of podTemplate.volumes is mounted in the job's Ray containers."""

    name: VolumeName = Field(description="A volume of podTemplate.volumes.")
    mount_path: str = Field(description="Absolute path in the container (no '.' or '..' elements, no trailing "
                            "'/'); not at, under or above kubetune's own mounts "
                            f"({', '.join(RESERVED_MOUNT_PATHS)}).", min_length=2, max_length=1024,
                            pattern=MOUNT_PATH_PATTERN)
    sub_path: RelativePath | None = Field(default=None, description="Mount this path of the volume instead of its "
                                          "root (relative, no '..').")
    read_only: bool | None = Field(default=None, description="Mount it read-only.")
    mount_propagation: Literal["None", "HostToContainer"] | None = Field(
        default=None, description="None or HostToContainer (Bidirectional needs a privileged container).")


# -- affinity --------------------------------------------------------------------------------------


class NodeSelectorRequirement(ApiModel):
    """A node label (matchExpressions) or field (matchFields) requirement."""

    model_config = ApiModel.model_config | _cel_schema(
        _rule("self.operator in ['Exists', 'DoesNotExist'] ? !has(self.values) || size(self.values) == 0 : "
              "has(self.values) && size(self.values) > 0",
              "values must be empty for Exists and DoesNotExist, and given for the other operators"),
        _rule("!(self.operator in ['Gt', 'Lt']) || (has(self.values) && size(self.values) == 1 && "
              "self.values[0].matches('^-?[0-9]+$'))",
              "Gt and Lt take exactly one integer value"))

    key: LabelKey = Field(description="The label key (or, in matchFields, metadata.name).")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        description="In, NotIn, Exists, DoesNotExist, Gt or Lt.")
    values: list[LabelValue] | None = Field(default=None, description="Values (In, NotIn: any of; Gt, Lt: one "
                                            "integer; none for Exists, DoesNotExist).", max_length=64)

    @model_validator(mode="after")
    def _values(self) -> NodeSelectorRequirement:
        values = self.values or []
        if self.operator in ("Exists", "DoesNotExist") and values:
            raise FieldError("values", f"values must be empty for operator {self.operator}")
        if self.operator in ("In", "NotIn") and not values:
            raise FieldError("values", f"values must not be empty for operator {self.operator}")
        if self.operator in ("Gt", "Lt") and (len(values) != 1 or not re.fullmatch(r"-?[0-9]+", values[0])):
            raise FieldError("values", f"operator {self.operator} takes exactly one integer value")
        return self


class NodeSelectorTerm(ApiModel):
    """Requirements a node must all meet."""

    model_config = ApiModel.model_config | _cel_schema(_rule(
        "(has(self.matchExpressions) && size(self.matchExpressions) > 0) || "
        "(has(self.matchFields) && size(self.matchFields) > 0)",
        "a node selector term needs at least one of matchExpressions, matchFields"))

    match_expressions: list[NodeSelectorRequirement] | None = Field(default=None, description="Node label "
                                                                    "requirements.", max_length=16)
    match_fields: list[NodeSelectorRequirement] | None = Field(default=None, description="Node field "
                                                               "requirements (key metadata.name).", max_length=4)

    @model_validator(mode="after")
    def _not_empty(self) -> NodeSelectorTerm:
        if not self.match_expressions and not self.match_fields:
            raise ValueError("a node selector term needs at least one of matchExpressions, matchFields")
        for i, requirement in enumerate(self.match_fields or []):
            if requirement.key != "metadata.name" or requirement.operator not in ("In", "NotIn"):
                raise FieldError(f"matchFields[{i}]", "matchFields support only key metadata.name with In or NotIn")
        return self


class NodeSelector(ApiModel):
    """Terms of which a node must meet one."""

    node_selector_terms: list[NodeSelectorTerm] = Field(description="The terms (ORed).", min_length=1,
                                                        max_length=16)


class PreferredSchedulingTerm(ApiModel):
    """A node preference with its weight."""

    weight: int = Field(description="Weight, 1-100.", ge=1, le=100)
    preference: NodeSelectorTerm = Field(description="The preferred nodes.")


class NodeAffinity(ApiModel):
    """Which nodes the pods may (or prefer to) run on."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        default=None, description="Nodes the pods must run on.")
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = Field(
        default=None, description="Nodes the pods prefer.", max_length=16)


class LabelSelectorRequirement(ApiModel):
    """A label requirement of a label selector."""

    model_config = ApiModel.model_config | _cel_schema(_rule(
        "self.operator in ['Exists', 'DoesNotExist'] ? !has(self.values) || size(self.values) == 0 : "
        "has(self.values) && size(self.values) > 0",
        "values must be empty for Exists and DoesNotExist, and given for In and NotIn"))

    key: LabelKey = Field(description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists or "
                                                                       "DoesNotExist.")
    values: list[LabelValue] | None = Field(default=None, description="Values (In, NotIn).", max_length=64)

    @model_validator(mode="after")
    def _values(self) -> LabelSelectorRequirement:
        if (self.operator in ("Exists", "DoesNotExist")) == bool(self.values):
            raise FieldError("values", "values must be empty for Exists and DoesNotExist, and given for In and NotIn")
        return self


class LabelSelector(ApiModel):
    """A label selector (matchLabels and matchExpressions, ANDed)."""

    match_labels: dict[LabelKey, LabelValue] | None = Field(default=None, description="Labels to match.",
                                                            max_length=32)
    match_expressions: list[LabelSelectorRequirement] | None = Field(default=None, description="Requirements.",
                                                                     max_length=16)


class PodAffinityTerm(ApiModel):
    """Pods (by label) the pods should, or should not, be near, in a topology domain."""

    label_selector: LabelSelector | None = Field(default=None, description="The other pods.")
    namespace_selector: LabelSelector | None = Field(default=None, description="Namespaces of the other pods.")
    namespaces: list[Annotated[str, Field(max_length=63, pattern=DNS_LABEL_PATTERN)]] | None = Field(
        default=None, description="Namespaces of the other pods (default: the job's).", max_length=16)
    topology_key: LabelKey = Field(description="Node label of the domain, e.g. topology.kubernetes.io/zone.")


class WeightedPodAffinityTerm(ApiModel):
    """A pod affinity preference with its weight."""

    weight: int = Field(description="Weight, 1-100.", ge=1, le=100)
    pod_affinity_term: PodAffinityTerm = Field(description="The term.")


class PodAffinity(ApiModel):
    """Pod (anti-)affinity: required and preferred terms."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        default=None, description="Terms the pods must meet.", max_length=16)
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = Field(
        default=None, description="Terms the pods prefer to meet.", max_length=16)


class Affinity(ApiModel):
    """core/v1 Affinity: node affinity, pod affinity and pod anti-affinity."""

    node_affinity: NodeAffinity | None = Field(default=None, description="Node affinity.")
    pod_affinity: PodAffinity | None = Field(default=None, description="Pods to be near.")
    pod_anti_affinity: PodAffinity | None = Field(default=None, description="Pods to stay away from.")


# -- labels, annotations, extra resources ------------------------------------------------------------


def _reserved_label(key: str) -> str | None:
    if key in RESERVED_LABEL_KEYS or key.startswith(RESERVED_LABEL_PREFIXES):
        return (f"label {key!r} is reserved ({', '.join(RESERVED_LABEL_KEYS)} and keys starting "
                f"{', '.join(RESERVED_LABEL_PREFIXES)}: kubetune, KubeRay and Kueue set them)")
    return None


def _starts_any(var: str, prefixes: tuple[str, ...]) -> str:
    return " || ".join(f"{var}.startsWith('{p}')" for p in prefixes)


_LABELS_RULE = _rule(
    f"self.all(k, !(k in [{', '.join(repr(k) for k in RESERVED_LABEL_KEYS)}] || "
    f"{_starts_any('k', RESERVED_LABEL_PREFIXES)}))",
    f"reserved label keys: {', '.join(RESERVED_LABEL_KEYS)} and keys starting {', '.join(RESERVED_LABEL_PREFIXES)}")
_ANNOTATIONS_RULE = _rule(f"self.all(k, !({_starts_any('k', RESERVED_ANNOTATION_PREFIXES)}))",
                          f"annotation keys starting {', '.join(RESERVED_ANNOTATION_PREFIXES)} are reserved")

# -- the pod template -------------------------------------------------------------------------------


def _escapes(path: str) -> str | None:
    """Why a mountPath is not allowed (None if it is)."""
    for reserved in RESERVED_MOUNT_PATHS:
        if path == reserved or path.startswith(reserved + "/") or reserved.startswith(path + "/"):
            return (f"{path} is at, under or above a path kubetune mounts ({', '.join(RESERVED_MOUNT_PATHS)})")
    return None


_MOUNT_PATH_RULE = " && ".join(f"!(m.mountPath == '{r}' || m.mountPath.startsWith('{r}/') || "
                               f"'{r}'.startsWith(m.mountPath + '/'))" for r in RESERVED_MOUNT_PATHS)


class PodTemplate(ApiModel):
    """What the job's pods get besides what kubetune builds (a restricted subset of core/v1 PodTemplateSpec).

    kubetune's securityContext, containers, its own environment, volumes and labels always win; a field
    that would collide with them is rejected. See the table in this module's docstring (and docs/reference.md).
    """

    model_config = ApiModel.model_config | _cel_schema(
        _rule("!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
              "self.volumes.exists(v, v.name == m.name))",
              "every volumeMounts[].name must be a volume of podTemplate.volumes", ".volumeMounts"),
    )

    service_account_name: ServiceAccountName | None = Field(
        default=None, description="An existing ServiceAccount of the namespace every pod of the job runs as (one "
        "bound to a cloud identity: IRSA, GKE Workload Identity, Azure Workload Identity). The job's status Role "
        "is bound to it; without it the operator creates the job's own.")
    labels: dict[LabelKey, LabelValue] | None = Field(
        default=None, description="Labels of every pod (kubetune's, KubeRay's and Kueue's keys are reserved).",
        max_length=64, json_schema_extra={"x-kubernetes-validations": [_LABELS_RULE]})
    annotations: dict[LabelKey, Annotated[str, Field(max_length=3500)]] | None = Field(
        default=None, description="Annotations of every pod (keys starting kubetune.io/ and ray.io/ are reserved).",
        max_length=64, json_schema_extra={"x-kubernetes-validations": [_ANNOTATIONS_RULE]})
    priority_class_name: ObjectName | None = Field(
        default=None, description="PriorityClass of every pod (not a system- class: those are kube-system's).",
        json_schema_extra={"x-kubernetes-validations": [
            _rule("!self.startsWith('system-')", "system- PriorityClasses are for kube-system's pods")]})
    scheduler_name: ObjectName | None = Field(default=None, description="Scheduler of every pod (default: the "
                                              "cluster's).")
    image_pull_secrets: list[ObjectReference] | None = Field(
        default=None, description="Secrets to pull kubetune's images with (a private registry or mirror).",
        max_length=16)
    env: list[EnvVar] | None = Field(
        default=None, description="Environment variables of the Ray containers, after kubetune's own (whose names "
        "are reserved).", max_length=128,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    env_from: list[EnvFromSource] | None = Field(
        default=None, description="Secrets and ConfigMaps whose keys become environment variables of the Ray "
        "containers (kubetune's own variables win).", max_length=16)
    volumes: list[Volume] | None = Field(
        default=None, description="Volumes of the Ray pods, after kubetune's own.", max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                           "x-kubernetes-validations": [_rule(
                               f"self.all(v, !v.name.startsWith('{RESERVED_VOLUME_PREFIX}') && "
                               f"!(v.name in [{', '.join(repr(n) for n in RESERVED_VOLUME_NAMES)}]))",
                               f"volume names starting {RESERVED_VOLUME_PREFIX!r} and "
                               f"{', '.join(RESERVED_VOLUME_NAMES)} are kubetune's and KubeRay's")]})
    volume_mounts: list[VolumeMount] | None = Field(
        default=None, description="Where the volumes are mounted in the Ray containers.", max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["mountPath"],
                           "x-kubernetes-validations": [_rule(
                               f"self.all(m, {_MOUNT_PATH_RULE})",
                               "a mountPath may not be at, under or above a path kubetune mounts "
                               f"({', '.join(RESERVED_MOUNT_PATHS)})")]})
    affinity: Affinity | None = Field(
        default=None, description="Affinity of the worker pods (training workers, serving replicas), like "
        "nodeSelector and tolerations; the head and the evaluator are placed freely.")

    @model_validator(mode="after")
    def _consistent(self) -> PodTemplate:
        for key in self.labels or {}:
            if problem := _reserved_label(key):
                raise FieldError(f"labels.{key}", problem)
        for key in self.annotations or {}:
            if key.startswith(RESERVED_ANNOTATION_PREFIXES):
                raise FieldError(f"annotations.{key}", f"annotation keys starting "
                                 f"{', '.join(RESERVED_ANNOTATION_PREFIXES)} are reserved")
        size = sum(len(k) + len(v) for k, v in (self.annotations or {}).items())
        if size > ANNOTATIONS_LIMIT:
            raise FieldError("annotations", f"annotations total {size} bytes; the apiserver allows {ANNOTATIONS_LIMIT}")
        if self.priority_class_name and self.priority_class_name.startswith("system-"):
            raise FieldError("priorityClassName", "system- PriorityClasses are for kube-system's pods")
        _unique(self.env or [], "name", "env")
        names = _unique(self.volumes or [], "name", "volumes")
        for i, volume in enumerate(self.volumes or []):
            if volume.name.startswith(RESERVED_VOLUME_PREFIX) or volume.name in RESERVED_VOLUME_NAMES:
                raise FieldError(f"volumes[{i}].name", f"volume names starting {RESERVED_VOLUME_PREFIX!r} and "
                                 f"{', '.join(RESERVED_VOLUME_NAMES)} are kubetune's and KubeRay's")
        _unique(self.volume_mounts or [], "mount_path", "volumeMounts", "mountPath")
        for i, mount in enumerate(self.volume_mounts or []):
            if mount.name not in names:
                raise FieldError(f"volumeMounts[{i}].name", f"{mount.name!r} is not a volume of podTemplate.volumes")
            if problem := _escapes(mount.mount_path):
                raise FieldError(f"volumeMounts[{i}].mountPath", problem)
        return self


def _unique(items: list[Any], attr: str, where: str, wire: str | None = None) -> set[str]:
    seen: set[str] = set()
    for i, item in enumerate(items):
        value = getattr(item, attr)
        if value in seen:
            raise FieldError(f"{where}[{i}].{wire or attr}", f"duplicate {wire or attr} {value!r}")
        seen.add(value)
    return seen


# -- Kueue -------------------------------------------------------------------------------------------

# A LocalQueue's or WorkloadPriorityClass's name, as it goes into a label value (Kueue's labels): a DNS-1123
# subdomain of at most 63 characters.
KueueName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
QUEUE_RULE = _rule("!has(self.workloadPriorityClassName) || has(self.queueName)",
                   "workloadPriorityClassName needs queueName (Kueue reads it only on a queued RayJob)",
                   ".workloadPriorityClassName")


def check_queue(queue_name: str | None, workload_priority_class_name: str | None) -> None:
    """A spec's Kueue fields agree (QUEUE_RULE, for the model)."""
    if workload_priority_class_name is not None and queue_name is None:
        raise FieldError("workloadPriorityClassName",
                         "workloadPriorityClassName needs queueName (Kueue reads it only on a queued RayJob)")
