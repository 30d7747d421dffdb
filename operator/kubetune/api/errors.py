"""Turn pydantic validation errors into one line that names the field, as a user writes it."""

from __future__ import annotations

from pydantic import ValidationError


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
        parts.append(f"{field_path(tuple(error['loc'])) or '(root)'}: {message}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
