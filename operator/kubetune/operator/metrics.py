"""Prometheus metrics of the operator, served on /metrics."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune.api import evaljob, finetunejob

PHASES: tuple[str, ...] = tuple(p.value for p in finetunejob.Phase)
EVAL_PHASES: tuple[str, ...] = tuple(p.value for p in evaljob.Phase)


class _JobsByPhase(Collector):
    """`kubetune_finetunejobs{phase}` (or `kubetune_evaljobs`) computed at scrape time from a job cache."""

    def __init__(self, phases: Callable[[], Iterable[str | None]], name: str = "kubetune_finetunejobs",
                 what: str = "FineTuneJobs", known: tuple[str, ...] = PHASES) -> None:
        self._phases = phases
        self._name, self._what, self._known = name, what, known

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tally = Tally(p or "Pending" for p in self._phases())
        family = GaugeMetricFamily(self._name, f"{self._what} by phase.", labels=["phase"])
        for phase in self._known:
            family.add_metric([phase], tally.get(phase, 0))
        yield family


class Metrics:
    """All operator metrics on one registry (one per process; tests make their own)."""

    def __init__(self, phases: Callable[[], Iterable[str | None]],
                 eval_phases: Callable[[], Iterable[str | None]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_JobsByPhase(phases))
        if eval_phases is not None:
            self.registry.register(_JobsByPhase(eval_phases, "kubetune_evaljobs", "EvalJobs", EVAL_PHASES))
        self.reconcile_seconds = Histogram(
            "kubetune_reconcile_duration_seconds", "Time spent in one handler call.", ["handler"],
            registry=self.registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.api_requests = Counter("kubetune_api_requests_total", "Kubernetes API requests made.",
                                    ["verb"], registry=self.registry)
        self.api_errors = Counter("kubetune_api_errors_total", "Kubernetes API error answers.",
                                  ["verb", "code"], registry=self.registry)
        self.transitions = Counter("kubetune_finetunejob_transitions_total", "Phase transitions.",
                                   ["phase"], registry=self.registry)

    def api_request(self, verb: str, _seconds: float) -> None:
        self.api_requests.labels(verb=verb).inc()

    def api_error(self, verb: str, code: int) -> None:
        self.api_errors.labels(verb=verb, code=str(code)).inc()

    def transition(self, phase: str) -> None:
        self.transitions.labels(phase=phase).inc()

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics on a background thread."""
        return start_http_server(port, addr=addr, registry=self.registry)
