"""Shared API building blocks: the base model, references, quantities and status conditions."""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubetune.api.errors import FieldError

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes resource.Quantity, as the apiserver's OpenAPI schema spells it.
QUANTITY_PATTERN = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
# A `{field}` placeholder or an escaped brace; the CEL twin of `template_fields`.
TEMPLATE_PATTERN = r"^([^{}]|[{][{]|[}][}]|[{][A-Za-z0-9_-]+[}])*$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# What Kubernetes accepts where it would otherwise refuse the pod only at creation (the job would sit
# Pending): label keys and values (nodeSelector, the GPU product label), DNS-1123 subdomains (PVC claim
# names), container image references. RE2 syntax: the CRD's `pattern` and CEL's `matches()` use it too.
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_SUBDOMAIN = rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY_PATTERN = rf"^({DNS_SUBDOMAIN}/)?{_LABEL_NAME}$"
LABEL_VALUE_PATTERN = rf"^({_LABEL_NAME})?$"
# The distribution reference grammar (docker/distribution reference/regexp.go), less IPv6 hosts.
_PATH_COMPONENT = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# A registry host is told from a path by a '.', a port or being localhost, as the kubelet does.
_DOMAIN = (rf"(localhost(:[0-9]+)?|{_DOMAIN_COMPONENT}(\.{_DOMAIN_COMPONENT})+(:[0-9]+)?"
           rf"|{_DOMAIN_COMPONENT}:[0-9]+)")
IMAGE_PATTERN = (rf"^({_DOMAIN}/)?"
                 rf"{_PATH_COMPONENT}(/{_PATH_COMPONENT})*"
                 r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
                 r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$")
PVC_URI_PATTERN = rf"^pvc://{DNS_SUBDOMAIN}(/.*)?$"


class ApiModel(BaseModel):
    """Base of every kubetune API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_default=True,
    )

    @classmethod
    def from_wire(cls, data: Any) -> Any:
        """Parse wire data: camelCase names only (snake_case is for Python code, not manifests)."""
        return cls.model_validate(data, by_alias=True, by_name=False)

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in YAML/JSON: camelCase, unset optional fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel_string(text: str) -> str:
    """`text` inside a single-quoted CEL string literal (CEL knows no `\\.` escape: backslashes double)."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _check_pvc_uri(value: str) -> str:
    if value.startswith("pvc://"):
        claim = value[len("pvc://"):].split("/", 1)[0]
        if len(claim) > 253 or not re.match(PVC_URI_PATTERN, value):
            raise ValueError(f"pvc://{claim}: the claim name must be a DNS-1123 subdomain (lowercase letters, "
                             "digits, '-' and '.', at most 253 characters)")
    return value


# A storage URI; a pvc:// URI names a PersistentVolumeClaim, which must be a valid claim name.
Uri = Annotated[
    str,
    AfterValidator(_check_pvc_uri),
    Field(min_length=1, max_length=2048, json_schema_extra={"x-kubernetes-validations": [{
        "rule": f"!self.startsWith('pvc://') || self.matches('{cel_string(PVC_URI_PATTERN)}')",
        "message": "the claim name of a pvc:// URI must be a DNS-1123 subdomain"}]}),
]


def _check_label_key(value: str) -> str:
    prefix, _, name = value.rpartition("/")
    if len(prefix) > 253 or len(name) > 63 or not re.match(LABEL_KEY_PATTERN, value):
        raise ValueError(f"{value!r} is not a valid label key: an optional DNS-1123 subdomain prefix and '/', "
                         "then at most 63 of [A-Za-z0-9_.-], starting and ending alphanumeric")
    return value


def _check_label_value(value: str) -> str:
    if len(value) > 63 or not re.match(LABEL_VALUE_PATTERN, value):
        raise ValueError(f"{value!r} is not a valid label value: at most 63 of [A-Za-z0-9_.-], starting and "
                         "ending alphanumeric")
    return value


# The patterns go into the CRD schema as they are; pydantic checks them in the validators (clearer errors).
LabelKey = Annotated[str, Field(max_length=317, json_schema_extra={"pattern": LABEL_KEY_PATTERN}),
                     AfterValidator(_check_label_key)]
LabelValue = Annotated[str, Field(max_length=63, json_schema_extra={"pattern": LABEL_VALUE_PATTERN}),
                       AfterValidator(_check_label_value)]
# Node labels a pod must match: keys and values as Kubernetes validates them at pod creation.
NodeSelector = dict[LabelKey, LabelValue]


def _check_image(value: str) -> str:
    if not re.match(IMAGE_PATTERN, value):
        raise ValueError(f"{value[:80]!r} is not a valid image reference ([registry[:port]/]path[:tag][@digest], "
                         "lowercase path, no whitespace)")
    return value


# A container image reference, as the kubelet parses it; rejected at apply time instead of at pull time.
ImageReference = Annotated[str, Field(min_length=1, max_length=512, json_schema_extra={"pattern": IMAGE_PATTERN}),
                           AfterValidator(_check_image)]


# A ServiceAccount's name, as Kubernetes validates it (a DNS-1123 subdomain).
ServiceAccountName = Annotated[str, Field(min_length=1, max_length=253, pattern=rf"^{DNS_SUBDOMAIN}$")]

# Ray's token authentication, which kubetune turns on for every Ray cluster it starts, came with Ray 2.52.
RAY_VERSION_PATTERN = r"^(2\.(5[2-9]|[6-9][0-9]|[1-9][0-9]{2,})\.[0-9]+|([3-9]|[1-9][0-9]+)\.[0-9]+\.[0-9]+)$"


def _check_ray_version(value: str) -> str:
    if not re.match(RAY_VERSION_PATTERN, value):
        raise ValueError(f"{value[:32]!r} is not a Ray version kubetune can run: MAJOR.MINOR.PATCH, at least 2.52.0 "
                         "(Ray token authentication, which every kubetune Ray cluster uses)")
    return value


RayVersion = Annotated[str, Field(max_length=32, json_schema_extra={"pattern": RAY_VERSION_PATTERN}),
                       AfterValidator(_check_ray_version)]


class LocalObjectReference(ApiModel):
    """A reference to another object in the same namespace."""

    name: str = Field(
        description="Name of the referenced object (same namespace).",
        min_length=1,
        max_length=253,
    )


class SecretKeyReference(ApiModel):
    """A key of a Secret in the same namespace."""

    name: str = Field(description="Name of the Secret (same namespace).", min_length=1, max_length=253)
    key: str = Field(description="Key within the Secret's data.", min_length=1, max_length=253)


class ConfigMapKeyReference(ApiModel):
    """A key of a ConfigMap in the same namespace."""

    name: str = Field(description="Name of the ConfigMap (same namespace).", min_length=1, max_length=253)
    key: str = Field(
        default="ds_config.json",
        description="Key within the ConfigMap's data holding the document.",
        min_length=1,
        max_length=253,
    )


class Toleration(ApiModel):
    """A Kubernetes pod toleration (subset of core/v1 Toleration)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": "has(self.key) || self.operator == 'Exists'",
                 "message": "a toleration without a key must use operator Exists"},
                {"rule": "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                 "message": "a toleration with operator Exists must not have a value"},
            ]
        }
    }

    key: LabelKey | None = Field(default=None, description="Taint key the toleration applies to (a label key).")
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal", description="Relationship between key and value: Exists or Equal."
    )
    value: LabelValue | None = Field(default=None, description="Taint value matched when operator is Equal "
                                     "(a label value); none with Exists.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )

    @model_validator(mode="after")
    def _key_or_exists(self) -> Toleration:
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must not have a value")
        return self


ConditionStatus = Literal["True", "False", "Unknown"]

# The phases that end a job, of either kind (an EvalJob has no Cancelled): nothing moves a job out of them.
# The one definition, for the operator's decisions, its handlers' filters and the CLI.
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "Cancelled"})


class Condition(ApiModel):
    """A kstatus-compatible condition (metav1.Condition)."""

    type: str = Field(description="Type of condition, e.g. Ready, Running, Succeeded, Failed, Suspended.",
                      max_length=316)
    status: ConditionStatus = Field(description="Status of the condition: True, False or Unknown.")
    reason: str = Field(description="Machine-readable CamelCase reason for the last transition.",
                        max_length=1024)
    message: str = Field(default="", description="Human-readable details about the last transition.",
                         max_length=32768)
    last_transition_time: str = Field(description="When the condition last changed status (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation the condition was computed from.", ge=0
    )


def defaulted(factory: Callable[[], Any], description: str, **kwargs: Any) -> Any:
    """A field built by `factory` whose wire form is also the CRD schema's `default`.

    pydantic leaves `default_factory` out of the JSON schema; without a `default` the apiserver would
    not fill in the nested defaults of an omitted object, and kubectl users would see less than the
    operator assumes.
    """
    value = factory()
    wire = [v.to_wire() for v in value] if isinstance(value, list) else (
        value.to_wire() if isinstance(value, ApiModel) else value)
    return Field(default_factory=factory, description=description,
                 json_schema_extra={"default": wire}, **kwargs)


def now_rfc3339() -> str:
    """Current UTC time in the apiserver's RFC 3339 format (second precision, 'Z')."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def template_fields(fmt: str) -> list[str]:
    """The `{field}` placeholders of a format string; raises ValueError on a malformed template."""
    names: list[str] = []
    if not re.fullmatch(TEMPLATE_PATTERN, fmt, flags=re.DOTALL):
        bad = re.search(r"[{][^{}]*[}]?|[}]", fmt)
        raise ValueError(f"placeholder {bad.group(0) if bad else fmt!r} must be a field name like "
                         "{question} (write {{ and }} for literal braces)")
    for _literal, field, _spec, _conv in string.Formatter().parse(fmt):
        if field:
            names.append(field)
    return names


def _quantity_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


# resource.Quantity: `cpu: 8` and `cpu: "500m"` are both valid, as in a pod spec.
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=QUANTITY_PATTERN, max_length=64),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "pattern": QUANTITY_PATTERN}),
]


# The one place a GPU type becomes a node label: NVIDIA GPU Feature Discovery's product label.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCTS: dict[str, str] = {
    "A10G": "NVIDIA-A10G",
    "A100-40GB": "NVIDIA-A100-SXM4-40GB",
    "A100-80GB": "NVIDIA-A100-SXM4-80GB",
    "H100": "NVIDIA-H100-80GB-HBM3",
    "H200": "NVIDIA-H200",
    "L4": "NVIDIA-L4",
    "L40S": "NVIDIA-L40S",
    "T4": "Tesla-T4",
    "V100": "Tesla-V100-SXM2-16GB",
}


class DataSource(ApiModel):
    """One file of training or validation data."""

    uri: Uri = Field(description="Data file: s3://bucket/key, pvc://claim/path, or a local path.")
    format: Literal["jsonl", "chat", "csv"] = Field(
        default="jsonl",
        description="jsonl: one JSON object per line with the template's fields; chat: JSON lines with "
        "`messages` [{role, content}]; csv: a header row, fields mapped by `columns`.",
    )
    columns: dict[str, str] | None = Field(
        default=None,
        description="Template field name -> column (csv) or key (jsonl) in the file; fields not listed are "
        "read under their own name.",
        max_length=64,
    )


# Other resources of a Ray container: ephemeral-storage, hugepages-<size>, or an extended resource
# (<domain>/<name>, e.g. vpc.amazonaws.com/efa); never cpu or memory (their own fields), a GPU (gpusPerWorker,
# gpusPerReplica) or a kubernetes.io resource.
_GPU_RESOURCE = r"(^|/)gpu$|^(nvidia\.com|amd\.com|gpu\.intel\.com)/"
_EXTRA_RESOURCE = r"^(ephemeral-storage|hugepages-[0-9]+[KMGTPE]i?|[a-z0-9.-]+/[-A-Za-z0-9_.]+)$"
_KUBERNETES_IO = r"(^|[.])kubernetes[.]io/"


def _check_extra(value: dict[str, Any]) -> dict[str, Any]:
    for name, quantity in value.items():
        if not re.match(_EXTRA_RESOURCE, name) or re.search(_KUBERNETES_IO, name):
            raise FieldError(name, f"{name!r}: extra resources are ephemeral-storage, hugepages-<size> or an extended "
                             "resource <domain>/<name> (not cpu or memory, nor a kubernetes.io name)")
        if re.search(_GPU_RESOURCE, name):
            raise FieldError(name, f"{name!r}: GPUs are set by gpusPerWorker (gpusPerReplica), not as an extra "
                             "resource")
        if "/" in name and not re.fullmatch(r"[0-9]+", str(quantity)):
            raise FieldError(name, f"{name}: an extended resource is a whole number, not {quantity!r}")
    return value


ExtraResources = Annotated[dict[LabelKey, Quantity], Field(max_length=16, json_schema_extra={
    "x-kubernetes-validations": [
        {"rule": f"self.all(k, k.matches('{cel_string(_EXTRA_RESOURCE)}') && "
                 f"!k.matches('{cel_string(_KUBERNETES_IO)}'))",
         "message": "extra resources are ephemeral-storage, hugepages-<size> or an extended resource "
                    "<domain>/<name> (not cpu or memory, nor a kubernetes.io name)"},
        {"rule": f"self.all(k, !k.matches('{cel_string(_GPU_RESOURCE)}'))",
         "message": "GPUs are set by gpusPerWorker (gpusPerReplica), not as an extra resource"},
        {"rule": "self.all(k, !k.contains('/') || string(self[k]).matches('^[0-9]+$'))",
         "message": "an extended resource is a whole number"},
    ]}), AfterValidator(_check_extra)]


class PodResources(ApiModel):
    """CPU and memory of one Ray pod, and any other resource its container needs."""

    cpu: Quantity = Field(description="CPU request and limit, e.g. '8'.")
    memory: Quantity = Field(description="Memory request and limit, e.g. '48Gi'.")
    extra: ExtraResources | None = Field(
        default=None, description="Other resources, each as request and limit: ephemeral-storage (local scratch "
        "for checkpoints), hugepages-<size>, or an extended resource <domain>/<name> (a whole number, e.g. "
        "vpc.amazonaws.com/efa: 4). Not cpu or memory (above), nor GPUs (gpusPerWorker, gpusPerReplica).")


class ObjectMeta(ApiModel):
    """The metadata fields kubetune reads (others are ignored when parsing)."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    name: str = Field(description="Object name.", pattern=DNS_LABEL_PATTERN, max_length=63)
    namespace: str = Field(default="default", description="Namespace.")
    uid: str | None = Field(default=None, description="Object uid.")
    generation: int | None = Field(default=None, description="Spec generation.")
    resource_version: str | None = Field(default=None, description="The version of the object as read (a "
                                         "write can require it unchanged).")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")
