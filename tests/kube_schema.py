"""Validate objects against a CRD's openAPIV3Schema offline, as strictly as the apiserver would.

jsonschema checks types, bounds, enums and required fields (Draft 4 semantics: Kubernetes schemas use
OpenAPI 3.0's boolean exclusiveMinimum). On top of that, fields the schema does not know are reported:
a structural schema has no `additionalProperties: false`, and the apiserver silently prunes (or, with
strict field validation, rejects) unknown fields — either way a field KubeRay does not know is a bug.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema


def crd_schema(crd: dict[str, Any], version: str | None = None) -> dict[str, Any]:
    versions = crd["spec"]["versions"]
    chosen = next(v for v in versions if version is None or v["name"] == version)
    schema: dict[str, Any] = chosen["schema"]["openAPIV3Schema"]
    return schema


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Dotted paths of fields in `obj` that `schema` does not declare."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            sub = f"{path}.{key}" if path else key
            if props is not None and key in props:
                found.extend(unknown_fields(value, props[key], sub))
            elif isinstance(extra, dict):
                found.extend(unknown_fields(value, extra, sub))
            elif props is not None and path != "metadata" and not path.endswith(".metadata"):
                found.append(sub)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found.extend(unknown_fields(item, schema["items"], f"{path}[{i}]"))
    return found


def schema_errors(obj: dict[str, Any], crd: dict[str, Any], version: str | None = None) -> list[str]:
    """Every way `obj` breaks the CRD's schema: jsonschema errors and unknown fields."""
    schema = crd_schema(crd, version)
    validator = jsonschema.Draft4Validator(schema)
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
              for e in validator.iter_errors(obj)]
    errors += [f"{p}: unknown field" for p in unknown_fields(obj, schema)]
    return errors


def iter_schema_nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with a readable path (`spec.resources.tolerations[*]`, `...columns{*}`)."""
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from iter_schema_nodes(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from iter_schema_nodes(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from iter_schema_nodes(schema["additionalProperties"], f"{path}{{*}}")

