"""Shared fixtures for the API tests: the generated CRDs, and the fake apiserver's admission of them offline.

There is one admission implementation: the fake apiserver's (support.fakekube). `CrdValidator` runs it on
one object without HTTP, in the apiserver's order: ObjectMeta (`metadata_errors`), then the CRD version's
`Schema.review`, which prunes unknown fields (kubectl's strict field validation rejects them), applies
the structural defaults, validates the OpenAPI v3.0 schema and list types, and finally evaluates every
`x-kubernetes-validations` CEL rule against the sub-object it is attached to (`self`) and, on updates,
the correlated old sub-object (`oldSelf`). Each error records the step that caught it, so a test can
insist that a cross-field mistake is caught by CEL and not by accident elsewhere.

Manifests come from tests/factories.py (`ftj_manifest`, `evj_manifest`, `set_path`, `del_path`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from kube_schema import iter_schema_nodes
from kubetune.api import crd as crd_gen
from support.fakekube import CelEngine, Schema, SkippedRule, apply_defaults, metadata_errors, prune

try:
    import celpy
except ImportError:  # pragma: no cover - cel-python is a test dependency
    celpy = None

Json = dict[str, Any]


@dataclass(frozen=True)
class CrdError:
    """One rejection, as the apiserver would report it: the step that caught it, a field path, a message."""

    layer: str  # "unknown-field" | "metadata" | "schema" | "list-type" | "cel"
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<nil>'}: {self.message}"


class CrdValidator:
    """The fake apiserver's admission of one CRD's objects (support.fakekube), offline."""

    def __init__(self, crd: Json) -> None:
        self.crd = crd
        self.kind: str = crd["spec"]["names"]["kind"]
        (version,) = crd["spec"]["versions"]
        self.schema: Json = version["schema"]["openAPIV3Schema"]
        self._cel = CelEngine()
        self._admission = Schema(self.schema, self._cel, f"{crd['metadata']['name']}/{version['name']}")
        self.cel = celpy is not None  # without cel-python the fake records every rule as skipped

    # -- introspection

    def nodes(self) -> list[tuple[str, Json]]:
        """(path, schema node) for every node of the openAPIV3Schema."""
        return list(iter_schema_nodes(self.schema))

    def compile(self, rule: str) -> Any:
        """The fake's compiled program of a rule; AssertionError (with celpy's reason) when it does not compile."""
        engine = CelEngine()
        program = engine.program(rule, self.kind)
        assert program is not None, engine.skipped
        return program

    @property
    def skipped_cel_rules(self) -> list[SkippedRule]:
        """Rules the fake's CEL engine could not compile or evaluate (missing functions, optionalOldSelf)."""
        return list(self._cel.skipped)

    # -- the fake's admission steps

    def unknown_fields(self, value: Any, schema: Json | None = None, path: str = "") -> list[CrdError]:
        """Fields `schema` (default: the CRD's) does not declare: the apiserver prunes them, kubectl's strict
        field validation rejects them."""
        unknown: list[str] = []
        prune(copy.deepcopy(value), self.schema if schema is None else schema, path, unknown=unknown,
              keep_type_meta=schema is None)
        return [CrdError("unknown-field", field, f'unknown field "{field}"') for field in unknown]

    def default(self, obj: Json) -> Json:
        """A copy of `obj` with the schema defaults applied, as the apiserver stores it."""
        out = copy.deepcopy(obj)
        apply_defaults(out, self.schema)
        return out

    def errors(self, obj: Json, old: Json | None = None) -> list[CrdError]:
        """Everything the fake apiserver rejects `obj` for: a create, or an update from `old` when given."""
        obj = copy.deepcopy(obj)
        stored_old = None
        if old is not None:  # as stored: pruned and defaulted when it was written
            stored_old = copy.deepcopy(old)
            prune(stored_old, self.schema, keep_type_meta=True)
            apply_defaults(stored_old, self.schema)
        found = [CrdError("metadata", e.field, e.detail)
                 for e in metadata_errors(obj.get("metadata") or {}, "subdomain")]
        unknown: list[str] = []
        reviewed = self._admission.review(obj, stored_old, status_only=False, unknown=unknown)
        found += [CrdError("unknown-field", field, f'unknown field "{field}"') for field in unknown]
        return found + [CrdError(step, e.field, e.detail) for step, e in reviewed]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(name="crd_validator")
def crd_validator_fixture() -> Callable[[Json], CrdValidator]:
    """crd_validator(crd): a fresh validator (its own CEL engine and skipped-rule record)."""
    return CrdValidator


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
    return CrdValidator(ftj_crd)


@pytest.fixture(scope="session")
def evj_validator(evj_crd: Json) -> CrdValidator:
    return CrdValidator(evj_crd)


@pytest.fixture(scope="session")
def validators(ftj_validator: CrdValidator, evj_validator: CrdValidator) -> dict[str, CrdValidator]:
    """Kind -> validator."""
    return {"FineTuneJob": ftj_validator, "EvalJob": evj_validator}


@pytest.fixture
def requires_cel() -> None:
    if celpy is None:
        pytest.skip("cel-python (import celpy) is not installed: CEL rules cannot be checked offline")
