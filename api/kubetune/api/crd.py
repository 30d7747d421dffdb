"""Generate the CustomResourceDefinitions in crds/ from the pydantic models (`make crds`).

pydantic emits JSON Schema 2020-12; the apiserver wants a *structural* OpenAPI v3.0 schema. This
module inlines every `$ref`, folds `Optional[X]` (`anyOf: [X, null]`) into X, drops `title` and
`additionalProperties: false` (the apiserver prunes or, with strict field validation, rejects
unknown fields itself), turns numeric `exclusiveMinimum/Maximum` into the v3.0 boolean form, and
keeps `description`, `default`, bounds, enums and `x-kubernetes-validations` (CEL).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.api import evaljob, finetunejob
from kubetune.api.common import GROUP, VERSION, cel_string

Schema = dict[str, Any]

_DROP_KEYS = {"title", "$defs"}
_LITERAL_KEYS = {"default", "enum", "examples", "x-kubernetes-validations", "required"}


class SchemaError(ValueError):
    """The models produced a schema that cannot be made structural."""


def structural_schema(model: type[BaseModel]) -> Schema:
    """A model's JSON schema, rewritten into a Kubernetes structural schema."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    schema: Schema = _rewrite(raw, defs, path=model.__name__)
    return schema


def _rewrite(node: Any, defs: dict[str, Schema], path: str) -> Any:
    if isinstance(node, list):
        return [_rewrite(item, defs, path) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        ref = node.pop("$ref").rsplit("/", 1)[-1]
        merged = {**copy.deepcopy(defs[ref]), **node}  # sibling keys (description, default) win
        return _rewrite(merged, defs, path)
    if node.get("x-kubernetes-int-or-string"):
        node.pop("anyOf", None)  # the one union a structural schema allows, spelled its own way
    if "patternProperties" in node or "propertyNames" in node:
        node = _map_keys_as_cel(node, path)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise SchemaError(f"{path}: unions of several types are not structural; use one type")
        merged = {**options[0], **node}
        return _rewrite(merged, defs, path)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "default" and value is None:
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
            continue
        if key in _LITERAL_KEYS:
            out[key] = copy.deepcopy(value)
            continue
        if key == "properties":
            out[key] = {name: _rewrite(sub, defs, f"{path}.{name}") for name, sub in value.items()}
            continue
        out[key] = _rewrite(value, defs, path)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    untyped_ok = ("x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string")
    if "type" not in out and not any(k in out for k in untyped_ok):
        raise SchemaError(f"{path}: every node of a structural schema needs a type")
    return out


def _map_keys_as_cel(node: Schema, path: str) -> Schema:
    """A map whose keys are constrained (`dict[LabelKey, V]`): pydantic writes `patternProperties` and
    `propertyNames`, which a structural schema may not hold. The values' schema becomes
    `additionalProperties`, the keys' constraints a CEL rule over the map."""
    patterns = node.pop("patternProperties", {})
    names = node.pop("propertyNames", {})
    if len(patterns) > 1:
        raise SchemaError(f"{path}: one key pattern per map")
    checks = []
    for pattern, values in patterns.items():
        node["additionalProperties"] = values
        checks.append(f"k.matches('{cel_string(pattern)}')")
    if "maxLength" in names:
        checks.append(f"size(k) <= {int(names['maxLength'])}")
    if checks:
        rules = list(node.get("x-kubernetes-validations", []))
        rules.append({"rule": f"self.all(k, {' && '.join(checks)})",
                      "message": "every key must be a valid label key (an optional DNS-1123 subdomain prefix "
                                 "and '/', then a name of at most 63 characters)"})
        node["x-kubernetes-validations"] = rules
    return node


def _leftovers(node: Any, path: str = "") -> list[str]:
    """Paths of keys a structural schema must not contain (used by the drift tests too)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "anyOf", "allOf", "oneOf", "title", "$defs"):
                found.append(f"{path}/{key}")
            found.extend(_leftovers(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found.extend(_leftovers(item, f"{path}/{i}"))
    return found


def _immutable_once_started(spec: Schema, mutable: set[str]) -> list[dict[str, str]]:
    """Root-level CEL transition rules: spec fields other than `mutable` are frozen once started."""
    required = set(spec.get("required", []))
    started = "has(oldSelf.status) && has(oldSelf.status.startTime)"
    allowed = (" (only " + ", ".join(f"spec.{m}" for m in sorted(mutable)) + " may change)") if mutable else ""
    rules = []
    for field, sub in spec["properties"].items():
        if field in mutable:
            continue
        if field in required or "default" in sub:
            same = f"self.spec.{field} == oldSelf.spec.{field}"
        else:
            same = (f"has(self.spec.{field}) == has(oldSelf.spec.{field}) && "
                    f"(!has(self.spec.{field}) || self.spec.{field} == oldSelf.spec.{field})")
        rules.append({
            "rule": f"!({started}) || ({same})",
            "message": f"spec.{field} is immutable once the job has started{allowed}",
            "fieldPath": f".spec.{field}",
            "reason": "FieldValueForbidden",
        })
    return rules


def _condition_column(name: str, condition: str, field: str, priority: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].{field}',
        "priority": priority,
    }


# The operator names children after the job (e.g. `<name>-train`): a DNS label, as for a Job's pods.
NAME_RULE = {
    "rule": "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63",
    "message": "metadata.name must be a DNS label: at most 63 lowercase letters, digits and '-'",
    "reason": "FieldValueInvalid",
}


def _crd(kind: str, plural: str, short: str, object_model: type[BaseModel], spec_model: type[BaseModel],
         status_model: type[BaseModel], columns: list[dict[str, Any]],
         root_rules: list[dict[str, str]] | None = None) -> Schema:
    spec = structural_schema(spec_model)
    status = structural_schema(status_model)
    root: Schema = {
        "type": "object",
        "description": (object_model.__doc__ or kind).strip().splitlines()[0],
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of the object."},
            "kind": {"type": "string", "description": "Kind of the object."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    root["x-kubernetes-validations"] = [NAME_RULE, *(root_rules or [])]
    leftovers = _leftovers(root)
    if leftovers:
        raise SchemaError(f"{kind}: non-structural keys left: {leftovers}")
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def finetunejob_crd() -> Schema:
    """The FineTuneJob CRD."""
    spec = structural_schema(finetunejob.FineTuneJobSpec)
    columns = [
        _condition_column("Status", "Ready", "reason"),
        {"name": "Epoch", "type": "integer", "jsonPath": ".status.progress.epoch"},
        {"name": "Epochs", "type": "integer", "jsonPath": ".spec.hyperparameters.epochs", "priority": 1},
        {"name": "Val-PPL", "type": "number", "jsonPath": ".status.progress.valPerplexity"},
        {"name": "Best-PPL", "type": "number", "jsonPath": ".status.bestCheckpoint.valPerplexity"},
        _condition_column("Ready", "Ready", "status", priority=1),
        {"name": "Model", "type": "string", "jsonPath": ".spec.baseModel.name", "priority": 1},
        {"name": "Workers", "type": "integer", "jsonPath": ".spec.resources.workers", "priority": 1},
        {"name": "RayJob", "type": "string", "jsonPath": ".status.children.rayJob", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return _crd(finetunejob.KIND, finetunejob.PLURAL, "ftj", finetunejob.FineTuneJob, finetunejob.FineTuneJobSpec,
                finetunejob.FineTuneJobStatus, columns, _immutable_once_started(spec, {"suspend"}))


def evaljob_crd() -> Schema:
    """The EvalJob CRD."""
    spec = structural_schema(evaljob.EvalJobSpec)
    columns = [
        _condition_column("Status", "Ready", "reason"),
        {"name": "Scorer", "type": "string", "jsonPath": ".spec.scorer.name"},
        {"name": "Candidates", "type": "integer", "jsonPath": ".status.candidateCount"},
        _condition_column("Gate", "GatePassed", "status"),
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
        _condition_column("Ready", "Ready", "status", priority=1),
        {"name": "Report", "type": "string", "jsonPath": ".status.report.uri", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return _crd(evaljob.KIND, evaljob.PLURAL, "evj", evaljob.EvalJob, evaljob.EvalJobSpec,
                evaljob.EvalJobStatus, columns, _immutable_once_started(spec, set()))


HEADER = "# Generated from the pydantic models in kubetune.api by `make crds`. Do not edit by hand.\n"


def render(crd: Schema) -> str:
    """One CRD as YAML text, byte-for-byte reproducible."""
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=120, allow_unicode=True)


def all_crds() -> dict[str, Schema]:
    """File name -> CRD, for every kind kubetune serves."""
    return {
        f"{GROUP}_{finetunejob.PLURAL}.yaml": finetunejob_crd(),
        f"{GROUP}_{evaljob.PLURAL}.yaml": evaljob_crd(),
    }


def write_all(directory: Path) -> list[Path]:
    """Write every CRD into `directory`; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, crd in all_crds().items():
        path = directory / name
        path.write_text(render(crd))
        paths.append(path)
    return paths
