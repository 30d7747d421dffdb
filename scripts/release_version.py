#!/usr/bin/env python3
"""The version a release tag stands for, checked against everything that carries it.

A tag `v<version>` releases the wheel (pyproject.toml `version`), both images (tagged `<version>`) and
the chart (`version`, and `appVersion`, which is the image tag the chart deploys by default): all of
them must say the same `<version>`, literally, and it must be SemVer (Helm requires it), e.g. `0.2.0` or
`0.2.0-rc.1`. Standard library only: the release workflow runs it before installing anything.

Usage: ``python scripts/release_version.py v0.1.0 >> "$GITHUB_OUTPUT"`` prints ``version=0.1.0``; any
disagreement is printed to stderr and the exit status is 1.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")


def chart_field(chart_yaml: str, key: str) -> str:
    """A top-level scalar of Chart.yaml (`version: 0.1.0`, `appVersion: "0.1.0"`)."""
    match = re.search(rf"(?m)^{key}:\s*['\"]?([^'\"\s#]+)['\"]?\s*(#.*)?$", chart_yaml)
    if match is None:
        raise ValueError(f"Chart.yaml has no {key}")
    return match.group(1)


def versions(root: Path = ROOT) -> dict[str, str]:
    """Where the version is written -> what it says there."""
    chart = (root / "charts" / "kubetune" / "Chart.yaml").read_text()
    return {
        "pyproject.toml version": tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"],
        "Chart.yaml version": chart_field(chart, "version"),
        "Chart.yaml appVersion": chart_field(chart, "appVersion"),
    }


def problems(tag: str, root: Path = ROOT) -> list[str]:
    """What disagrees with `tag` (empty: the tag may be released)."""
    if not tag.startswith("v"):
        return [f"tag {tag!r} is not v<version>"]
    version = tag[1:]
    found = [] if SEMVER.fullmatch(version) else [f"tag {tag!r}: {version!r} is not SemVer (MAJOR.MINOR.PATCH)"]
    found += [f"{where} is {value!r}, the tag says {version!r}" for where, value in versions(root).items()
              if value != version]
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    found = problems(args[0])
    for problem in found:
        print(f"release {args[0]}: {problem}", file=sys.stderr)
    if found:
        return 1
    print(f"version={args[0][1:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
