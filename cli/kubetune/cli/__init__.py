"""The `kubetune` command line: `kubetune crds` (generate CRDs), `kubetune validate`, `kubetune run` (local)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from kubetune.api import crd
from kubetune.api.common import GROUP
from kubetune.api.errors import describe_validation_error
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob


def _cmd_crds(args: argparse.Namespace) -> int:
    for path in crd.write_all(Path(args.output)):
        print(f"wrote {path}")
    return 0


def load_manifests(path: Path, skipped: list[str] | None = None) -> list[FineTuneJob | EvalJob]:
    """Parse every kubetune document of a YAML file; raises ValueError naming the document and field.

    Documents of other API groups (a Secret, an Argo CD Application next to the jobs) are left out and
    listed in `skipped` as "Kind/name"; an unknown kind in the kubetune.io group is an error.
    """
    parsed: list[FineTuneJob | EvalJob] = []
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    for index, doc in enumerate(documents):
        if not doc:
            continue
        if not isinstance(doc, dict):
            raise ValueError(  # noqa: TRY004  (callers report ValueErrors as bad input)
                f"{path} document {index + 1}: expected a mapping, got {type(doc).__name__}")
        kind = str(doc.get("kind"))
        if not str(doc.get("apiVersion", "")).startswith(f"{GROUP}/"):
            if skipped is not None:
                skipped.append(f"{kind}/{(doc.get('metadata') or {}).get('name', '?')}")
            continue
        try:
            if kind == "FineTuneJob":
                parsed.append(FineTuneJob.from_body(doc))
            elif kind == "EvalJob":
                parsed.append(EvalJob.from_body(doc))
            else:
                raise ValueError(f"{path} document {index + 1}: unsupported kind {kind!r}")
        except ValidationError as exc:
            name = (doc.get("metadata") or {}).get("name", "?")
            raise ValueError(f"{path} {kind}/{name}: {describe_validation_error(exc)}") from None
    return parsed


def _cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for file in args.files:
        skipped: list[str] = []
        try:
            for obj in load_manifests(Path(file), skipped):
                print(f"{file}: {obj.kind}/{obj.metadata.name} is valid")
            for other in skipped:
                print(f"{file}: {other} skipped (not a kubetune.io kind)")
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


def _cmd_run(args: argparse.Namespace) -> int:
    jobs: list[FineTuneJob] = []
    evals: list[EvalJob] = []
    for file in args.files:
        try:
            manifests = load_manifests(Path(file))
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for obj in manifests:
            if isinstance(obj, FineTuneJob):
                jobs.append(obj)
            else:
                evals.append(obj)
    output = Path(args.output)
    try:  # before anything runs: a refused output should not cost a training run first
        check_outputs(jobs, evals, output, args.allow_outside_output)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("crds", help="write the CRDs generated from the API models")
    p.add_argument("--output", default="crds", help="directory to write into (default: crds)")
    p.set_defaults(func=_cmd_crds)
    p = sub.add_parser("validate", help="validate FineTuneJob/EvalJob YAML files with the API models")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("run", help="run FineTuneJobs and EvalJobs on local Ray with the same trainer, "
                                   "serving and evaluator (no cluster)")
    p.add_argument("files", nargs="+", help="YAML files with FineTuneJobs and EvalJobs (FineTuneJobs run first)")
    p.add_argument("--output", default="runs",
                   help="outputs go to a local spec.output.uri under OUTPUT, else to OUTPUT/<name>/ (default: runs)")
    p.add_argument("--allow-outside-output", action="store_true",
                   help="let a local spec.output.uri outside OUTPUT be written (refused by default)")
    p.add_argument("--workers", type=int, help="local Ray Train workers (default: 2 on CPU, one per GPU)")
    p.set_defaults(func=_cmd_run)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
