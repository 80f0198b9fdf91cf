"""The pipeline's contract in one place: topic names, schema names, event types, header names.

Every package that produces or reads the pipeline's topics takes these names from here; nothing
else spells them out. Every record the pipeline produces carries CloudEvents binary-mode headers
built by :func:`cloudevent_headers`. Topic names may get a prefix (tests use a unique one per
test); steps and runs are keyed by :func:`run_key` and must be co-partitioned
(:func:`check_copartitioned`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from chio_receipts.schemas._errors import ContractError

__all__ = [
    "CE_HEADERS",
    "CONTENT_TYPE",
    "DEAD_LETTER_CONTENT_TYPE",
    "DEAD_LETTER_EVENT_TYPE",
    "DLQ_HEADER_PREFIX",
    "DLQ_TOPIC",
    "ENVELOPES_TOPIC",
    "ENVELOPE_EVENT_TYPE",
    "ENVELOPE_SCHEMA",
    "RUNS_TOPIC",
    "RUN_COMPLETION_EVENT_TYPE",
    "RUN_COMPLETION_SCHEMA",
    "STEPS_TOPIC",
    "STEP_EVENT_TYPE",
    "STEP_OUTCOME_EVENT_TYPE",
    "STEP_OUTCOME_SCHEMA",
    "STEP_SCHEMA",
    "WORKER_ENVELOPE_EVENT_TYPE",
    "X_CHIO_RECEIPT",
    "X_CHIO_VERDICT",
    "TopicNames",
    "check_copartitioned",
    "cloudevent_headers",
    "envelope_event_id",
    "worker_envelope_event_id",
]

# Topics (default names; a deployment may prefix them).
STEPS_TOPIC = "chio.receipts.steps.v1"
RUNS_TOPIC = "chio.receipts.runs.v1"
ENVELOPES_TOPIC = "chio.receipts.envelopes.v1"
DLQ_TOPIC = "chio.receipts.dlq.v1"

# Avro schema full names (the files under ``schemas/avro``).
STEP_SCHEMA = "dev.chio.receipts.v1.StepReceipt"
STEP_OUTCOME_SCHEMA = "dev.chio.receipts.v1.StepOutcome"
"""Outcome records travel on the steps topic, under the run's key, after their decision."""
RUN_COMPLETION_SCHEMA = "dev.chio.receipts.v1.RunCompletion"
ENVELOPE_SCHEMA = "dev.chio.receipts.v1.WorkflowReceipt"

# CloudEvents (Kafka binding, binary mode): event types and the headers that carry attributes.
STEP_EVENT_TYPE = "dev.chio.receipts.step.v1"
STEP_OUTCOME_EVENT_TYPE = "dev.chio.receipts.step_outcome.v1"
RUN_COMPLETION_EVENT_TYPE = "dev.chio.receipts.run_completion.v1"
ENVELOPE_EVENT_TYPE = "dev.chio.receipts.workflow_receipt.v1"
"""A builder's envelope revision: signed by the builder, built from what storage holds."""
WORKER_ENVELOPE_EVENT_TYPE = "dev.chio.receipts.worker_envelope.v1"
"""A worker's own flush (``flush_workflow_receipt``): the worker's view of the run, not signed by
the builder and not checked against storage. Consumers of the envelopes topic tell the two apart
by this type (and by ``metadata["source"] == "worker"`` for flushes older than the type)."""
DEAD_LETTER_EVENT_TYPE = "dev.chio.receipts.dead_letter.v1"
CONTENT_TYPE = b"application/avro"
DEAD_LETTER_CONTENT_TYPE = b"application/octet-stream"
"""Content type of a dead letter whose original message named none (its bytes are as received)."""
CE_HEADERS = ("ce_specversion", "ce_id", "ce_type", "ce_source", "ce_subject", "content-type")

# Headers of the Chio family's Kafka conventions (chio-streaming) and of the dead-letter topic.
X_CHIO_RECEIPT = "X-Chio-Receipt"
X_CHIO_VERDICT = "X-Chio-Verdict"
DLQ_HEADER_PREFIX = "chio.dlq."


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicNames:
    """The four topic names of one deployment."""

    steps: str = STEPS_TOPIC
    runs: str = RUNS_TOPIC
    envelopes: str = ENVELOPES_TOPIC
    dlq: str = DLQ_TOPIC

    @classmethod
    def with_prefix(cls, prefix: str) -> TopicNames:
        """The default names with ``prefix`` prepended to each."""
        return cls(
            steps=prefix + STEPS_TOPIC,
            runs=prefix + RUNS_TOPIC,
            envelopes=prefix + ENVELOPES_TOPIC,
            dlq=prefix + DLQ_TOPIC,
        )


def cloudevent_headers(
    *,
    event_id: str,
    event_type: str,
    source: str,
    subject: str,
    content_type: bytes = CONTENT_TYPE,
) -> tuple[tuple[str, bytes], ...]:
    """CloudEvents (spec 1.0, Kafka binding, binary mode) headers of one event, in
    :data:`CE_HEADERS` order."""
    specversion, ce_id, ce_type, ce_source, ce_subject, ce_content_type = CE_HEADERS
    return (
        (specversion, b"1.0"),
        (ce_id, event_id.encode()),
        (ce_type, event_type.encode()),
        (ce_source, source.encode()),
        (ce_subject, subject.encode()),
        (ce_content_type, content_type),
    )


def envelope_event_id(workflow_id: str, run_id: str, revision: int | str) -> str:
    """The CloudEvents id of an envelope revision: ``workflow_id/run_id/revision``."""
    return f"{workflow_id}/{run_id}/{revision}"


def worker_envelope_event_id(workflow_id: str, run_id: str, chain_root_hex: str) -> str:
    """The CloudEvents id of a worker's flush: ``workflow_id/run_id/worker-<chain root>``.

    A builder's id ends in a decimal revision, this one in ``worker-``: the two never collide;
    a re-flush of the same steps gets the same id."""
    return f"{workflow_id}/{run_id}/worker-{chain_root_hex}"


def check_copartitioned(partition_counts: Mapping[str, int], steps: str, runs: str) -> int:
    """The shared partition count of ``steps`` and ``runs``.

    Raises :class:`ContractError` when a topic is missing or the counts differ: a run's steps
    and its completion must land on the same partition number, or no consumer sees both.
    """
    for topic in (steps, runs):
        if topic not in partition_counts:
            raise ContractError(f"topic {topic} does not exist")
    if partition_counts[steps] != partition_counts[runs]:
        raise ContractError(
            f"steps topic {steps} has {partition_counts[steps]} partitions but runs topic {runs} "
            f"has {partition_counts[runs]}: they must be co-partitioned (same count); "
            "refusing to start"
        )
    return partition_counts[steps]
