"""Shared fixtures for the API tests: manifest factories and an offline stand-in for the apiserver.

`CrdValidator` checks an object the way the apiserver checks a custom resource, in the same order:
unknown fields (kubectl's strict field validation), metadata.name, structural defaulting, the
OpenAPI v3.0 schema (with jsonschema's Draft 4 validator, which has the boolean
`exclusiveMinimum`/`exclusiveMaximum` of OpenAPI 3.0), list types, and finally every
`x-kubernetes-validations` CEL rule, evaluated against the sub-object it is attached to (`self`) and,
on updates, the correlated old sub-object (`oldSelf`) by the fake apiserver's CEL engine
(support.fakekube.CelEngine, built on cel-python). Each error records the layer that caught
it, so a test can insist that a cross-field mistake is caught by CEL and not by accident elsewhere.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest

from kube_schema import iter_schema_nodes
from kubetune.api import crd as crd_gen

# The fake apiserver's CEL engine (support.fakekube) evaluates x-kubernetes-validations with
# cel-python; that package is optional, the fake is not: it must import.
from support.fakekube import MISSING, CelEngine

try:
    import celpy
except ImportError:  # pragma: no cover - cel-python is a test dependency
    celpy = None

Json = dict[str, Any]


# --------------------------------------------------------------------------- manifests


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parts(path: str) -> list[str | int]:
    return [name if name else int(index) for name, index in _PART.findall(path)]


def _parent(doc: Json, parts: list[str | int]) -> Any:
    node: Any = doc
    for part, nxt in itertools.pairwise(parts):
        if isinstance(part, int):
            node = node[part]
        else:
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
    return node


def set_path(doc: Json, path: str, value: Any) -> Json:
    """Set `spec.dataset.maxLength` (or `spec.resources.tolerations[0].operator`) in place.

    Missing intermediate objects are created. Returns `doc`.
    """
    parts = _parts(path)
    _parent(doc, parts)[parts[-1]] = copy.deepcopy(value)
    return doc


def del_path(doc: Json, path: str) -> Json:
    """Remove the field at a dotted path in place (KeyError when absent). Returns `doc`."""
    parts = _parts(path)
    del _parent(doc, parts)[parts[-1]]
    return doc


def get_path(doc: Any, path: str) -> Any:
    """The value at a dotted path (KeyError/IndexError when absent)."""
    for part in _parts(path):
        doc = doc[part]
    return doc


def base_ftj() -> Json:
    """A small valid FineTuneJob: required fields plus a jsonl template and explicit validation data."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "test-job", "namespace": "default"},
        "spec": {
            "baseModel": {"name": "meta-llama/Llama-2-7b-hf"},
            "dataset": {
                "train": {"uri": "s3://bucket/viggo/train.jsonl"},
                "validation": {"uri": "s3://bucket/viggo/valid.jsonl"},
                "template": {"prompt": "<START_Q>{ref}<END_Q>", "completion": "<START_A>{mr}"},
            },
            "output": {"uri": "s3://bucket/runs/test-job"},
        },
    }


def make_ftj(**overrides: Any) -> Json:
    """A fresh valid FineTuneJob manifest (a dict, as kubectl would send it).

    Keyword arguments replace top-level `spec` fields by their wire (camelCase) name, e.g.
    `make_ftj(suspend=True, hyperparameters={"epochs": 3})`; `name=` sets metadata.name; a value of
    None removes the field. Finer edits: `set_path(make_ftj(), "spec.dataset.maxLength", 8)`.
    """
    doc = base_ftj()
    for key, value in overrides.items():
        path = "metadata.name" if key == "name" else f"spec.{key}"
        if value is None:
            del_path(doc, path)
        else:
            set_path(doc, path, value)
    return doc


def make_evj(**overrides: Any) -> Json:
    """A fresh valid EvalJob manifest; keyword arguments replace top-level `spec` fields (None removes)."""
    doc: Json = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "EvalJob",
        "metadata": {"name": "test-eval", "namespace": "default"},
        "spec": {
            "candidates": [
                {"name": "tuned", "model": {"fineTuneJobRef": {"name": "test-job"}}},
                {"name": "base", "model": {"name": "meta-llama/Llama-2-7b-hf"},
                 "prompt": {"instruction": "Give the meaning representation.", "template": "{ref} ->",
                            "fewShot": {"k": 2, "source": {"uri": "s3://bucket/viggo/train.jsonl"}}}},
            ],
            "dataset": {"uri": "s3://bucket/viggo/test.jsonl", "reference": "{mr}"},
            "scorer": {"name": "viggo"},
            "output": {"uri": "s3://bucket/viggo/eval"},
        },
    }
    for key, value in overrides.items():
        if value is None:
            del_path(doc, f"spec.{key}")
        else:
            set_path(doc, f"spec.{key}", value)
    return doc


# --------------------------------------------------------------------------- CRD validation


@dataclass(frozen=True)
class CrdError:
    """One rejection, as the apiserver would report it: the layer that caught it, a path, a message."""

    layer: str  # "unknown-field" | "metadata" | "schema" | "list-type" | "cel"
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


def format_path(parts: Any) -> str:
    """['spec', 'resources', 'tolerations', 0, 'operator'] -> 'spec.resources.tolerations[0].operator'."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def iter_rules(schema: Json) -> Iterator[tuple[str, Json]]:
    """(schema path, rule) for every x-kubernetes-validations rule in a schema."""
    for path, node in iter_schema_nodes(schema):
        for rule in node.get("x-kubernetes-validations", []):
            yield path, rule


@functools.cache
def _cel_environment() -> Any:
    return celpy.Environment()


@functools.cache
def compile_rule(rule: str) -> Any:
    """A cel-python program for one rule; raises celpy.CELParseError when it does not compile."""
    env = _cel_environment()
    return env.program(env.compile(rule))


class CrdValidator:
    """Validates custom objects against one CRD's openAPIV3Schema, offline."""

    def __init__(self, crd: Json, *, cel: bool = True) -> None:
        self.crd = crd
        self.kind: str = crd["spec"]["names"]["kind"]
        self.schema: Json = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        # Draft 4 has OpenAPI 3.0's boolean exclusiveMinimum/exclusiveMaximum.
        jsonschema.Draft4Validator.check_schema(self.schema)
        self._schema_validator = jsonschema.Draft4Validator(self.schema)
        self.cel = cel and celpy is not None
        if self.cel:
            self._cel_engine = CelEngine()
            self._cel_engine.compile_schema(self.schema, self.kind)

    # -- introspection

    def nodes(self) -> list[tuple[str, Json]]:
        """(path, schema node) for every node of the openAPIV3Schema."""
        return list(iter_schema_nodes(self.schema))

    def rules(self) -> list[tuple[str, Json]]:
        """(schema path, rule) for every x-kubernetes-validations rule."""
        return list(iter_rules(self.schema))

    @staticmethod
    def compile(rule: str) -> Any:
        """The cel-python program of a rule; raises celpy.CELParseError when it does not compile."""
        return compile_rule(rule)

    # -- apiserver steps, in order

    def unknown_fields(self, obj: Any, schema: Json | None = None, path: str = "") -> list[CrdError]:
        """Fields the schema does not declare (kubectl's default --validate=strict rejects them)."""
        schema = self.schema if schema is None else schema
        errors: list[CrdError] = []
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return errors
        if isinstance(obj, dict) and "properties" in schema:
            for key, value in obj.items():
                sub = schema["properties"].get(key)
                where = _join(path, key)
                if sub is None:
                    errors.append(CrdError("unknown-field", where, f'unknown field "{where}"'))
                else:
                    errors.extend(self.unknown_fields(value, sub, where))
        elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
            for key, value in obj.items():
                errors.extend(self.unknown_fields(value, schema["additionalProperties"], _join(path, key)))
        elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(obj):
                errors.extend(self.unknown_fields(item, schema["items"], _join(path, i)))
        return errors

    @staticmethod
    def metadata_errors(obj: Json) -> list[CrdError]:
        """The apiserver's own ObjectMeta checks (the CRD schema cannot restrict metadata)."""
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not name:
            if meta.get("generateName"):
                return []
            return [CrdError("metadata", "metadata.name", "Required value: name or generateName is required")]
        if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
            return [CrdError("metadata", "metadata.name",
                             f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower '
                             "case alphanumeric characters, '-' or '.'")]
        return []

    def default(self, obj: Json) -> Json:
        """A copy of `obj` with the schema defaults applied, top-down, as the apiserver does."""
        out = copy.deepcopy(obj)
        _apply_defaults(out, self.schema)
        return out

    def schema_errors(self, obj: Json) -> list[CrdError]:
        errors = []
        for error in self._schema_validator.iter_errors(obj):
            parts = list(error.absolute_path)
            if error.validator == "required":
                for prop in error.validator_value:
                    if isinstance(error.instance, dict) and prop not in error.instance:
                        errors.append(CrdError("schema", format_path([*parts, prop]), "Required value"))
            else:
                errors.append(CrdError("schema", format_path(parts), f"Invalid value: {error.message}"))
        return sorted(set(errors), key=str)

    def list_type_errors(self, obj: Any, schema: Json | None = None, path: str = "") -> list[CrdError]:
        """x-kubernetes-list-type set/map: duplicate items or keys are rejected."""
        schema = self.schema if schema is None else schema
        errors: list[CrdError] = []
        if isinstance(obj, list):
            list_type = schema.get("x-kubernetes-list-type")
            if list_type in ("set", "map"):
                keys = schema.get("x-kubernetes-list-map-keys", [])
                seen: list[Any] = []
                for i, item in enumerate(obj):
                    ident = item if list_type == "set" else [item.get(k) for k in keys]
                    if ident in seen:
                        errors.append(CrdError("list-type", _join(path, i), f"Duplicate value: {ident!r}"))
                    seen.append(ident)
            for i, item in enumerate(obj):
                errors.extend(self.list_type_errors(item, schema.get("items") or {}, _join(path, i)))
        elif isinstance(obj, dict):
            props = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            for key, value in obj.items():
                sub = props.get(key) or (extra if isinstance(extra, dict) else None)
                if sub is not None:
                    errors.extend(self.list_type_errors(value, sub, _join(path, key)))
        return errors

    def cel_errors(self, obj: Any, old: Any = None) -> list[CrdError]:
        """Every x-kubernetes-validations rule along `obj`, evaluated by the fake apiserver's CEL engine.

        Transition rules (those using oldSelf) run only when `old` is given, against the correlated old
        value. Rules the engine cannot evaluate are recorded in `skipped_cel_rules`, never silently
        passed: tests assert that list stays empty.
        """
        if not self.cel:
            return []
        found = self._cel_engine.validate(obj, self.schema, "", MISSING if old is None else old, self.kind)
        return [CrdError("cel", "" if e.field == "<root>" else e.field, e.detail) for e in found]

    @property
    def skipped_cel_rules(self) -> list[Any]:
        """Rules the CEL engine could not compile or evaluate (missing functions, optionalOldSelf)."""
        return list(self._cel_engine.skipped) if self.cel else []

    # -- all together

    def errors(self, obj: Json, old: Json | None = None) -> list[CrdError]:
        """Everything the apiserver would reject `obj` for (an update from `old` when given)."""
        errors = self.unknown_fields(obj) + self.metadata_errors(obj)
        defaulted = self.default(obj)
        schema = self.schema_errors(defaulted)
        errors += schema + self.list_type_errors(defaulted)
        # Like the apiserver, skip CEL when the object does not even have the schema's shape.
        if not any("is not of type" in e.message for e in schema):
            old_defaulted = self.default(old) if old is not None else None
            errors += self.cel_errors(defaulted, old_defaulted)
        return errors


def _apply_defaults(obj: Any, schema: Json) -> None:
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        for name, sub in props.items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
        for key, value in obj.items():
            sub = props.get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                _apply_defaults(value, sub)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            _apply_defaults(item, schema["items"])


def crd_validator(crd: Json, *, cel: bool = True) -> CrdValidator:
    """A validator for one CRD (as loaded from crds/ or built by kubetune.api.crd)."""
    return CrdValidator(crd, cel=cel)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(name="crd_validator")
def crd_validator_fixture() -> Callable[..., CrdValidator]:
    """crd_validator(crd): a fresh validator (its own CEL engine and skipped-rule record)."""
    return crd_validator


@pytest.fixture(scope="session")
def generated_crds() -> dict[str, Json]:
    """File name -> CRD, built from the models right now."""
    return crd_gen.all_crds()


@pytest.fixture(scope="session")
def ftj_crd(generated_crds: dict[str, Json]) -> Json:
    return generated_crds["kubetune.io_finetunejobs.yaml"]


@pytest.fixture(scope="session")
def evj_crd(generated_crds: dict[str, Json]) -> Json:
    return generated_crds["kubetune.io_evaljobs.yaml"]


@pytest.fixture(scope="session")
def ftj_validator(ftj_crd: Json) -> CrdValidator:
    return crd_validator(ftj_crd)


@pytest.fixture(scope="session")
def evj_validator(evj_crd: Json) -> CrdValidator:
    return crd_validator(evj_crd)


@pytest.fixture(scope="session")
def validators(ftj_validator: CrdValidator, evj_validator: CrdValidator) -> dict[str, CrdValidator]:
    """Kind -> validator."""
    return {"FineTuneJob": ftj_validator, "EvalJob": evj_validator}


@pytest.fixture
def requires_cel() -> None:
    if celpy is None:
        pytest.skip("cel-python (import celpy) is not installed: CEL rules cannot be checked offline")


@pytest.fixture(name="make_ftj")
def make_ftj_fixture() -> Callable[..., Json]:
    return make_ftj


@pytest.fixture(name="make_evj")
def make_evj_fixture() -> Callable[..., Json]:
    return make_evj


@pytest.fixture(name="set_path")
def set_path_fixture() -> Callable[[Json, str, Any], Json]:
    return set_path


@pytest.fixture(name="del_path")
def del_path_fixture() -> Callable[[Json, str], Json]:
    return del_path


@pytest.fixture(name="get_path")
def get_path_fixture() -> Callable[[Any, str], Any]:
    return get_path
