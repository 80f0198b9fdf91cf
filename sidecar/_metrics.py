"""Prometheus metrics of the policy sidecar.

A :class:`SidecarMetrics` registers into the :class:`CollectorRegistry` it is given (a new
private one by default, so tests and several apps in one process never collide). The app serves
it at ``GET /metrics``; ``sidecar serve --metrics-port`` serves it on a port of its own too.

Label values are fixed sets (verdict, route family, operation name), never subjects, tool
names, parameters or capability ids, so the number of series stays bounded. The current signing
key id is read at each scrape, so a key rotated by SIGHUP shows at once; it is public (derived
from the public key).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Final, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import InfoMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Family", "SidecarMetrics"]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
"""Media type of the text exposition format."""

Family = Literal["project", "kernel", "sdk"]
"""The body a route got: the project's, the Chio kernel's, or chio-sdk-python's."""

FAMILIES: Final[tuple[Family, ...]] = ("project", "kernel", "sdk")
VERDICTS: Final = ("allow", "deny")
STATUSES: Final = ("UNKNOWN", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT", "GATE_FAILED")


class _KeyCollector(Collector):
    def __init__(self, key_id: Callable[[], str]) -> None:
        self._key_id = key_id

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("chio_sidecar_signing_key", "The key id receipts are signed with.")
        info.add_metric([], {"key_id": self._key_id()})
        yield info

    def describe(self) -> Iterator[Metric]:
        return iter(())


class SidecarMetrics:
    """Decisions, decision latency, outcome records signed, capabilities minted and revoked,
    store errors, key id."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "chio_sidecar_decisions",
            "Decisions signed, by verdict and by the body the route got.",
            ["verdict", "family"],
            registry=r,
        )
        self.decision_latency = Histogram(
            "chio_sidecar_decision_latency_seconds",
            "Time to decide, sign and log one decision.",
            ["family"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.minted = Counter(
            "chio_sidecar_capabilities_minted",
            "Capabilities minted (attenuated children included).",
            ["family"],
            registry=r,
        )
        self.revoked = Counter(
            "chio_sidecar_capabilities_revoked",
            "Capabilities revoked (the project's revoke, the kernel's release).",
            ["family"],
            registry=r,
        )
        self.outcomes = Counter(
            "chio_sidecar_outcomes",
            "Outcome records signed, by status.",
            ["status"],
            registry=r,
        )
        self.outcome_latency = Histogram(
            "chio_sidecar_outcome_latency_seconds",
            "Time to sign one outcome record.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.store_errors = Counter(
            "chio_sidecar_store_errors",
            "Requests refused because the store could not be used, by operation.",
            ["operation"],
            registry=r,
        )
        # Every series of a fixed label set exists from the start (rate() needs a zero).
        for family in FAMILIES:
            for verdict in VERDICTS:
                self.decisions.labels(verdict=verdict, family=family)
            self.decision_latency.labels(family=family)
            self.minted.labels(family=family)
        for family in ("project", "kernel"):
            self.revoked.labels(family=family)
        for status in STATUSES:
            self.outcomes.labels(status=status)
        self._key: _KeyCollector | None = None

    def watch_key(self, key_id: Callable[[], str]) -> None:
        """Report ``key_id()`` as the signing key at each scrape (the last one given wins)."""
        if self._key is None:
            self._key = _KeyCollector(key_id)
            self.registry.register(self._key)
        else:
            self._key._key_id = key_id

    def decision(self, family: Family, allowed: bool, started: float) -> None:
        """Count one decision that took since ``started`` (a :func:`time.perf_counter`)."""
        self.decision_latency.labels(family=family).observe(time.perf_counter() - started)
        self.decisions.labels(verdict="allow" if allowed else "deny", family=family).inc()

    def outcome(self, status: str, started: float) -> None:
        """Count one signed outcome record that took since ``started``."""
        self.outcome_latency.observe(time.perf_counter() - started)
        self.outcomes.labels(status=status if status in STATUSES else "UNKNOWN").inc()

    def exposition(self) -> bytes:
        """The registry in the text exposition format."""
        return generate_latest(self.registry)
