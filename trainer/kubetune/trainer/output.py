"""A run's output as a filesystem: a local directory (a path, a mounted pvc://) or an object store prefix.

The driver writes its own files there (metrics.jsonl, result.json, ...); the workers write the epoch
checkpoints (Ray Train) and the best epoch's consolidated model (`best/`) there themselves, so a large
model never passes through the driver. No Ray here: the GPU check and plain scripts use it too.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kubetune.contract.storage import LOCAL_SCHEMES, storage_options
from kubetune.trainer.config import TrainConfig

CHECKPOINTS = "checkpoints"  # Ray Train's run name: <output>/checkpoints/epoch-NNNN
BEST = "best"  # the best epoch's consolidated Hugging Face checkpoint: <output>/best


class RemoteOutput:
    """An object-store output (s3://bucket/prefix, gs://, ...).

    Ray Train writes the checkpoints there itself (`storage_filesystem`) and the workers write `best/`;
    the driver's own files (metrics.jsonl, result.json, learning_curve.png, driver.log) are written to the
    staging dir (`cfg.output_dir`) and uploaded.
    """

    def __init__(self, uri: str) -> None:
        import fsspec  # type: ignore[import-untyped]

        self.uri = uri.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.uri, **storage_options(self.uri))
        self.root = root.rstrip("/")

    @classmethod
    def of(cls, cfg: TrainConfig) -> RemoteOutput | None:
        uri = cfg.output_uri
        if "://" not in uri or uri.startswith(LOCAL_SCHEMES):
            return None
        return cls(uri)

    def pyarrow_filesystem(self) -> Any:
        """What Ray Train's `RunConfig(storage_filesystem=...)` takes: the same fsspec filesystem."""
        import pyarrow.fs  # type: ignore[import-untyped]

        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def checkpoint_uri(self, storage_path: str) -> str:
        """`bucket/prefix/checkpoints/epoch-0003` (Ray's view) -> `s3://bucket/prefix/checkpoints/epoch-0003`."""
        return f"{self.uri}/{CHECKPOINTS}/{PurePosixPath(storage_path).name}"

    def upload(self, local: Path, name: str) -> None:
        """A file, or a directory tree (replacing what was there), to `<uri>/<name>`."""
        if not local.exists():
            return
        if local.is_dir():
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                self.fs.put_file(str(file), self.path(f"{name}/{file.relative_to(local).as_posix()}"))
        else:
            self.fs.put_file(str(local), self.path(name))

    def download(self, name: str, local: Path) -> bool:
        """`<uri>/<name>` (a file or a directory tree) to `local`; False when it is not there."""
        self.fs.invalidate_cache()
        remote = self.path(name)
        if self.fs.isfile(remote):
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(local))
            return True
        files = self.fs.find(remote)
        for file in files:
            target = local / PurePosixPath(file).relative_to(remote)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(file, str(target))
        return bool(files)


def local_filesystem() -> Any:
    import fsspec

    return fsspec.filesystem("file")


def output_filesystem(cfg: TrainConfig) -> tuple[Any, str]:
    """(fsspec filesystem, root path in it) of the run's output: the store for an object-store output,
    else the local output directory."""
    remote = RemoteOutput.of(cfg)
    if remote is not None:
        remote.fs.invalidate_cache()
        return remote.fs, remote.root
    return local_filesystem(), str(cfg.output_dir)


def location(uri_or_path: str) -> tuple[Any, str]:
    """(filesystem, path) of a checkpoint location: a local path, or a URI in an object store."""
    if "://" not in uri_or_path or uri_or_path.startswith("file://"):
        return local_filesystem(), uri_or_path.removeprefix("file://")
    import fsspec

    store, path = fsspec.core.url_to_fs(uri_or_path, **storage_options(uri_or_path))
    return store, path
