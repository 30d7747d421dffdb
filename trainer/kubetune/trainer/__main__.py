"""`python -m kubetune.trainer --config FILE`: the RayJob's entrypoint (and what `kubetune run` calls)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from kubetune.api.errors import describe_validation_error
from kubetune.api.finetunejob import FineTuneJob

STAGING_ENV = "KUBETUNE_STAGING_DIR"  # where a remote output's files are staged (default /tmp/kubetune-staging)


def output_dir_of(uri: str) -> Path:
    """Where a run writes: a local path, a PersistentVolumeClaim mounted by the operator, or, for an object
    store (s3://bucket/prefix, gs://, ...), a local staging dir the driver uploads from (Ray Train writes
    the checkpoints to the store itself)."""
    from urllib.parse import urlsplit

    from kubetune.contract.storage import resolve_uri

    if "://" in uri and not uri.startswith(("pvc://", "file://")):
        parts = urlsplit(uri)
        rel = [p for p in f"{parts.netloc}/{parts.path}".split("/") if p]
        if not parts.netloc or ".." in rel:
            raise SystemExit(f"spec.output.uri: {uri!r}: expected <scheme>://<bucket>/<prefix>")
        return Path(os.environ.get(STAGING_ENV, "/tmp/kubetune-staging"), parts.scheme, *rel)
    return resolve_uri(uri, Path("/tmp"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer", description=__doc__)
    parser.add_argument("--config", required=True, help="FineTuneJob YAML (the operator mounts it)")
    parser.add_argument("--output", help="output directory (default: spec.output.uri)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (default: spec.resources.workers)")
    args = parser.parse_args(argv)
    try:
        job = FineTuneJob.from_body(yaml.safe_load(Path(args.config).read_text()))
    except ValidationError as exc:
        print(f"error: {args.config}: {describe_validation_error(exc)}", file=sys.stderr)
        return 2

    import ray

    from kubetune.trainer.config import from_finetunejob
    from kubetune.trainer.data import DataError
    from kubetune.trainer.driver import run

    cfg = from_finetunejob(job, Path(args.output) if args.output else output_dir_of(job.spec.output.uri),
                           workers=args.workers)
    ray.init()  # in a RayJob: the job's cluster (RAY_ADDRESS); elsewhere: a local one
    try:
        result = run(cfg)
    except DataError as exc:
        print(f"error: pre-flight: {exc}", file=sys.stderr)
        return 3
    if result.best:
        print(f"best checkpoint: {result.best.uri} (epoch {result.best.epoch}, "
              f"val perplexity {result.best.val_perplexity:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
