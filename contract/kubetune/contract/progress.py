"""The progress path: how the training driver's metrics reach `FineTuneJob.status` while it runs.

The driver (the Ray job's entrypoint, on the head pod) patches the FineTuneJob's status subresource
with a JSON merge patch, through the namespace's `kubetune-trainer` ServiceAccount. The operator creates
that ServiceAccount and a Role that may only read FineTuneJobs, patch their status and post Events.

Ownership of status fields is split so that neither writer clobbers the other:
  the driver writes   `progress`, `preflight`, `epochs`, `bestCheckpoint`, `baseValPerplexity`;
  the operator writes `conditions`, `phase`, `observedGeneration`, `children`, times, retries.

Stdlib only (the trainer image does not need the kubernetes client and never imports kopf); a local
run's progress bar imports tqdm when it is asked for.
Reporting is best effort: a failed report is logged and training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubetune.api.common import API_VERSION, now_rfc3339
from kubetune.api.finetunejob import PLURAL, BestCheckpoint, EpochResult, PreflightSummary, Progress
from kubetune.contract.redact import excerpt

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class Reporter(Protocol):
    """Where training progress goes: FineTuneJob status in a cluster, the console locally."""

    def progress(self, progress: Progress) -> None: ...

    def epoch_done(self, epochs: list[EpochResult], best: BestCheckpoint | None,
                   base_val_perplexity: float | None = None) -> None: ...


class Bar(Protocol):
    """The part of a tqdm bar ConsoleReporter uses (tqdm.tqdm, or Ray's tqdm_ray.tqdm in a Ray worker)."""

    def update(self, n: int = 1) -> Any: ...

    def set_description(self, desc: str) -> Any: ...

    def close(self) -> Any: ...


BarFactory = Callable[[int, int], Bar]  # (total steps, steps done) -> a bar


def tqdm_bar(total: int, initial: int) -> Bar:
    """A tqdm bar on this process's terminal."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    bar: Bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    return bar


def progress_line(progress: Progress) -> str:
    """`epoch 1/3  step 12/60, train loss 1.2345, lr 2.00e-04, grad norm 1.234, 95 tok/s, eta 3m05s`."""
    return f"epoch {progress.epoch}/{progress.total_epochs}  step {progress.step}/{progress.total_steps}" + \
        progress_metrics(progress)


def progress_metrics(progress: Progress) -> str:
    """The metrics of a progress line (`, train loss ..., eta ...`); the fields not known are left out."""
    parts = []
    if progress.train_loss is not None:
        parts.append(f"train loss {progress.train_loss:.4f}")
    if progress.learning_rate is not None:
        parts.append(f"lr {progress.learning_rate:.2e}")
    if progress.grad_norm is not None:
        parts.append(f"grad norm {progress.grad_norm:.3g}")
    if progress.tokens_per_second is not None:
        parts.append(f"{progress.tokens_per_second:.0f} tok/s")
    if progress.eta_seconds:
        parts.append(f"eta {progress.eta_seconds // 60}m{progress.eta_seconds % 60:02d}s")
    return "".join(f", {p}" for p in parts)


@dataclass
class ConsoleReporter:
    """Local runs: a progress line per report on stdout (Ray forwards workers' stdout to the driver), or,
    given a `bar` factory (the driver's stdout is a terminal), one tqdm bar of the optimizer steps whose
    description holds the metrics."""

    bar: BarFactory | None = None
    _bar: Bar | None = field(default=None, init=False, repr=False)
    _step: int = field(default=0, init=False, repr=False)

    def progress(self, progress: Progress) -> None:
        if self.bar is None:
            # sys.stdout, not print: Ray Train patches print() in workers to also log it, which doubles lines.
            sys.stdout.write(progress_line(progress) + "\n")
            sys.stdout.flush()
            return
        if self._bar is None:
            self._bar = self.bar(progress.total_steps, progress.step)
            self._step = progress.step
        self._bar.set_description(f"epoch {progress.epoch}/{progress.total_epochs}{progress_metrics(progress)}")
        if progress.step > self._step:
            self._bar.update(progress.step - self._step)
            self._step = progress.step

    def epoch_done(self, epochs: list[EpochResult], best: BestCheckpoint | None,
                   base_val_perplexity: float | None = None) -> None:
        """Epoch lines are printed by the driver's table."""

    def close(self) -> None:
        """End the bar (if there is one)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclass
class StatusReporter:
    """Patches `finetunejobs/<name>/status` over HTTPS with the pod's service-account token."""

    server: str
    namespace: str
    name: str
    token: str | None = None  # a fixed bearer token (tests); in a pod, token_file is read instead
    token_file: Path | None = None  # read on every request: projected ServiceAccount tokens rotate
    ca_file: str | None = None
    timeout: float = 10.0
    plural: str = PLURAL  # finetunejobs; the evaluator reports to evaljobs
    failures: int = field(default=0, init=False)

    @classmethod
    def from_environment(cls, plural: str = PLURAL) -> StatusReporter | None:
        """In a Ray pod created by the operator; None where the environment has no job to report to.

        The object is named by $KUBETUNE_FINETUNEJOB (training) or $KUBETUNE_EVALJOB (evaluation).
        """
        name = os.environ.get("KUBETUNE_EVALJOB" if plural == "evaljobs" else "KUBETUNE_FINETUNEJOB")
        namespace = os.environ.get("KUBETUNE_NAMESPACE")
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if not (name and namespace and host):
            return None
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token_file = SA_DIR / "token"
        return cls(
            server=f"https://{host}:{port}",
            namespace=namespace,
            name=name,
            token_file=token_file if token_file.exists() else None,
            ca_file=str(SA_DIR / "ca.crt") if (SA_DIR / "ca.crt").exists() else None,
            plural=plural,
        )

    @property
    def url(self) -> str:
        return f"{self.server}/apis/{API_VERSION}/namespaces/{self.namespace}/{self.plural}/{self.name}/status"

    def progress(self, progress: Progress) -> None:
        progress.update_time = progress.update_time or now_rfc3339()
        self.patch({"progress": progress.to_wire()})

    def preflight(self, summary: PreflightSummary) -> None:
        """What pre-flight found in the data (rows read, used, truncated, dropped), before training starts."""
        self.patch({"preflight": summary.to_wire()})

    def epoch_done(self, epochs: list[EpochResult], best: BestCheckpoint | None,
                   base_val_perplexity: float | None = None) -> None:
        status: dict[str, Any] = {"epochs": [e.to_wire() for e in epochs]}
        if best is not None:
            status["bestCheckpoint"] = best.to_wire()
        if base_val_perplexity is not None:
            status["baseValPerplexity"] = base_val_perplexity
        self.patch(status)

    def bearer(self) -> str | None:
        """The token for this request: the kubelet rotates a projected token file (about hourly, and the
        old token expires), so a long training run reads it again each time instead of keeping the first."""
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip() or None
            except OSError:
                return None
        return self.token

    def patch(self, status: dict[str, Any]) -> bool:
        """One merge patch of the status subresource; False (and a warning) if it did not land."""
        request = urllib.request.Request(
            self.url,
            data=json.dumps({"status": status}).encode(),
            method="PATCH",
            headers={"Content-Type": "application/merge-patch+json", "Accept": "application/json",
                     **({"Authorization": f"Bearer {token}"} if (token := self.bearer()) else {})},
        )
        context = ssl.create_default_context(cafile=self.ca_file) if self.url.startswith("https") else None
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=context) as response:
                response.read()
            return True
        except (urllib.error.URLError, OSError) as exc:
            self.failures += 1
            log.warning("could not report progress to %s %s/%s: %s", self.plural, self.namespace, self.name,
                        _failure(exc))
            return False


def _failure(exc: Exception) -> str:
    """Why a patch failed, for the log: the API's Status reason and a bounded, escaped excerpt of its
    message (an apiserver may quote the value it refused), never the response body as it came."""
    if not isinstance(exc, urllib.error.HTTPError):
        return excerpt(str(exc))
    try:
        body = json.loads(exc.read().decode(errors="replace") or "{}")
    except (ValueError, OSError):
        body = {}
    body = body if isinstance(body, dict) else {}
    reason, message = str(body.get("reason") or exc.reason), body.get("message")
    return f"HTTP {exc.code} {excerpt(reason, 64)}" + (f": {excerpt(str(message))}" if message else "")
