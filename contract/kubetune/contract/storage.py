"""Where data, models and outputs live: storage URIs shared by the trainer, the evaluator and serving.

- `resolve_uri` turns pvc://, file://, s3://, gs://, ... URIs (model directories and data files) into local
  paths; remote objects are copied once into a cache directory with fsspec.
- `storage_options` gives fsspec the options of an object store (an S3 endpoint such as MinIO).
- `local_output` says where a local run (`kubetune run`) writes an output URI: only under its `--output`.
- `upload_files` writes local files into the folder a URI names, `download_file` copies one object here
  (`kubetune data prepare`, `kubetune report`): never cached, each file complete or absent.

Imports fsspec only when a remote URI is resolved: the operator reads this module's names without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

# URIs that name a local path (a mounted claim, a file): everything else is an object store.
LOCAL_SCHEMES = ("pvc://", "file://")


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for an object store: S3's endpoint from the standard $AWS_ENDPOINT_URL(_S3) (MinIO,
    a local moto); credentials and region come from the usual environment/instance chain."""
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"endpoint_url": endpoint} if endpoint else {}
    return {}


PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
# Written into a cached copy/conversion once it is complete; a directory without it is a leftover.
COMPLETE_MARKER = ".kubetune-complete"


# --------------------------------------------------------------------------------------------- URIs

def resolve_uri(uri: str, cache_dir: Path) -> Path:
    """A local path for `uri` (a model directory or a data file).

    - `pvc://claim/path` -> `$KUBETUNE_PVC_ROOT/claim/path` (the operator mounts each claim there;
      default /mnt/pvc);
    - `file:///abs/path`, `/abs/path`, `relative/path` -> that path;
    - anything else fsspec knows (`s3://`, `gs://`, `az://`, `hf://`, `memory://`, ...) -> copied once into
      `cache_dir/remote/<protocol>/<host>/<path>` (a file or a whole directory tree) and that copy returned.
      A copy is complete or absent: it is written next to its final place and renamed, under a file lock,
      so concurrent workers sharing `cache_dir` copy it once.

    Raises ImportError naming the uri when fsspec needs a package that is not installed (s3fs, gcsfs,
    adlfs), ValueError for an unknown protocol or a malformed uri, FileNotFoundError when the remote
    object does not exist.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "" or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):  # plain (or Windows drive) path
        return Path(uri)
    if scheme == "file":
        host = parts.netloc
        if host not in ("", "localhost"):
            raise ValueError(f"{uri}: file:// URIs must name a local path (file:///abs/path)")
        return Path(unquote(parts.path))
    if scheme == "pvc":
        claim, rel = parts.netloc, unquote(parts.path).lstrip("/")
        if not claim:
            raise ValueError(f"{uri}: expected pvc://<claim>/<path>")
        _check_relative(uri, rel)
        root = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))
        return root / claim / rel if rel else root / claim
    return _fetch_remote(uri, scheme, Path(cache_dir))


class OutputOutsideRoot(ValueError):
    """A local run's output path that resolves outside the directory it may write to."""


def local_output(uri: str, root: Path, *, allow_outside: bool = False, field: str = "spec.output.uri") -> Path | None:
    """Where a local run writes the output `uri`: for a local one (a path, relative to the working directory,
    or file://) that path, resolved (`..` and symlinks followed), else None (an object store or pvc://: the
    caller writes to a folder of its own under `root`).

    The resolved path must be `root` or under it (`root` resolved too): anything else raises
    OutputOutsideRoot naming `field`, unless `allow_outside`.
    """
    if "://" in uri and not uri.startswith(LOCAL_SCHEMES[1]):
        return None
    try:
        path = resolve_uri(uri, root).resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # file://host/..., a symlink loop (RuntimeError < 3.13)
        raise OutputOutsideRoot(f"{field}: {exc}") from None
    base = root.resolve()
    if not allow_outside and not path.is_relative_to(base):
        raise OutputOutsideRoot(f"{field} {uri!r} resolves to {path}, outside the output directory {base}: "
                                "a local run writes only under --output (move it there, choose another "
                                "--output, or pass --allow-outside-output)")
    return path


def _check_relative(uri: str, rel: str) -> None:
    if any(part == ".." for part in rel.split("/")):
        raise ValueError(f"{uri}: '..' is not allowed in the path")


def _fetch_remote(uri: str, scheme: str, cache_dir: Path) -> Path:
    import fsspec  # type: ignore[import-untyped]

    try:
        fs, rpath = fsspec.core.url_to_fs(uri)
    except ImportError as e:
        raise ImportError(f"cannot read {uri}: the fsspec implementation for {scheme}:// is not installed "
                          f"({e})") from e
    except ValueError as e:
        raise ValueError(f"cannot read {uri}: {e}") from e
    parts = urlsplit(uri)
    rel = "/".join(p for p in (parts.netloc + "/" + unquote(parts.path)).split("/") if p)
    _check_relative(uri, rel)
    dest = cache_dir / "remote" / scheme / (rel or "_root")
    marker = dest.parent / f".{dest.name}{COMPLETE_MARKER}"
    if marker.exists() and dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.parent / f".{dest.name}.lock"):
        if marker.exists() and dest.exists():  # another process finished while we waited
            return dest
        if not fs.exists(rpath):
            raise FileNotFoundError(f"{uri} does not exist")
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        try:
            if fs.isdir(rpath):
                root = rpath.rstrip("/")
                sources = [f for f in fs.find(root) if f.rstrip("/") != root]
                targets = [str(tmp / f[len(root):].lstrip("/")) for f in sources]
                for t in targets:
                    _check_relative(uri, os.path.relpath(t, tmp).replace(os.sep, "/"))
                    Path(t).parent.mkdir(parents=True, exist_ok=True)
                tmp.mkdir(parents=True, exist_ok=True)
                if sources:
                    fs.get(sources, targets)
            else:
                fs.get_file(rpath, str(tmp))
            if dest.exists():  # a leftover without a marker
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            os.replace(tmp, dest)
            marker.touch()
        finally:
            if tmp.exists():
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        log.info("copied %s to %s in %.1fs", uri, dest, time.monotonic() - started)
    return dest


# --------------------------------------------------------------------------------------------- copies


class StorageError(OSError):
    """A URI that cannot be written or read here; the message names the URI and what to do."""


class TargetExists(StorageError):
    """A file `upload_files` would replace, without `overwrite`."""


def join_uri(uri: str, name: str) -> str:
    """`uri` (a folder) + `/name`."""
    return f"{uri.rstrip('/')}/{name}"


def _local_target(uri: str) -> Path | None:
    """The local path of a local or pvc:// URI (None for an object store). A pvc:// claim must be mounted
    here, at $KUBETUNE_PVC_ROOT/<claim> (default /mnt/pvc/<claim>), as the operator mounts it in pods."""
    if "://" in uri and not uri.startswith(LOCAL_SCHEMES):
        return None
    try:
        path = resolve_uri(uri, Path("."))
    except ValueError as exc:  # file://host/x, pvc:// without a claim, '..' in a claim path
        raise StorageError(str(exc)) from None
    if uri.startswith("pvc://"):
        claim = urlsplit(uri).netloc
        mount = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / claim
        if not mount.is_dir():
            raise StorageError(f"{uri}: PersistentVolumeClaim {claim!r} is not mounted at {mount}: run this in "
                               f"a pod that mounts the claim there (or set {PVC_ROOT_ENV} to where it is mounted)")
    return path


def _filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) of an object-store URI, with `storage_options`."""
    import fsspec

    scheme = urlsplit(uri).scheme
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    except ImportError as exc:
        package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
        hint = f" (pip install {package[scheme]})" if scheme in package else ""
        raise StorageError(f"{uri}: the fsspec implementation for {scheme}:// is not installed{hint}") from exc
    except ValueError as exc:
        raise StorageError(f"{uri}: {exc}") from exc
    return fs, str(path)


def upload_files(files: list[Path], uri: str, *, overwrite: bool = False) -> list[str]:
    """Copy local `files` into the folder `uri` names, each under its own name, in order; returns their
    URIs. `uri`: a local path, file://, pvc://claim/path (the claim mounted here) or an object store
    (s3://bucket/prefix; the bucket must exist). Raises StorageError, before writing anything, when a target
    exists (unless `overwrite`), and when the store refuses or cannot be reached."""
    local = _local_target(uri)
    names = [f.name for f in files]
    if local is not None:
        existing = [n for n in names if (local / n).exists()]
        if existing and not overwrite:
            raise TargetExists(f"{uri}: {', '.join(existing)} already exist(s) (pass --overwrite to replace)")
        try:
            local.mkdir(parents=True, exist_ok=True)
            for f in files:
                tmp = local / f".{f.name}.tmp-{uuid.uuid4().hex[:8]}"
                shutil.copyfile(f, tmp)
                os.replace(tmp, local / f.name)
        except OSError as exc:
            raise StorageError(f"{uri}: {exc.strerror or exc}") from exc
        return [join_uri(uri, n) for n in names]
    fs, root = _filesystem(uri)
    targets = [join_uri(root, n) for n in names]
    try:
        existing = [n for n, t in zip(names, targets, strict=True) if fs.exists(t)]
        if existing and not overwrite:
            raise TargetExists(f"{uri}: {', '.join(existing)} already exist(s) (pass --overwrite to replace)")
        for f, target in zip(files, targets, strict=True):
            fs.put_file(str(f), target)  # an object appears whole when its upload completes
    except StorageError:
        raise
    except Exception as exc:  # fsspec backends raise their own types: botocore's, aiohttp's
        raise StorageError(f"{uri}: {type(exc).__name__}: {exc}") from exc
    return [join_uri(uri, n) for n in names]


def download_file(uri: str, dest: Path) -> Path:
    """Copy the one file `uri` names to `dest` (replaced whole, never cached); returns `dest`. Raises
    FileNotFoundError when it does not exist, StorageError when it cannot be read from here."""
    local = _local_target(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if local is not None:
            if not local.is_file():
                raise FileNotFoundError(f"{uri} does not exist")
            shutil.copyfile(local, tmp)
        else:
            fs, path = _filesystem(uri)
            try:
                if not fs.isfile(path):
                    raise FileNotFoundError(f"{uri} does not exist")
                fs.get_file(path, str(tmp))
            except (FileNotFoundError, StorageError):
                raise
            except Exception as exc:  # as in upload_files
                raise StorageError(f"{uri}: {type(exc).__name__}: {exc}") from exc
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (processes on one node sharing a cache directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
