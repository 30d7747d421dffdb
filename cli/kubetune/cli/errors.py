"""The `kubetune` command's exit codes and the error every command raises to end with one.

Every error goes to stderr as one `error: ...` line; the exit code says what kind of failure it was:

| code | meaning |
| ---- | ------- |
| 0    | success |
| 1    | the command ran and the result is a failure: `validate` found an invalid manifest; `run`: a job failed or an EvalJob's gate did not pass |
| 2    | usage: bad arguments, an unreadable or invalid manifest (`run`), a bad `--set`, a refused `--output`, a missing `--source`, files already at `--to` |
| 3    | the data was refused: `run`'s pre-flight or evaluation plan, `data prepare`'s source rows |
| 4    | not found or not there yet: no such job, no RayJob, pod or report yet |
| 5    | unavailable: the Kubernetes API or a storage URI refused the request or could not be reached |
| 130  | interrupted (Ctrl-C) |
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """Exit codes of `kubetune` (the table above; also in `kubetune --help` and docs/reference.md)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    DATA = 3
    NOT_FOUND = 4
    UNAVAILABLE = 5
    INTERRUPTED = 130


EPILOG = """\
exit codes:
  0    success
  1    the result is a failure: validate found an invalid manifest; run: a job failed or a gate did not pass
  2    usage: bad arguments, an invalid manifest for run, a bad --set, a refused --output, a missing
       --source, files already at --to
  3    the data was refused: run's pre-flight or evaluation plan, data prepare's source rows
  4    not found or not there yet: no such job, no RayJob, pod or report yet
  5    unavailable: the Kubernetes API or a storage URI refused the request or could not be reached
  130  interrupted
Errors are written to stderr as 'error: ...' lines."""


class CliError(Exception):
    """Ends the command: `message` printed to stderr as `error: message`, exit with `code`."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
