#!/usr/bin/env python3
"""Build kubetune's images from the Dockerfile without Docker: buildah, as root, on a machine with no registry.

Docker Hub, GHCR and NVIDIA's registry are out of reach here, so the Dockerfile's base images are
replaced by stand-ins made with ``mmdebstrap`` and passed as build arguments; the Dockerfile itself is
the one upstream builds use (with its default bases)::

    operator  FROM ${PYTHON_IMAGE}  (python:3.11.x-slim-bookworm)  <- Debian bookworm minbase + python3
                                                                      (3.11) + a `python` symlink

Usage::

    python scripts/build_image.py base            # the stand-in base, made when missing
    python scripts/build_image.py operator        # base when missing, then the `operator` target
    python scripts/build_image.py operator --if-changed   # skip when the image was built from this source
    python scripts/build_image.py runtime-layers  # resolve the runtime target's Python layers (no build)

The `runtime` target cannot be built here: its bases are NVIDIA's CUDA images, its build stage installs
CPython with `uv python install` (downloads from GitHub) and compiles DeepSpeed's CUDA ops with nvcc.
`runtime-layers` checks what can be checked without them: the runtime-build stage's own `uv pip install`
commands (read from the Dockerfile, with its constraints.txt rewrite run as written) resolve together on
PyPI for linux/x86-64 and the stage's Python version, with the CUDA torch wheel, using the uv version
the Dockerfile copies (UV_IMAGE).

Every buildah call runs with ``STORAGE_DRIVER=vfs`` (no overlay mounts needed) and ``--isolation chroot
--network host``. Package downloads inside RUN steps go through TLS interception here: the host's CA
directory is mounted read-only at the same path into every RUN step (``--ca-dir``, default
/etc/ssl/certs); nothing of it is committed into the image.

The image is labelled with a digest of its build context (the Dockerfile and the files .dockerignore
admits), so ``--if-changed`` (what the image tests use) rebuilds only after the source changed.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VERSION: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DIGEST_LABEL = "io.kubetune.source-digest"
BASE_LABEL = "io.kubetune.stand-in"
DEFAULT_CA_DIR = "/etc/ssl/certs"


@dataclass(frozen=True)
class StandIn:
    """A Debian-family root filesystem made by mmdebstrap, standing in for a registry image."""

    name: str
    suite: str
    mirror: str
    packages: tuple[str, ...]
    stands_in_for: str
    python_symlink: bool = True

    def spec(self) -> str:
        """What the image is made from: a change rebuilds it."""
        return json.dumps([self.suite, self.mirror, sorted(self.packages), self.python_symlink])


# python:3.11-slim is Debian bookworm with CPython 3.11 in /usr/local and `python` on PATH; bookworm's own
# python3 is 3.11 too. python3-venv brings ensurepip (the Dockerfile makes a venv), ca-certificates the
# system store that Debian's pip reads.
BOOKWORM_PYTHON = StandIn(
    name="localhost/kubetune-base:bookworm-python3.11",
    suite="bookworm",
    mirror="http://deb.debian.org/debian",
    packages=("python3", "python3-venv", "python3-pip", "ca-certificates"),
    stands_in_for="python:3.11-slim-bookworm",
)



@dataclass(frozen=True)
class Target:
    """A Dockerfile target, the local name of its image, and the stand-ins for its base-image arguments."""

    name: str
    image: str
    bases: dict[str, StandIn]


TARGETS = {
    "operator": Target("operator", f"localhost/kubetune/kubetune-operator:{VERSION}",
                       {"PYTHON_IMAGE": BOOKWORM_PYTHON}),
}


def buildah_env() -> dict[str, str]:
    return {**os.environ, "STORAGE_DRIVER": os.environ.get("STORAGE_DRIVER", "vfs")}


def buildah(*args: str, capture: bool = True, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["buildah", *args], env=buildah_env(), text=True, check=check,
                          capture_output=capture)


def inspect(image: str) -> dict[str, Any] | None:
    """`buildah inspect` of a local image, or None when there is no such image in local storage."""
    found = buildah("inspect", "--type", "image", image, check=False)
    return dict(json.loads(found.stdout)) if found.returncode == 0 else None


def image_labels(image: str) -> dict[str, str] | None:
    """The image's labels, or None when there is no such image in local storage."""
    found = inspect(image)
    return None if found is None else dict(found.get("OCIv1", {}).get("config", {}).get("Labels") or {})


def check_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install {' '.join(missing)} (as root)")
    if os.geteuid() != 0:
        sys.exit("buildah with --isolation chroot and mmdebstrap need root here")


def ensure_base(stand_in: StandIn, *, force: bool = False) -> str:
    """Make the stand-in base image unless one made from the same spec exists; returns its name."""
    labels = image_labels(stand_in.name)
    if labels is not None and labels.get(BASE_LABEL) == stand_in.spec() and not force:
        return stand_in.name
    check_tools("buildah", "mmdebstrap")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kubetune-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        subprocess.run(["mmdebstrap", "--variant=minbase", "--quiet", f"--include={','.join(stand_in.packages)}",
                        stand_in.suite, str(rootfs), stand_in.mirror], check=True)
        container = buildah("from", "scratch").stdout.strip()
        try:
            mount = Path(buildah("mount", container).stdout.strip())
            subprocess.run(["tar", "-C", str(mount), "--numeric-owner", "-xpf", str(rootfs)], check=True)
            if stand_in.python_symlink and not (mount / "usr/bin/python").exists():
                (mount / "usr/bin/python").symlink_to("python3")  # the slim image has `python`
            buildah("umount", container)
            buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--env", "LANG=C.UTF-8", "--cmd", "python3",
                    "--label", f"{BASE_LABEL}={stand_in.spec()}",
                    "--label", f"io.kubetune.stands-in-for={stand_in.stands_in_for}", container)
            buildah("commit", "--rm", container, stand_in.name)
        except BaseException:
            buildah("rm", container, check=False)
            raise
    print(f"base {stand_in.name} (standing in for {stand_in.stands_in_for}) made in "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return stand_in.name


def context_files() -> list[Path]:
    """The files .dockerignore admits into the build context (an allow-list: `*` then `!path` rules)."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    allowed = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    excluded = [rule for rule in rules if not rule.startswith("!") and rule != "*"]
    files: list[Path] = []
    for entry in allowed:
        path = ROOT / entry
        for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            relative = file.relative_to(ROOT).as_posix()
            if not any(fnmatch.fnmatch(relative, rule) or fnmatch.fnmatch(relative, rule.removeprefix("**/"))
                       or any(fnmatch.fnmatch(part, rule.removeprefix("**/")) for part in relative.split("/"))
                       for rule in excluded):
                files.append(file)
    return files


def source_digest(extra: str = "") -> str:
    """sha256 over the Dockerfile, the build context and `extra` (the target and its build arguments)."""
    digest = hashlib.sha256(extra.encode())
    for file in [ROOT / "Dockerfile", *context_files()]:
        digest.update(file.relative_to(ROOT).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def image_size(image: str) -> str:
    """The image's uncompressed size as buildah reports it, e.g. '394 MB'."""
    listed = json.loads(buildah("images", "--json", image).stdout)
    return str(listed[0]["size"]) if listed else "?"


def build(target: str, *, tag: str | None = None, ca_dir: str = DEFAULT_CA_DIR, if_changed: bool = False) -> str:
    """Build the Dockerfile's `target` on its stand-in bases; returns the image name."""
    spec = TARGETS[target]
    image = tag or spec.image
    check_tools("buildah")
    build_args = {name: ensure_base(stand_in) for name, stand_in in spec.bases.items()}
    base_ids = [(inspect(base) or {}).get("FromImageID", "") for base in build_args.values()]
    digest = source_digest(json.dumps([target, build_args, base_ids], sort_keys=True))
    labels = image_labels(image)
    if if_changed and labels is not None and labels.get(DIGEST_LABEL) == digest:
        print(f"{image} is up to date (built from this source)", flush=True)
        return image
    previous = (inspect(image) or {}).get("FromImageID")
    # No layer cache (with vfs every cached layer is a full copy of the root filesystem): --no-cache, which
    # lets --force-rm remove the stage containers of a failed build too.
    command = ["bud", "--isolation", "chroot", "--network", "host", "--no-cache", "--force-rm",
               "--target", target, "--tag", image,
               "--label", f"{DIGEST_LABEL}={digest}", "--file", str(ROOT / "Dockerfile")]
    for name, value in build_args.items():
        command += ["--build-arg", f"{name}={value}"]
    if ca_dir:
        command += ["--volume", f"{ca_dir}:{ca_dir}:ro"]
    started = time.monotonic()
    buildah(*command, str(ROOT), capture=False)
    seconds = time.monotonic() - started
    if previous and previous != (inspect(image) or {}).get("FromImageID"):
        buildah("rmi", previous, check=False)  # the image this one replaced, now untagged (vfs: a full copy)
    print(f"built {image} (target {target}) in {seconds:.0f} s; {image_size(image)}", flush=True)
    return image


def dockerfile_stage(name: str) -> list[str]:
    """The stage's instructions, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    start = next(i for i, line in enumerate(lines) if re.fullmatch(rf"(?i)FROM\s+\S+\s+AS\s+{re.escape(name)}", line))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].upper().startswith("FROM ")), len(lines))
    return lines[start + 1:end]


def resolve_runtime_layers(workdir: Path) -> dict[str, str]:
    """Resolve the runtime-build stage's `uv pip install` commands together, as the stage would for
    linux/x86-64, with the stage's constraint rewrite run as written; returns {name: version} and leaves
    the resolution in `workdir`/runtime-requirements.txt."""
    stage = dockerfile_stage("runtime-build")
    runs = [line[4:] for line in stage if line.upper().startswith("RUN ")]
    python_version = next(line.split("=", 1)[1] for line in stage if line.startswith("ARG PYTHON_VERSION="))
    # The rewrite of constraints.txt (CUDA torch instead of +cpu, vLLM's own pins): its /tmp/ is workdir.
    (prepare,) = [run for run in runs if "constraints.txt" in run and "uv pip install" not in run]
    subprocess.run(["sh", "-c", prepare.replace("/tmp/", f"{workdir}/")], cwd=ROOT, check=True)
    requirements: list[str] = []
    options: list[str] = []
    for run in (run for run in runs if "uv pip install" in run):
        words = shlex.split(run.split("uv pip install", 1)[1].replace("/tmp/", f"{workdir}/"))
        no_isolation = "--no-build-isolation" in words
        while words:
            word = words.pop(0)
            if word in ("--constraint", "-c", "--override"):
                options += [word, words.pop(0)]
            elif word.startswith("-"):
                continue
            else:
                if word.startswith(".["):
                    word = f"kubetune{word[1:]} @ {ROOT.as_uri()}"
                requirements.append(word)
                if no_isolation:  # built against the torch already installed: the venv running this has one
                    options += ["--no-build-isolation-package", re.split(r"[=<>\[ ]", word)[0]]
    (workdir / "runtime-requirements.in").write_text("\n".join(requirements) + "\n")
    out = workdir / "runtime-requirements.txt"
    uv = shutil.which("uv", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if uv is None:
        sys.exit("uv is not installed (it is in the dev extra)")
    subprocess.run([uv, "pip", "compile", "--quiet", str(workdir / "runtime-requirements.in"), *options,
                    "--python-version", python_version, "--python-platform", "x86_64-manylinux_2_28",
                    "--python", sys.executable, "--no-header", "--no-annotate", "--output-file", str(out)],
                   check=True)
    return dict(re.findall(r"(?m)^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("target", choices=["base", *TARGETS, "runtime-layers"])
    parser.add_argument("--tag", help="image name (default: localhost/kubetune/kubetune-<target>:<version>)")
    parser.add_argument("--ca-dir", default=DEFAULT_CA_DIR if Path(DEFAULT_CA_DIR).is_dir() else "",
                        help="host CA directory mounted read-only into RUN steps ('' for none)")
    parser.add_argument("--if-changed", action="store_true",
                        help="do nothing when the image was built from the current source")
    parser.add_argument("--rebuild-base", action="store_true", help="make the stand-in base again")
    args = parser.parse_args(argv)
    if args.target == "base" or args.rebuild_base:
        ensure_base(BOOKWORM_PYTHON, force=args.rebuild_base)
    if args.target == "runtime-layers":
        workdir = ROOT / "build" / "runtime-layers"
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        resolved = resolve_runtime_layers(workdir)
        key = ("torch", "vllm", "ray", "deepspeed", "transformers", "numpy")
        print(f"{len(resolved)} packages resolved in {time.monotonic() - started:.0f} s "
              f"({workdir / 'runtime-requirements.txt'}): "
              + ", ".join(f"{name} {resolved.get(name, '-')}" for name in key))
    elif args.target != "base":
        print(build(args.target, tag=args.tag, ca_dir=args.ca_dir, if_changed=args.if_changed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
