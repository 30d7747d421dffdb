"""The tracking clients (MLflow, W&B, TensorBoard's writer) ship in the runtime image and never in the
operator's: checked from pyproject.toml's extras, the Dockerfile's install lines and constraints.txt."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS: dict[str, list[str]] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
CLIENTS = {"mlflow-skinny", "wandb", "tensorboardx"}
TRACKING_PACKAGES = CLIENTS | {"mlflow", "tensorboard"}


def pulled(extra: str) -> set[str]:
    """Distribution names an extra lists, kubetune[...] self-references followed."""
    names: set[str] = set()
    for raw in EXTRAS[extra]:
        req = Requirement(raw)
        if canonicalize_name(req.name) == "kubetune":
            for inner in req.extras:
                names |= pulled(inner)
        else:
            names.add(canonicalize_name(req.name))
    return names


def test_the_operator_extra_pulls_in_no_tracking_library() -> None:
    assert not pulled("operator") & TRACKING_PACKAGES


def test_the_trainer_and_so_the_runtime_image_get_the_tracking_clients() -> None:
    assert CLIENTS <= pulled("trainer") and CLIENTS <= pulled("serving")
    assert '".[trainer,serving]"' in (ROOT / "Dockerfile").read_text()


def test_the_tracking_clients_are_pinned_and_the_pins_satisfy_the_extra() -> None:
    pins = {canonicalize_name(n): v for n, v in
            re.findall(r"(?m)^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text())}
    for raw in EXTRAS["tracking"]:
        req = Requirement(raw)
        assert Version(pins[canonicalize_name(req.name)]) in req.specifier, raw
