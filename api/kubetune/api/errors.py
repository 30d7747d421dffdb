"""Turn pydantic validation errors into one line that names the field, as a user writes it."""

from __future__ import annotations

from pydantic import ValidationError


class FieldError(ValueError):
    """A model validator's error about one nested field: `path` is relative to the validated model.

    pydantic locates a model validator's error at the model itself; this carries the field's path so
    the message names it ("spec.gate.candidate: ..." rather than "spec: gate.candidate ...").
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def field_path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    """('spec', 'baseModel', 'name') -> 'spec.baseModel.name'; list indexes as [i]."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "model-")):
            continue  # pydantic's internal validator steps
        else:
            out += ("." if out else "") + str(part)
    return out


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """'spec.hyperparameters.epochs: Input should be greater than or equal to 1; ...'."""
    parts = []
    for error in exc.errors()[:limit]:
        message = error["msg"].removeprefix("Value error, ")
        where = field_path(tuple(error["loc"]))
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            where = f"{where}.{cause.path}" if where and not cause.path.startswith("[") else where + cause.path
        parts.append(f"{where or '(root)'}: {message}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
