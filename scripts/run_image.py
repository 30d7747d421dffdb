#!/usr/bin/env python3
"""Run a local OCI image as a container runtime would, without one: buildah for the root filesystem,
util-linux `unshare` for the namespaces. Root only (what `buildah` with vfs storage needs here).

The image's own configuration decides what runs and as whom: ``User``, ``Env``, ``Entrypoint``,
``Cmd`` and ``WorkingDir`` from ``buildah inspect``. Like a Kubernetes pod under the restricted Pod
Security Standard (the chart's operator pod), the process gets:

* its own mount and PID namespaces (the entrypoint is PID 1, as in a pod), the host's network
  (it reaches services on 127.0.0.1, and its ports are the host's);
* a read-only root filesystem, a fresh /proc, a minimal /dev, a tmpfs per ``tmpfs`` path (the
  chart's /tmp emptyDir), files bound read-only (the ``binds``: a kubeconfig, as a Secret would be);
* no capabilities (bounding set emptied, the user switched away from 0), no supplementary groups,
  and ``no_new_privs`` (allowPrivilegeEscalation: false).

Usage::

    python scripts/run_image.py IMAGE [--env K=V] [--bind HOST:PATH] [-- ARG...]

or, from Python, ``with Container(image) as c: c.popen([...])``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def buildah(*args: str) -> str:
    env = {**os.environ, "STORAGE_DRIVER": os.environ.get("STORAGE_DRIVER", "vfs")}
    return subprocess.run(["buildah", *args], env=env, check=True, capture_output=True, text=True).stdout.strip()


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about running it (the OCI image config)."""

    user: str
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    workdir: str
    labels: dict[str, str]
    exposed_ports: list[str]

    @classmethod
    def of(cls, image: str) -> ImageConfig:
        config = json.loads(buildah("inspect", "--type", "image", image))["OCIv1"].get("config", {})
        env = dict(item.split("=", 1) for item in config.get("Env") or [])
        return cls(user=config.get("User") or "0", env=env, entrypoint=list(config.get("Entrypoint") or []),
                   cmd=list(config.get("Cmd") or []), workdir=config.get("WorkingDir") or "/",
                   labels=dict(config.get("Labels") or {}), exposed_ports=sorted(config.get("ExposedPorts") or {}))


def _rows(table: Path) -> list[list[str]]:
    return [line.split(":") for line in table.read_text().splitlines() if line] if table.exists() else []


def resolve_user(rootfs: Path, user: str) -> tuple[int, int, str]:
    """(uid, gid, home) of an image's `User` ("uid", "uid:gid", "name" or "name:group"), read from the
    image's own /etc/passwd and /etc/group as a runtime does."""
    name, _, group = user.partition(":")
    column = 2 if name.isdigit() else 0
    entry = next((row for row in _rows(rootfs / "etc/passwd") if len(row) > 5 and row[column] == name), None)
    if entry is None and not name.isdigit():
        raise ValueError(f"user {name!r} is not in the image's /etc/passwd")
    uid = int(name) if name.isdigit() else int(entry[2])  # type: ignore[index]
    if not group:
        gid = int(entry[3]) if entry else 0
    elif group.isdigit():
        gid = int(group)
    else:
        found = next((row for row in _rows(rootfs / "etc/group") if len(row) > 2 and row[0] == group), None)
        if found is None:
            raise ValueError(f"group {group!r} is not in the image's /etc/group")
        gid = int(found[2])
    return uid, gid, (entry[5] if entry else "/")


@dataclass
class Container:
    """A working container of `image` (buildah from + mount); processes start with `popen`/`run`."""

    image: str
    name: str = field(default_factory=lambda: f"kubetune-run-{secrets.token_hex(4)}")
    rootfs: Path = Path("/nonexistent")
    config: ImageConfig | None = None

    def __enter__(self) -> Self:
        self.config = ImageConfig.of(self.image)
        buildah("from", "--pull-never", "--name", self.name, self.image)
        try:
            self.rootfs = Path(buildah("mount", self.name))
        except BaseException:
            buildah("rm", self.name)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["buildah", "umount", self.name], capture_output=True, check=False,
                       env={**os.environ, "STORAGE_DRIVER": os.environ.get("STORAGE_DRIVER", "vfs")})
        buildah("rm", self.name)

    def spec(self, args: list[str] | None = None, *, command: list[str] | None = None,
             env: dict[str, str] | None = None, binds: dict[str, str] | None = None,
             tmpfs: tuple[str, ...] = ("/tmp",), read_only: bool = True, user: str | None = None) -> dict[str, Any]:
        """What `inside` does: argv = `command` or the image's entrypoint + (`args` or its cmd)."""
        assert self.config is not None, "use the container as a context manager"
        uid, gid, home = resolve_user(self.rootfs, user or self.config.user)
        argv = command if command is not None else self.config.entrypoint + (
            args if args is not None else self.config.cmd)
        full_env = {"HOME": home, "HOSTNAME": self.name, **self.config.env, **(env or {})}
        return {"rootfs": str(self.rootfs), "argv": argv, "env": full_env, "uid": uid, "gid": gid,
                "cwd": self.config.workdir, "binds": binds or {}, "tmpfs": list(tmpfs), "read_only": read_only}

    def popen(self, args: list[str] | None = None, **options: Any) -> subprocess.Popen[bytes]:
        """Start a process in the container; stdout/stderr and other Popen options pass through."""
        popen_options = {k: options.pop(k) for k in ("stdout", "stderr", "stdin") if k in options}
        spec = self.spec(args, **options)
        return subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
             sys.executable, str(Path(__file__).resolve()), "--inside", json.dumps(spec)],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, **popen_options)

    def run(self, args: list[str] | None = None, *, timeout: float = 120, **options: Any) -> subprocess.CompletedProcess[str]:
        """Run a process to its end; its output as text."""
        process = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options)
        out, err = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, out.decode(), err.decode())


def in_root(root: Path, path: str) -> Path:
    """`path` inside the container's root filesystem, symlinks resolved against that root (an image's
    /var/run -> /run must not lead to the host's /run)."""
    resolved = root
    parts = [p for p in path.split("/") if p and p != "."]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            resolved = resolved.parent if resolved != root else root
            continue
        candidate = resolved / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks in {path}")
            target = str(candidate.readlink())
            parts = [p for p in target.split("/") if p and p != "."] + parts
            resolved = root if target.startswith("/") else resolved
            continue
        resolved = candidate
    return resolved


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def inside(spec: dict[str, Any]) -> None:
    """In the new mount and PID namespaces, as root: set up the root filesystem, become the image's
    user without capabilities, and exec the entrypoint (it becomes PID 1)."""
    root = Path(spec["rootfs"])
    binds = {host: str(in_root(root, target)) for host, target in
             [*spec["binds"].items(), ("/etc/hosts", "/etc/hosts"), ("/etc/resolv.conf", "/etc/resolv.conf")]}
    for target in binds.values():  # mount points, made in the working container before it turns read-only
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).touch(exist_ok=True)
    tmpfs = [in_root(root, path) for path in spec["tmpfs"]]
    for path in tmpfs:
        path.mkdir(parents=True, exist_ok=True)
    dev = in_root(root, "/dev")
    _mount("--bind", str(root), str(root))
    if spec["read_only"]:
        _mount("-o", "remount,bind,ro", str(root))
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", str(in_root(root, "/proc")))
    _mount("-t", "tmpfs", "-o", "nosuid,mode=0755,size=64k", "dev", str(dev))
    for device in DEVICES:
        (dev / device).touch()
        _mount("--bind", f"/dev/{device}", str(dev / device))
    for link, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
        (dev / link).symlink_to(to)
    _mount("-o", "remount,ro,bind", str(dev))
    for path in tmpfs:
        _mount("-t", "tmpfs", "-o", "nosuid,nodev,mode=1777,size=64m", "tmpfs", str(path))
    for host, target in binds.items():
        _mount("--bind", host, target)
        _mount("-o", "remount,bind,ro", target)
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    libc = ctypes.CDLL(None, use_errno=True)
    os.chroot(root)
    os.chdir(spec["cwd"])
    for cap in range(last_cap + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {cap}")
    os.setgroups([])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])  # from 0 to non-zero: permitted/effective caps go
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    os.execvpe(spec["argv"][0], spec["argv"], spec["env"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    parser.add_argument("image", nargs="?")
    parser.add_argument("--env", "-e", action="append", default=[], help="K=V added to the image's Env")
    parser.add_argument("--bind", action="append", default=[], help="HOST:PATH bound read-only")
    parser.add_argument("args", nargs="*", help="arguments to the entrypoint (default: the image's Cmd)")
    options = parser.parse_args(argv)
    if options.inside:
        inside(json.loads(options.inside))
        return 1  # not reached: exec
    if not options.image:
        parser.error("IMAGE is required")
    env = dict(item.split("=", 1) for item in options.env)
    binds = dict(item.split(":", 1) for item in options.bind)
    with Container(options.image) as container:
        process = container.popen(options.args or None, env=env, binds=binds)
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.terminate()
            return process.wait()


if __name__ == "__main__":
    sys.exit(main())
