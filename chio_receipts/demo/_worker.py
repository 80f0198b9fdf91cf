"""A demo worker process: the interceptor wired to a served sidecar and to the Kafka streamer.

This is where the packages meet (the composition root): ``interceptor`` gets a
``streamer.ReceiptStreamer`` as its receipt sink without either importing the other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from chio_receipts._temporal import TemporalConnection
from chio_receipts.demo._activities import ALL_ACTIVITIES
from chio_receipts.demo._workflows import ALL_WORKFLOWS
from chio_receipts.interceptor import (
    ArgumentKey,
    BudgetReversal,
    CapabilityToken,
    ChioActivityInterceptor,
    ChioClient,
    GrantResolver,
    WorkflowGrant,
)
from chio_receipts.schemas import KafkaConnection, SubjectStrategy, WireFormat
from chio_receipts.streamer import ReceiptStreamer, StreamerConfig, StreamerMetrics, TopicsConfig

__all__ = [
    "DEFAULT_SCOPE",
    "TOOL_SERVERS",
    "WorkerSettings",
    "demo_worker",
    "run_worker",
    "task_queue_resolver",
]

# Activities map to the policy tool servers that own them; the rest go to "agent-tools".
TOOL_SERVERS = {
    "debit_account": "payments",
    "credit_account": "payments",
    "refund_account": "payments",
    "check_balance": "payments",
    "pay": "payments",
    "send_email": "email-outbound",
    "read_database": "db-readonly",
}
# What any workflow on the demo's task queues may do without a grant of its own.
DEFAULT_SCOPE = ("call_tool", "read_database")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """Everything one demo worker process needs."""

    temporal_address: str
    namespace: str = "default"
    sidecar_url: str
    sidecar_token: str | None = field(default=None, repr=False)
    """Secret of the sidecar credential (a worker's); None: ``CHIO_SIDECAR_TOKEN`` if set."""
    kafka: KafkaConnection
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    spool_dir: Path
    task_queue: str
    argument_key: ArgumentKey = field(repr=False)
    default_capability_id: str | None = None
    identity: str | None = None
    temporal: TemporalConnection | None = None
    metrics: StreamerMetrics | None = None
    redact_parameters: bool = False
    """Receipts sign only the hash of each call's parameters (see ChioActivityInterceptor)."""
    wire_format: WireFormat = "single_object"
    registry_url: str | None = None
    subject_strategy: SubjectStrategy = SubjectStrategy.TOPIC
    """Framing of the receipts (``StreamerConfig``: Confluent needs ``registry_url``)."""

    def temporal_connection(self) -> TemporalConnection:
        """How to reach Temporal: ``temporal`` when given (TLS, API key), else plaintext to
        ``temporal_address`` in ``namespace``."""
        if self.temporal is not None:
            return self.temporal
        return TemporalConnection(address=self.temporal_address, namespace=self.namespace)


def task_queue_resolver(token: CapabilityToken) -> GrantResolver:
    """Grant resolver: any run on this worker's task queue gets ``token`` (adoption path)."""

    def resolve(info: activity.Info) -> WorkflowGrant | None:
        if not info.workflow_id:
            return None
        return WorkflowGrant(workflow_id=info.workflow_id, token=token, tool_server="agent-tools")

    return resolve


@contextlib.asynccontextmanager
async def demo_worker(
    settings: WorkerSettings,
    *,
    client: Client | None = None,
    workflows: Sequence[type] = ALL_WORKFLOWS,
    activities: Iterable[Callable[..., Any]] = ALL_ACTIVITIES,
) -> AsyncIterator[tuple[Worker, ChioActivityInterceptor, ChioClient]]:
    """A running worker with the interceptor, its sidecar client and its Kafka streamer."""
    async with contextlib.AsyncExitStack() as stack:
        chio = await stack.enter_async_context(
            ChioClient(settings.sidecar_url, token=settings.sidecar_token)
        )
        streamer = await stack.enter_async_context(
            ReceiptStreamer(
                StreamerConfig(
                    kafka=settings.kafka,
                    spool_dir=str(settings.spool_dir),
                    topics=settings.topics,
                    client_id=f"chio-demo-{settings.task_queue}",
                    wire_format=settings.wire_format,
                    registry_url=settings.registry_url,
                    subject_strategy=settings.subject_strategy,
                ),
                metrics=settings.metrics,
            )
        )
        resolver = None
        if settings.default_capability_id:
            token = await chio.get_capability(settings.default_capability_id)
            resolver = task_queue_resolver(token)
        interceptor = ChioActivityInterceptor(
            chio_client=chio,
            sidecar_url=settings.sidecar_url,
            default_tool_server="agent-tools",
            activity_tool_server_map=TOOL_SERVERS,
            receipt_sink=streamer,
            argument_key=settings.argument_key,
            grant_resolver=resolver,
            identity=settings.identity,
            redact_parameters=settings.redact_parameters,
        )
        # After the worker stops, before the streamer does: drain pending outcome records.
        stack.push_async_callback(interceptor.aclose)
        if client is None:
            client = await settings.temporal_connection().connect()
        worker = Worker(
            client,
            task_queue=settings.task_queue,
            workflows=list(workflows),
            # Saga compensation refunds budgets through this worker's sidecar.
            activities=[
                *activities,
                BudgetReversal(
                    settings.sidecar_url, token=settings.sidecar_token
                ).reverse_budget_charge,
            ],
            interceptors=[interceptor],
            identity=settings.identity,
        )
        async with worker:
            yield worker, interceptor, chio


async def run_worker(settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Serve ``settings.task_queue`` until ``stop`` is set; then drain and stop cleanly."""
    async with demo_worker(settings):
        await stop.wait()
