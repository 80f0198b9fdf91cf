"""Prometheus metrics of the policy sidecar.

A :class:`SidecarMetrics` registers into the :class:`CollectorRegistry` it is given (a new
private one by default, so tests and several apps in one process never collide). The app serves
it at ``GET /metrics``; ``sidecar serve --metrics-port`` serves it on a port of its own too.

Label values are fixed sets (verdict, guard name, route family, operation name, status),
never subjects, tool names, parameters, capability ids or credential names, so the number of
series stays bounded (guard names come from the code and the configured guards; beyond
:data:`MAX_GUARDS` distinct names the rest count as ``other``). The current signing key id and
the active policy hash are read at each scrape, so a key rotated by SIGHUP or a reloaded policy
shows at once; both are public.

Hooks for the parts that are not the app: :meth:`SidecarMetrics.policy_reloaded` (a policy
reload, ok or not) and :meth:`SidecarMetrics.store_error` (a store failure outside a request).
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

__all__ = ["CONTENT_TYPE", "MAX_GUARDS", "Family", "SidecarMetrics"]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
"""Media type of the text exposition format."""

Family = Literal["project", "kernel", "sdk"]
"""The body a route got: the project's, the Chio kernel's, or chio-sdk-python's."""

FAMILIES: Final[tuple[Family, ...]] = ("project", "kernel", "sdk")
VERDICTS: Final = ("allow", "deny", "pending")
"""Decision verdicts counted by name (anything else counts as ``other``)."""
NO_GUARD: Final = "none"
"""The guard label of an allow (no guard decided against it)."""
MAX_GUARDS: Final = 64
"""Distinct guard label values kept; further names count as ``other``."""
AUTH_STATUSES: Final = (401, 403)
STATUSES: Final = ("UNKNOWN", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT", "GATE_FAILED")


class _KeyCollector(Collector):
    def __init__(self, key_id: Callable[[], str]) -> None:
        self._key_id = key_id
        self._policy_hash: Callable[[], str] | None = None

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("chio_sidecar_signing_key", "The key id receipts are signed with.")
        info.add_metric([], {"key_id": self._key_id()})
        yield info
        if self._policy_hash is not None:
            policy = InfoMetricFamily(
                "chio_sidecar_policy", "The policy_hash of the receipts signed now."
            )
            policy.add_metric([], {"policy_hash": self._policy_hash()})
            yield policy

    def describe(self) -> Iterator[Metric]:
        return iter(())


class SidecarMetrics:
    """Decisions (by verdict, guard and family), decision latency, outcome records signed,
    capabilities minted and revoked, store errors, policy reloads, refused requests (401/403),
    key id and policy hash."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "chio_sidecar_decisions",
            "Decisions signed, by verdict, by the guard that decided a deny ('none' for an "
            "allow) and by the body the route got.",
            ["verdict", "guard", "family"],
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
        self.policy_reloads = Counter(
            "chio_sidecar_policy_reloads",
            "Policy reloads, by result (ok: the new set is in use; error: the old one stays).",
            ["result"],
            registry=r,
        )
        self.auth_failures = Counter(
            "chio_sidecar_auth_failures",
            "Requests refused before their route ran: 401 (missing or wrong credential), "
            "403 (a known credential whose role may not call the route).",
            ["status"],
            registry=r,
        )
        self._guards: set[str] = set()
        # Every series of a fixed label set exists from the start (rate() needs a zero).
        for family in FAMILIES:
            self.decisions.labels(verdict="allow", guard=NO_GUARD, family=family)
            self.decision_latency.labels(family=family)
            self.minted.labels(family=family)
        for family in ("project", "kernel"):
            self.revoked.labels(family=family)
        for status in STATUSES:
            self.outcomes.labels(status=status)
        for result in ("ok", "error"):
            self.policy_reloads.labels(result=result)
        for code in AUTH_STATUSES:
            self.auth_failures.labels(status=str(code))
        self._key: _KeyCollector | None = None

    def watch_key(self, key_id: Callable[[], str]) -> None:
        """Report ``key_id()`` as the signing key at each scrape (the last one given wins)."""
        if self._key is None:
            self._key = _KeyCollector(key_id)
            self.registry.register(self._key)
        else:
            self._key._key_id = key_id

    def watch_policy(self, policy_hash: Callable[[], str]) -> None:
        """Report ``policy_hash()`` as the active policy at each scrape (after
        :meth:`watch_key`)."""
        if self._key is not None:
            self._key._policy_hash = policy_hash

    def decision(
        self,
        family: Family,
        allowed: bool,
        started: float,
        *,
        guard: str | None = None,
        verdict: str | None = None,
    ) -> None:
        """Count one decision that took since ``started`` (a :func:`time.perf_counter`).

        ``guard`` names the guard that decided a deny; ``verdict`` overrides allow/deny (for
        example ``pending`` for a call waiting on an approval).
        """
        self.decision_latency.labels(family=family).observe(time.perf_counter() - started)
        name = verdict if verdict is not None else ("allow" if allowed else "deny")
        if name not in VERDICTS:
            name = "other"
        self.decisions.labels(verdict=name, guard=self._guard(guard), family=family).inc()

    def _guard(self, guard: str | None) -> str:
        if not guard:
            return NO_GUARD
        if guard in self._guards:
            return guard
        if len(self._guards) >= MAX_GUARDS:
            return "other"
        self._guards.add(guard)
        return guard

    def policy_reloaded(self, ok: bool) -> None:
        """Count one policy reload: ``ok`` when the new set is in use, else the old one stays."""
        self.policy_reloads.labels(result="ok" if ok else "error").inc()

    def store_error(self, operation: str) -> None:
        """Count one failure to use the store (``operation`` from a fixed set of names)."""
        self.store_errors.labels(operation=operation).inc()

    def auth_failure(self, status: int) -> None:
        """Count one request refused with ``status`` (401 or 403) before its route ran."""
        self.auth_failures.labels(status=str(status)).inc()

    def outcome(self, status: str, started: float) -> None:
        """Count one signed outcome record that took since ``started``."""
        self.outcome_latency.observe(time.perf_counter() - started)
        self.outcomes.labels(status=status if status in STATUSES else "UNKNOWN").inc()

    def exposition(self) -> bytes:
        """The registry in the text exposition format."""
        return generate_latest(self.registry)
