"""`--set [Kind[/name]:]path=value`: change the YAML resources before the models validate them.

- `path` is dotted camelCase as in the YAML, from `spec` or `metadata`: `spec.hyperparameters.epochs`,
  `spec.candidates[0].generation.maxTokens`; a dot inside a key is written `\\.`
  (`metadata.labels.app\\.kubernetes\\.io/part-of`). Missing mappings on the way are created; a list index
  must exist or be the list's length (append).
- `value` is read as YAML: `2`, `5.0e-6`, `true`, `[a, b]`, `{cpu: "4"}`, `"2"` for a string; `null`
  removes the field; nothing after `=` is the empty string.
- Without a selector it applies to every kubetune resource of the files (FineTuneJobs and EvalJobs);
  `FineTuneJob:` or `EvalJob:` limits it to one kind, `FineTuneJob/viggo:` to one resource. A selector
  must match at least one resource. Overrides apply in the order given.

The models then validate the changed resources, so a bad value is reported naming its field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from kubetune.api.common import GROUP

_SELECTOR = re.compile(r"^(?P<kind>FineTuneJob|EvalJob)(/(?P<name>[a-z0-9]([-a-z0-9.]*[a-z0-9])?))?$")
_SEGMENT = re.compile(r"^(?P<key>[^\[\]]+)(?P<indexes>(\[\d+\])*)$")
ROOTS = ("spec", "metadata")


@dataclass(frozen=True)
class Override:
    """One parsed `--set`."""

    text: str  # as given, for messages
    kind: str | None
    name: str | None
    path: tuple[str | int, ...]
    value: Any
    remove: bool = False

    @property
    def dotted(self) -> str:
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + part.replace(".", "\\.")
        return out

    def selects(self, doc: dict[str, Any]) -> bool:
        if self.kind is not None and doc.get("kind") != self.kind:
            return False
        return self.name is None or (doc.get("metadata") or {}).get("name") == self.name


def parse(text: str) -> Override:
    """Parse one `--set` argument; ValueError saying what is wrong with it."""
    lhs, eq, raw = text.partition("=")
    if not eq or not lhs:
        raise ValueError(f"--set {text!r}: expected [Kind[/name]:]path=value")
    kind = name = None
    head, colon, rest = lhs.partition(":")
    if colon:
        match = _SELECTOR.match(head)
        if match is None:
            raise ValueError(f"--set {text!r}: {head!r} is not a selector: use FineTuneJob:, EvalJob:, "
                             "FineTuneJob/<name>: or EvalJob/<name>:")
        kind, name, lhs = match["kind"], match["name"], rest
    path = _path(lhs, text)
    if raw == "":
        value: Any = ""
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {text!r}: the value is not valid YAML ({exc.__class__.__name__})") from None
    return Override(text, kind, name, path, value, remove=value is None)


def _path(dotted: str, text: str) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    for segment in re.split(r"(?<!\\)\.", dotted):
        match = _SEGMENT.match(segment)
        if match is None:
            raise ValueError(f"--set {text!r}: {segment!r} is not a key or key[index]")
        parts.append(match["key"].replace("\\.", "."))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", match["indexes"])]
    if parts[0] not in ROOTS or len(parts) < 2:
        raise ValueError(f"--set {text!r}: the path must start with spec. or metadata.")
    return tuple(parts)


def apply(overrides: list[Override], docs: list[dict[str, Any]]) -> dict[int, list[Override]]:
    """Apply `overrides` in order to the kubetune.io documents among `docs` (in place); returns, by the
    index of each changed document, the overrides applied to it. ValueError when a selector matches no
    document or a path cannot be set."""
    applied: dict[int, list[Override]] = {}
    for override in overrides:
        matched = False
        for i, doc in enumerate(docs):
            if not str(doc.get("apiVersion", "")).startswith(f"{GROUP}/") or not override.selects(doc):
                continue
            matched = True
            _set(doc, override)
            applied.setdefault(i, []).append(override)
        if not matched:
            what = "/".join(p for p in (override.kind, override.name) if p) or "FineTuneJob or EvalJob"
            raise ValueError(f"--set {override.text!r}: no {what} in the files")
    return applied


def _set(doc: dict[str, Any], override: Override) -> None:
    node: Any = doc
    where = ""  # the path of `node`
    path = override.path
    for i, part in enumerate(path):
        if isinstance(part, int) and not isinstance(node, list):
            raise ValueError(f"--set {override.text!r}: {where} is not a list")  # noqa: TRY004  (bad input)
        if isinstance(part, str) and not isinstance(node, dict):
            raise ValueError(f"--set {override.text!r}: {where} is not a mapping")  # noqa: TRY004
        present = part < len(node) if isinstance(part, int) else part in node
        if i == len(path) - 1:
            if override.remove:
                if present:
                    del node[part]
            elif isinstance(part, int) and not present and part != len(node):
                raise ValueError(f"--set {override.text!r}: index {part} is past the end of {where} "
                                 f"(a list of {len(node)})")
            elif isinstance(part, int) and not present:
                node.append(override.value)
            else:
                node[part] = override.value
            return
        if not present or node[part] is None:
            if override.remove:
                return  # nothing to remove
            child: Any = [] if isinstance(path[i + 1], int) else {}
            if isinstance(part, int):
                if part != len(node):
                    raise ValueError(f"--set {override.text!r}: index {part} is past the end of {where} "
                                     f"(a list of {len(node)})")
                node.append(child)
            else:
                node[part] = child
        node = node[part]
        where += f"[{part}]" if isinstance(part, int) else ("." if where else "") + part
