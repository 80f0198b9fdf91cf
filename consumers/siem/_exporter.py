"""The SIEM exporter: step receipts (and optionally envelopes) as OCSF events to one output.

It is the deliver step of a :class:`BatchRunner`: map each decoded message to OCSF, filter, write
the batch to the output; the runner commits afterwards. A transient failure
(:class:`OutputUnavailable`) is retried with jittered backoff until the output takes the batch or
the exporter is stopped, and nothing is committed meanwhile. A batch the output refuses
(:class:`OutputRejected`) goes to the dead-letter topic with the reason; the exporter carries on
and commits. Messages that do not decode are skipped: the receipt builder dead-letters them.

Every step's Chio kernel receipt, and that of every step embedded in an envelope, is checked
(``consumers._chio``) under the trusted keys: the hex of every key of the exporter's key ring
(``public_keys``, the sidecar's ``/v1/keys``) plus ``trusted_kernel_keys``; an unknown
``kernel_key`` refreshes the ring once. A step that fails is never exported: it is counted
(``chio_siem_events_refused``) and logged, and dead-lettered by the receipt builder, which owns
the steps topic's data errors. An envelope that embeds such a step is dead-lettered here (no one
else checks the envelopes topic). The exporter does not check the sidecar's Avro signatures (the
builder does); events never carry the receipt's parameters.

Outcome records (``StepOutcome``) share the steps topic and are exported as events of their
own (``_ocsf.outcome_to_ocsf``); an envelope is its run's event followed by one event per attempt
it does not account for with receipts (``_ocsf.attempt_events``: gate failures, workers lost,
real gaps). An outcome's Chio ``trace_observation`` receipt is checked like a step's
(``schemas.check_chio_outcome`` under the same trusted keys, an unknown ``kernel_key`` refreshing
the ring once); one that does not check is not exported, and an envelope embedding it is
dead-lettered. An outcome without a receipt is exported only as a GATE_FAILED record (a gate
failure the sidecar could not sign; its event says ``unmapped.signed`` false): any other unsigned
outcome is refused as unsigned.

Only the builder's envelopes are exported. A worker's own flush (``flush_workflow_receipt``
through the streamer) shares the envelopes topic but is the worker's unattested view of the run
(type ``WORKER_ENVELOPE_EVENT_TYPE``, or ``metadata["source"] == "worker"`` when older): it is
skipped, neither exported nor dead-lettered, and committed with the batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from aiokafka import TopicPartition

from chio_receipts.consumers._chio import ChioRefusal, chio_refusal
from chio_receipts.consumers._dlq import Reason
from chio_receipts.consumers._errors import OutputRejected, OutputUnavailable
from chio_receipts.consumers._keys import KeyRing
from chio_receipts.consumers._metrics import ConsumerMetrics
from chio_receipts.consumers._runner import Batch, BatchRunner, Message, RunnerConfig
from chio_receipts.consumers._wire import ENVELOPE_SCHEMA, STEP_OUTCOME_SCHEMA, STEP_SCHEMA, Plain
from chio_receipts.consumers.siem._filter import EventFilter
from chio_receipts.consumers.siem._ocsf import (
    attempt_events,
    envelope_to_ocsf,
    outcome_to_ocsf,
    step_to_ocsf,
)
from chio_receipts.consumers.siem._output import Output
from chio_receipts.consumers.siem._spec import OutputSpec, make_output
from chio_receipts.schemas import (
    WORKER_ENVELOPE_EVENT_TYPE,
    AsyncService,
    KafkaConnection,
    RetryPolicy,
    StepOutcome,
    StepStatus,
    TopicNames,
    check_chio_outcome,
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
    public_keys: Mapping[str, bytes] = field(default_factory=dict)
    """Key ring of the Chio receipt check (our sidecars' keys), by key id."""
    key_url: str | None = None
    """A sidecar serving ``GET /v1/keys`` (refreshed on an unknown ``kernel_key``)."""
    trusted_kernel_keys: frozenset[str] = frozenset()
    """Lowercase hex keys of Chio kernels whose receipts are trusted, besides the ring's."""


def outcome_refusal(record: Mapping[str, Any], trusted: frozenset[str]) -> ChioRefusal | None:
    """Why the plain outcome ``record`` is not exported, or None: its Chio receipt does not
    check under ``trusted``, or it has none and is not a gate failure."""
    try:
        outcome = StepOutcome.from_avro(dict(record))
    except (KeyError, TypeError, ValueError) as exc:
        return ChioRefusal(Reason.BAD_CHIO_RECEIPT, f"the outcome record is not readable: {exc}")
    if not outcome.chio_receipt:
        if outcome.status is StepStatus.GATE_FAILED:
            return None
        return ChioRefusal(Reason.UNSIGNED_STEP, "the outcome record carries no Chio receipt")
    why = check_chio_outcome(outcome, trusted_keys=trusted)
    if why is None:
        return None
    kernel_key = _kernel_key(outcome.chio_receipt)
    if kernel_key and kernel_key not in trusted:
        return ChioRefusal(Reason.UNTRUSTED_KERNEL_KEY, why, kernel_key)
    return ChioRefusal(Reason.BAD_CHIO_RECEIPT, why)


def _kernel_key(text: str) -> str:
    try:
        receipt = json.loads(text)
    except ValueError:
        return ""
    return str(receipt.get("kernel_key") or "").lower() if isinstance(receipt, dict) else ""


def _refusal(plain: Plain, trusted: frozenset[str]) -> ChioRefusal | None:
    if plain.schema_name == STEP_SCHEMA:
        return chio_refusal(plain.record, trusted)
    if plain.schema_name == STEP_OUTCOME_SCHEMA:
        return outcome_refusal(plain.record, trusted)
    if plain.schema_name == ENVELOPE_SCHEMA:
        for step in plain.record.get("steps") or ():
            refusal = chio_refusal(step, trusted)
            if refusal is not None:
                receipt = step.get("receipt_id")
                return replace(refusal, detail=f"embedded step {receipt}: {refusal.detail}")
        for outcome in plain.record.get("outcomes") or ():
            refusal = outcome_refusal(outcome, trusted)
            if refusal is not None:
                uid = outcome.get("outcome_id")
                return replace(refusal, detail=f"embedded outcome {uid}: {refusal.detail}")
    return None


def _worker_flush(message: Message) -> bool:
    """True for a worker's own envelope flush on the envelopes topic (type
    ``WORKER_ENVELOPE_EVENT_TYPE``, or ``metadata["source"] == "worker"`` for flushes older than
    the type): not a builder envelope, so never exported as one."""
    if message.plain.schema_name != ENVELOPE_SCHEMA:
        return False
    ce_type = next((bytes(v) for k, v in message.record.headers or () if k == "ce_type"), b"")
    if ce_type == WORKER_ENVELOPE_EVENT_TYPE.encode():
        return True
    metadata = message.plain.record.get("metadata") or {}
    return bool(metadata.get("source") == "worker")


def to_ocsf(plain: Plain) -> list[dict[str, Any]]:
    """The OCSF events of one decoded message: a step's decision, an outcome, or an envelope's
    run event followed by its unreceipted attempts."""
    if plain.schema_name == STEP_SCHEMA:
        return [step_to_ocsf(plain.record)]
    if plain.schema_name == STEP_OUTCOME_SCHEMA:
        return [outcome_to_ocsf(plain.record)]
    if plain.schema_name == ENVELOPE_SCHEMA:
        return [envelope_to_ocsf(plain.record), *attempt_events(plain.record)]
    return []


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
                    topics.steps: frozenset({STEP_SCHEMA, STEP_OUTCOME_SCHEMA}),
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
        self._keys = KeyRing(
            config.public_keys,
            url=config.key_url,
            trusted_kernel_keys=config.trusted_kernel_keys,
        )
        self._entered = False

    async def start(self) -> None:
        """Open the output, then join the group. Idempotent."""
        try:
            await self._keys.refresh(force=False)
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
        messages = [m for m in batch.messages() if not _worker_flush(m)]
        refusals = await self._checked(messages)
        for message in messages:
            refusal = refusals.get(id(message))
            if refusal is not None:
                self._refuse(batch, message, refusal)
                continue
            kept = [e for e in to_ocsf(message.plain) if self._filter.keep(e)]
            if kept:
                events += kept
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

    async def _checked(self, messages: list[Message]) -> dict[int, ChioRefusal]:
        """The Chio refusal of each message that has one (by ``id(message)``): a step's own
        receipt, or the first refused step embedded in an envelope."""
        trusted = self._keys.trusted_hex
        refusals = {id(m): r for m in messages if (r := _refusal(m.plain, trusted)) is not None}
        untrusted = {r.untrusted_key for r in refusals.values() if r.untrusted_key}
        if untrusted:
            await self._keys.refresh_for(kernel_keys=untrusted)
            trusted = self._keys.trusted_hex
            for m in messages:
                old = refusals.get(id(m))
                if old is not None and old.untrusted_key:
                    new = _refusal(m.plain, trusted)
                    if new is None:
                        del refusals[id(m)]
                    else:
                        refusals[id(m)] = new
        return refusals

    def _refuse(self, batch: Batch, message: Message, refusal: ChioRefusal) -> None:
        self.metrics.refused.labels(refusal.reason).inc()
        record = message.record
        _log.warning(
            "not exporting %s[%d]@%d: %s (%s)",
            message.tp.topic,
            message.tp.partition,
            record.offset,
            refusal.reason,
            refusal.detail,
        )
        if message.plain.schema_name == ENVELOPE_SCHEMA:
            batch.dead_letter(message, refusal.error(), refusal.reason)

    def offsets(self, batch: Batch) -> Mapping[TopicPartition, int]:
        """The whole batch: delivered or dead-lettered by now."""
        return batch.next_offsets()

    async def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        """Nothing is held between batches."""

    def assigned(self, partitions: Sequence[TopicPartition]) -> None:
        """Nothing to load: reading resumes at the committed offsets."""
