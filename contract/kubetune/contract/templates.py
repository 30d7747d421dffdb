"""Prompt templates filled with a row's fields: the one function the trainer and the evaluator share.

A template is a format string whose placeholders are field names: `'<START_Q>{ref}<END_Q>'`, with `{{` and
`}}` for literal braces. The API checks its syntax when a job is applied (`kubetune.api.common.
template_fields`, and the CRD's CEL rule); filling it is the same everywhere:

- every placeholder is a plain field name, never an index or an attribute: `{0}` is the field named `0`
  (a csv column or a jsonl key "0"), as it is when training, so a template valid for the trainer is valid
  for the evaluator;
- a field the row lacks is a `MissingFields` error naming the fields and the template's placeholders,
  never the row's values (the caller adds the file and row number).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence

from kubetune.api.common import template_fields
from kubetune.contract.redact import identifier


class MissingFields(ValueError):
    """Fields a template uses that a row lacks. `str()` is the message, e.g.

    `missing field 'mr' (template placeholders: ref, mr)`.
    """

    def __init__(self, missing: Sequence[str], placeholders: Sequence[str]) -> None:
        super().__init__(*missing)
        self.missing = list(missing)
        self.placeholders = list(placeholders)

    @property
    def names(self) -> str:
        """`'mr'` or `'ref', 'mr'`: the missing fields, quoted and escaped."""
        return ", ".join(identifier(f) for f in self.missing)

    def __str__(self) -> str:
        s = "s" if len(self.missing) > 1 else ""
        # Names the API checked ([A-Za-z0-9_-]): shown plain, as the template writes them (capped).
        shown = ", ".join(p if len(p) <= 64 else f"{p[:64]}…" for p in self.placeholders)
        return f"missing field{s} {self.names} (template placeholders: {shown})"


@functools.lru_cache(maxsize=256)
def _pieces(fmt: str) -> tuple[tuple[str, str | None], ...]:
    """(literal text, field name or None) pieces of a template; ValueError on a malformed one."""
    template_fields(fmt)  # the API's own syntax check: placeholders are field names, no spec or conversion
    return tuple((literal, name or None) for literal, name, _spec, _conv in string.Formatter().parse(fmt))


def placeholders(*templates: str) -> list[str]:
    """The distinct field names the templates use, in order of first use."""
    names: list[str] = []
    for fmt in templates:
        for _literal, name in _pieces(fmt):
            if name is not None and name not in names:
                names.append(name)
    return names


def fill_templates(templates: Sequence[str], fields: Mapping[str, str]) -> list[str]:
    """Each template with its placeholders replaced by the row's fields.

    Raises `MissingFields` (every field any of the templates needs and the row lacks) before filling any,
    and ValueError for a template the API would have refused.
    """
    used = placeholders(*templates)
    missing = [name for name in used if name not in fields]
    if missing:
        raise MissingFields(missing, used)
    return ["".join(literal + (fields[name] if name is not None else "") for literal, name in _pieces(fmt))
            for fmt in templates]


def fill_template(fmt: str, fields: Mapping[str, str]) -> str:
    """One template filled with a row's fields (see `fill_templates`)."""
    return fill_templates((fmt,), fields)[0]
