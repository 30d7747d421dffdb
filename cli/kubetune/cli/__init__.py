"""The `kubetune` command line: validate and run FineTuneJobs/EvalJobs locally, prepare the examples' data,
read a cluster job's logs and report, generate the CRDs."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.api import crd
from kubetune.api.common import GROUP
from kubetune.api.errors import describe_validation_error
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob
from kubetune.cli import overrides as ovr
from kubetune.cli.errors import EPILOG, CliError, Exit


def _cmd_crds(args: argparse.Namespace) -> int:
    try:
        written = crd.write_all(Path(args.output))
    except OSError as exc:
        raise CliError(Exit.USAGE, f"--output {args.output}: {exc.strerror or exc}") from None
    for path in written:
        print(f"wrote {path}")
    return Exit.OK


def read_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a file; ValueError naming the file (and document) when it is not YAML
    or a document is not a mapping."""
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    out = []
    for index, doc in enumerate(documents):
        if not doc:
            continue
        if not isinstance(doc, dict):
            raise ValueError(  # noqa: TRY004  (callers report ValueErrors as bad input)
                f"{path} document {index + 1}: expected a mapping, got {type(doc).__name__}")
        out.append(doc)
    return out


def load_manifests(path: Path, skipped: list[str] | None = None,
                   documents: list[dict[str, Any]] | None = None,
                   changed: dict[int, list[ovr.Override]] | None = None) -> list[FineTuneJob | EvalJob]:
    """Parse every kubetune document of a YAML file (or its `documents`, already read and changed by
    --set overrides: `changed` maps a document's index to those applied to it); raises ValueError naming the
    document and field.

    Documents of other API groups (a Secret, an Argo CD Application next to the jobs) are left out and
    listed in `skipped` as "Kind/name"; an unknown kind in the kubetune.io group is an error.
    """
    parsed: list[FineTuneJob | EvalJob] = []
    for index, doc in enumerate(read_documents(path) if documents is None else documents):
        kind = str(doc.get("kind"))
        if not str(doc.get("apiVersion", "")).startswith(f"{GROUP}/"):
            if skipped is not None:
                skipped.append(f"{kind}/{(doc.get('metadata') or {}).get('name', '?')}")
            continue
        name = (doc.get("metadata") or {}).get("name", "?")
        try:
            if kind == "FineTuneJob":
                parsed.append(FineTuneJob.from_body(doc))
            elif kind == "EvalJob":
                parsed.append(EvalJob.from_body(doc))
            else:
                raise ValueError(f"{path} {kind}/{name}: unsupported kind {kind!r}")
        except ValidationError as exc:
            sets = (changed or {}).get(index)
            after = f" (after --set {', '.join(o.text for o in sets)})" if sets else ""
            raise ValueError(f"{path} {kind}/{name}: {describe_validation_error(exc)}{after}") from None
    return parsed


def apply_sets(sets: list[str], files: list[tuple[Path, list[dict[str, Any]]]]) -> list[dict[int, list[ovr.Override]]]:
    """Apply the `--set` overrides to the documents of all `files` (in place, in order); returns, per file,
    the overrides applied to each changed document (by index). ValueError for a bad --set."""
    applied = ovr.apply([ovr.parse(text) for text in sets], [doc for _, docs in files for doc in docs])
    out, offset = [], 0
    for _, docs in files:
        out.append({i - offset: o for i, o in applied.items() if offset <= i < offset + len(docs)})
        offset += len(docs)
    return out


def _cmd_validate(args: argparse.Namespace) -> int:
    status = Exit.OK
    read = []
    for file in args.files:
        try:
            read.append((Path(file), read_documents(Path(file))))
        except (ValueError, OSError) as exc:
            _error(str(exc))
            status = Exit.FAILED
    try:
        changed = apply_sets(args.set, read)
    except ValueError as exc:
        raise CliError(Exit.USAGE, str(exc)) from None
    for (path, docs), sets in zip(read, changed, strict=True):
        skipped: list[str] = []
        try:
            for obj in load_manifests(path, skipped, docs, sets):
                print(f"{path}: {obj.kind}/{obj.metadata.name} is valid")
            for other in skipped:
                print(f"{path}: {other} skipped (not a kubetune.io kind)")
        except ValueError as exc:
            _error(str(exc))
            status = Exit.FAILED
    return status


def _cmd_run(args: argparse.Namespace) -> int:
    jobs: list[FineTuneJob] = []
    evals: list[EvalJob] = []
    try:
        read = [(Path(file), read_documents(Path(file))) for file in args.files]
        changed = apply_sets(args.set, read)
        manifests = [obj for (path, docs), sets in zip(read, changed, strict=True)
                     for obj in load_manifests(path, None, docs, sets)]
    except (ValueError, OSError) as exc:
        raise CliError(Exit.USAGE, str(exc)) from None
    for obj in manifests:
        if isinstance(obj, FineTuneJob):
            jobs.append(obj)
        else:
            evals.append(obj)
    output = Path(args.output)
    try:  # before anything runs: a refused output should not cost a training run first
        check_outputs(jobs, evals, output, args.allow_outside_output)
    except ValueError as exc:
        raise CliError(Exit.USAGE, str(exc)) from None
    # Imported here: the operator image installs neither the trainer's nor serving's dependencies.
    from kubetune.trainer.local import run_local

    trained: dict[str, FineTuneJob] = {}
    status = int(run_local(jobs, output, workers=args.workers, trained=trained,
                           allow_outside=args.allow_outside_output)) if jobs else 0
    evals += _evaluations_of(jobs, trained)
    if status or not evals:
        return status
    from kubetune.serving.local import run_eval_local

    return int(run_eval_local(evals, trained, output, allow_outside=args.allow_outside_output))


def check_outputs(jobs: list[FineTuneJob], evals: list[EvalJob], root: Path, allow_outside: bool) -> None:
    """Every local `spec.output.uri` of the run (the EvalJobs a FineTuneJob's spec.evaluation will create
    included) resolves under `root`, unless `allow_outside`: else ValueError naming the job and field."""
    from kubetune.contract.storage import OutputOutsideRoot, local_output

    outputs = [(f"FineTuneJob/{j.metadata.name}", "spec.output.uri", j.spec.output.uri) for j in jobs]
    outputs += [(f"FineTuneJob/{j.metadata.name}", "spec.evaluation.output.uri",
                 # evalplan.evaljob_for's default: the job's own output + /eval
                 j.spec.evaluation.output.uri if j.spec.evaluation.output else j.spec.output.uri.rstrip("/") + "/eval")
                for j in jobs if j.spec.evaluation is not None]
    outputs += [(f"EvalJob/{e.metadata.name}", "spec.output.uri", e.spec.output.uri) for e in evals]
    for what, field, uri in outputs:
        try:
            local_output(uri, root, allow_outside=allow_outside, field=field)
        except OutputOutsideRoot as exc:
            raise ValueError(f"{what}: {exc}") from None


def _evaluations_of(jobs: list[FineTuneJob], trained: dict[str, FineTuneJob]) -> list[EvalJob]:
    """The EvalJobs FineTuneJob.spec.evaluation asks for, as the operator would create them."""
    from kubetune.contract.evalplan import evaljob_for

    out = []
    for job in jobs:
        if job.spec.evaluation is not None and job.metadata.name in trained:
            # run_local has replaced a fineTuneJobRef with the earlier job's best checkpoint (a uri).
            base = job.spec.base_model.name or job.spec.base_model.uri or ""
            out.append(EvalJob.from_body(evaljob_for(job, base)))
    return out


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from kubetune.cli.data import prepare_and_upload

    return prepare_and_upload(args)


def _cmd_logs(args: argparse.Namespace) -> int:
    from kubetune.cli import cluster

    kube = cluster.Cluster(args.kubeconfig, args.context, args.namespace)
    cluster.logs(kube, args.job, follow=args.follow, head=args.head, tail=args.tail,
                 write=cluster.stdout_write, note=_note)
    return Exit.OK


def _cmd_report(args: argparse.Namespace) -> int:
    from kubetune.cli.report import report

    print(report(args, note=_note))
    return Exit.OK


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def version() -> str:
    """The installed package's version (its metadata), e.g. `0.1.0`."""
    try:
        return metadata.version("kubetune")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, else the "
                                        "pod's service account)")


SET_HELP = ("change a resource before validation: [Kind[/name]:]path=value, e.g. spec.hyperparameters.epochs=2 "
            "or 'FineTuneJob/viggo:spec.resources.workers=2' (value read as YAML; null removes the field; "
            "without Kind: every FineTuneJob and EvalJob of the files); repeatable")


def parser() -> argparse.ArgumentParser:
    """The `kubetune` argument parser."""
    top = argparse.ArgumentParser(prog="kubetune", description=__doc__, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"kubetune {version()}")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("crds", help="write the CRDs generated from the API models")
    p.add_argument("--output", default="crds", help="directory to write into (default: crds)")
    p.set_defaults(func=_cmd_crds)
    p = sub.add_parser("validate", help="validate FineTuneJob/EvalJob YAML files with the API models")
    p.add_argument("files", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="[KIND[/NAME]:]PATH=VALUE", help=SET_HELP)
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("run", help="run FineTuneJobs and EvalJobs on local Ray with the same trainer, "
                                   "serving and evaluator (no cluster)")
    p.add_argument("files", nargs="+", help="YAML files with FineTuneJobs and EvalJobs (FineTuneJobs run first)")
    p.add_argument("--set", action="append", default=[], metavar="[KIND[/NAME]:]PATH=VALUE", help=SET_HELP)
    p.add_argument("--output", default="runs",
                   help="outputs go to a local spec.output.uri under OUTPUT, else to OUTPUT/<name>/ (default: runs)")
    p.add_argument("--allow-outside-output", action="store_true",
                   help="let a local spec.output.uri outside OUTPUT be written (refused by default)")
    p.add_argument("--workers", type=int, help="local Ray Train workers (default: 1 using every core on CPU, one "
                   "per GPU)")
    p.set_defaults(func=_cmd_run)

    data = sub.add_parser("data", help="prepare the examples' data").add_subparsers(dest="data_command",
                                                                                      required=True)
    p = data.add_parser("prepare", help="convert a task's public files into train/valid/test JSON lines and "
                                        "upload them", description=DATA_PREPARE_DOC,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=("viggo", "gsm8k", "sql"))
    p.add_argument("--source", required=True, help="folder with the public files (sql: or one file)")
    p.add_argument("--to", required=True, help="where the files go: s3://bucket/prefix, gs://bucket/prefix, "
                                               "pvc://claim/path (mounted here) or a local folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    p.add_argument("--valid-share", type=float, help="share of rows held out for validation (gsm8k, sql; "
                                                     "default 0.05)")
    p.add_argument("--test-share", type=float, help="share held out for test (gsm8k, sql: of all rows, default "
                                                    "0.1; viggo: of valid.csv, default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace files already at --to")
    p.set_defaults(func=_cmd_data_prepare)

    p = sub.add_parser("logs", help="print the driver's log of a FineTuneJob or EvalJob in the cluster",
                       description="The log of KubeRay's submitter pod, which prints the Ray driver's output "
                                   "(the Ray head pod's with --head, or when there is no submitter pod). "
                                   "Progress notes go to stderr, the log to stdout.")
    p.add_argument("job", help="NAME, finetunejob/NAME or evaljob/NAME")
    p.add_argument("-f", "--follow", action="store_true",
                   help="wait for the pod to start, then stream its log until it ends")
    p.add_argument("--head", action="store_true", help="the Ray head pod's log instead of the submitter's")
    p.add_argument("--tail", type=int, help="only the last TAIL lines")
    _cluster_options(p)
    p.set_defaults(func=_cmd_logs)

    p = sub.add_parser("report", help="fetch an EvalJob's report.html and print its local path",
                       description="TARGET: an EvalJob in the cluster (NAME or evaljob/NAME; finetunejob/NAME "
                                   "for the EvalJob its spec.evaluation created), an output URI "
                                   "(s3://bucket/eval), or a local output folder of `kubetune run` (any other "
                                   "path with a '/', e.g. runs/viggo-eval or ./out).")
    p.add_argument("target")
    p.add_argument("--to", default="reports",
                   help="folder to download into: TO/<namespace>/<name>/report.html (default: reports)")
    _cluster_options(p)
    p.set_defaults(func=_cmd_report)
    return top


DATA_PREPARE_DOC = """Convert a task's public files into the JSON lines the examples read, split them, and upload them:
  viggo  ViGGO's train.csv and valid.csv -> {ref, mr}: train.csv is train; valid.csv is split by meaning
         representation into valid and test (ViGGO's own test split is not read)
  gsm8k  GSM8K's train.jsonl -> {question, answer}: split by question into train, valid and test
  sql    sql-create-context rows (*.json array or *.jsonl; Spider rows with db_id too) -> {question, context,
         answer[, db_id]}: whole databases (db_id, else the CREATE TABLE context) held out for valid and test
Writes train.jsonl, valid.jsonl, test.jsonl and manifest.json (sources' sha256, seed, counts) under --to.
The split is deterministic for a given source and --seed."""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        _error(exc.message)
        return int(exc.code)
    except KeyboardInterrupt:
        _error("interrupted")
        return int(Exit.INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
