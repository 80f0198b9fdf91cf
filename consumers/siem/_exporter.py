"""The SIEM exporter: step receipts (and optionally envelopes) as OCSF events to one output.

It is the deliver step of a :class:`BatchRunner`: map each decoded message to OCSF, filter, write
the batch to the output; the runner commits afterwards. A transient failure
(:class:`OutputUnavailable`) is retried with jittered backoff until the output takes the batch or
the exporter is stopped, and nothing is committed meanwhile. A batch the output refuses
(:class:`OutputRejected`) goes to the dead-letter topic with the reason; the exporter carries on
and commits. Messages that do not decode are skipped: the receipt builder dead-letters them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from chio_receipts.consumers._dlq import Reason
from chio_receipts.consumers._errors import OutputRejected, OutputUnavailable
from chio_receipts.consumers._metrics import ConsumerMetrics
from chio_receipts.consumers._runner import Batch, BatchRunner, Message, RunnerConfig
from chio_receipts.consumers._wire import ENVELOPE_SCHEMA, STEP_SCHEMA, Plain
from chio_receipts.consumers.siem._filter import EventFilter
from chio_receipts.consumers.siem._ocsf import envelope_to_ocsf, step_to_ocsf
from chio_receipts.consumers.siem._output import Output
from chio_receipts.consumers.siem._spec import OutputSpec, make_output
from chio_receipts.schemas import (
    AsyncService,
    KafkaConnection,
    RetryPolicy,
    TopicNames,
    retry_async,
)

__all__ = ["ExporterConfig", "SiemExporter"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExporterConfig:
    """Configuration of ``chio-receipts siem-export``."""

    kafka: KafkaConnection
    output: OutputSpec
    group_id: str = "chio-siem-exporter"
    topics: TopicNames = field(default_factory=TopicNames)
    """The steps topic is read; the envelopes topic too with ``export_envelopes``; refused
    batches go to the dead-letter topic."""
    export_envelopes: bool = False
    deny_only: bool = False
    drop_denies: bool = False
    tool_servers: frozenset[str] | None = None
    batch_size: int = 500
    poll_timeout_ms: int = 200
    max_message_bytes: int = 1_048_576
    max_poll_interval_ms: int = 900_000
    retry_initial_seconds: float = 0.2
    retry_max_seconds: float = 10.0
    registry_url: str | None = None
    source: str = "urn:chio-receipts:siem-exporter"
    """CloudEvents source of the dead letters this exporter publishes."""


def _to_ocsf(plain: Plain) -> dict[str, Any] | None:
    if plain.schema_name == STEP_SCHEMA:
        return step_to_ocsf(plain.record)
    if plain.schema_name == ENVELOPE_SCHEMA:
        return envelope_to_ocsf(plain.record)
    return None


class SiemExporter(AsyncService):
    """Consumes receipts, maps them to OCSF, delivers them, then commits."""

    def __init__(
        self,
        config: ExporterConfig,
        *,
        output: Output | None = None,
        metrics: ConsumerMetrics | None = None,
    ) -> None:
        self._config = config
        self.output = output or make_output(config.output)
        self.metrics = metrics or ConsumerMetrics()
        self._filter = EventFilter(
            deny_only=config.deny_only,
            drop_denies=config.drop_denies,
            tool_servers=config.tool_servers,
        )
        topics = config.topics
        read = [topics.steps] + ([topics.envelopes] if config.export_envelopes else [])
        self._runner = BatchRunner(
            RunnerConfig(
                kafka=config.kafka,
                group_id=config.group_id,
                topics=tuple(read),
                dlq_topic=topics.dlq,
                schemas={
                    topics.steps: frozenset({STEP_SCHEMA}),
                    topics.envelopes: frozenset({ENVELOPE_SCHEMA}),
                },
                dead_letter_data_errors=False,
                max_batch=config.batch_size,
                poll_timeout_ms=config.poll_timeout_ms,
                max_message_bytes=config.max_message_bytes,
                max_poll_interval_ms=config.max_poll_interval_ms,
                registry_url=config.registry_url,
                retry=RetryPolicy(
                    initial_seconds=config.retry_initial_seconds,
                    maximum_seconds=config.retry_max_seconds,
                ),
                source=config.source,
            ),
            self,
            metrics=self.metrics,
        )
        self._policy = RetryPolicy(
            initial_seconds=config.retry_initial_seconds,
            maximum_seconds=config.retry_max_seconds,
            retry_on=lambda exc: isinstance(exc, OutputUnavailable),
            describe=f"SIEM output {self.output.name}",
        )
        self._entered = False

    async def start(self) -> None:
        """Open the output, then join the group. Idempotent."""
        try:
            if not self._entered:
                await self.output.__aenter__()
                self._entered = True
            await self._runner.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Leave the group and close the output. Idempotent."""
        await self._runner.stop()
        if self._entered:
            self._entered = False
            await self.output.__aexit__(None, None, None)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Export until ``stop`` is set."""
        await self._runner.run(stop)

    async def run_once(self) -> int:
        """One poll: map, filter, deliver, commit; returns the messages polled."""
        return await self._runner.run_once()

    async def lag(self) -> int:
        """Total of (end offset - committed offset) over the assigned partitions."""
        return await self._runner.lag()

    # -- the runner's deliver step ---------------------------------------------------------

    async def deliver(self, batch: Batch) -> None:
        """Write the batch's kept events; a refused batch is dead-lettered."""
        events: list[dict[str, Any]] = []
        sources: list[Message] = []
        for message in batch.messages():
            event = _to_ocsf(message.plain)
            if event is not None and self._filter.keep(event):
                events.append(event)
                sources.append(message)
        if not events:
            return
        try:
            await retry_async(
                lambda: self.output.write(events), policy=self._policy, stop=batch.stop
            )
        except OutputRejected as exc:
            _log.warning(
                "output %s refused a batch of %d events (%s); dead-lettering it",
                self.output.name,
                len(events),
                exc,
            )
            for message in sources:
                batch.dead_letter(message, exc, Reason.OUTPUT_REJECTED)
            return
        self.metrics.exported.labels(self.output.name).inc(len(events))

    def offsets(self, batch: Batch) -> Mapping[TopicPartition, int]:
        """The whole batch: delivered or dead-lettered by now."""
        return batch.next_offsets()

    async def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        """Nothing is held between batches."""

    def assigned(self, partitions: Sequence[TopicPartition]) -> None:
        """Nothing to load: reading resumes at the committed offsets."""
