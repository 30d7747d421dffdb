"""`kubetune report TARGET`: an evaluation's report.html, fetched here; prints its local path.

TARGET is one of
- an EvalJob in the cluster: `NAME` or `evaljob/NAME` (`finetunejob/NAME`: the EvalJob its
  spec.evaluation created, controlled by it). Once its status says the report is written, it is read from
  the EvalJob's spec.output.uri (where the evaluator publishes it) into `--to/<namespace>/<name>/`;
- an output URI (`s3://bucket/eval`, `gs://`, `pvc://claim/path` mounted here, `file:///abs`): its
  report.html, into `--to/<last part of the URI>/`;
- a local output folder of `kubetune run` (any other path with a `/`: `runs/viggo-eval`, `./out`): its
  report.html, in place.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

from kubetune.cli.cluster import KINDS
from kubetune.cli.errors import CliError, Exit
from kubetune.contract.storage import StorageError, download_file, join_uri

REPORT = "report.html"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def is_cluster_target(target: str) -> bool:
    """NAME, or <kind>/NAME with a job kind kubetune knows (finetunejob, ftj, evaljob, evj, ...)."""
    if "://" in target:
        return False
    head, slash, _ = target.partition("/")
    return not slash or head.lower() in KINDS


def report(args: argparse.Namespace, note: Callable[[str], None]) -> Path:
    target: str = args.target
    if "://" in target:
        name = _SAFE.sub("-", target.rstrip("/").rsplit("/", 1)[-1]) or "report"
        return _fetch(join_uri(target, REPORT), Path(args.to) / name / REPORT)
    if not is_cluster_target(target):
        path = Path(target)
        found = path if path.is_file() else path / REPORT
        if not found.is_file():
            raise CliError(Exit.NOT_FOUND, f"no {REPORT} in {path}")
        return found.resolve()
    from kubetune.cli import cluster

    kube = cluster.Cluster(args.kubeconfig, args.context, args.namespace)
    job = cluster.evaljob_of(kube, target)
    uri = cluster.report_uri(job)
    note(f"{job}: {uri}")
    local_uri = "://" not in uri or uri.startswith("file://")
    try:
        return _fetch(uri, Path(args.to) / job.namespace / job.name / REPORT)
    except CliError as exc:
        if local_uri and exc.code == Exit.NOT_FOUND:
            raise CliError(Exit.NOT_FOUND, f"{exc.message}: spec.output.uri is a path inside the evaluator's pod, "
                                           "not readable from here") from None
        raise


def _fetch(uri: str, dest: Path) -> Path:
    try:
        return download_file(uri, dest).resolve()
    except FileNotFoundError:
        raise CliError(Exit.NOT_FOUND, f"{uri} does not exist") from None
    except StorageError as exc:
        raise CliError(Exit.UNAVAILABLE, str(exc)) from None
