"""Consumers: the receipt builder (Kafka -> ClickHouse envelopes, exactly once), the dead-letter
topic and the read-side tools (``query``, ``verify``); the SIEM exporter is the ``siem``
subpackage.

Both consumers are deliver steps of one loop, :class:`BatchRunner` (poll, decode, deliver,
dead-letter, commit). The runner, the dead-letter records, the wire decoding, the keys, the errors
and the metrics are shared; the builder's modules and ``siem`` never import each other. Never
imports temporalio or interceptor; depends on ``schemas`` only.
"""

from __future__ import annotations

from chio_receipts.consumers._builder import ReceiptBuilder, RunState, StepEntry
from chio_receipts.consumers._chio import ChioRefusal, chio_refusal, parse_kernel_keys, signed_by
from chio_receipts.consumers._clickhouse import (
    ClickHouseConfig,
    ClickHouseSink,
    chdb_path,
    open_client,
    open_reader,
    owner_pid,
)
from chio_receipts.consumers._consumer import BuilderConfig, ReceiptBuilderService
from chio_receipts.consumers._dlq import (
    DLQ_HEADER_PREFIX,
    DeadLetter,
    Reason,
    parse_dead_letter_headers,
)
from chio_receipts.consumers._envelope import Envelope, verify_envelope_signature
from chio_receipts.consumers._errors import (
    ConfigError,
    ConsumerError,
    DatabaseBusy,
    FailpointError,
    KafkaUnavailable,
    KeyResolutionError,
    OutputError,
    OutputRejected,
    OutputUnavailable,
    SinkDataError,
    SinkError,
    SinkUnavailable,
)
from chio_receipts.consumers._failpoints import failpoint
from chio_receipts.consumers._keys import (
    KeyRing,
    decode_public_key,
    fetch_public_keys,
    load_keys_file,
)
from chio_receipts.consumers._metrics import ConsumerMetrics
from chio_receipts.consumers._readendpoint import (
    DEFAULT_READ_BIND,
    ReadEndpoint,
    ReadEndpointConfig,
    parse_read_bind,
    read_endpoint,
)
from chio_receipts.consumers._rows import (
    EnvelopeRow,
    StepRow,
    envelope_row,
    receipt_from_row,
    step_row,
)
from chio_receipts.consumers._runner import (
    Batch,
    BatchHandler,
    BatchRunner,
    Message,
    PartitionBatch,
    RunnerConfig,
    partition_counts,
)
from chio_receipts.consumers._verify import VerifyReport, verify_run

__all__ = [
    "DEFAULT_READ_BIND",
    "DLQ_HEADER_PREFIX",
    "Batch",
    "BatchHandler",
    "BatchRunner",
    "BuilderConfig",
    "ChioRefusal",
    "ClickHouseConfig",
    "ClickHouseSink",
    "ConfigError",
    "ConsumerError",
    "ConsumerMetrics",
    "DatabaseBusy",
    "DeadLetter",
    "Envelope",
    "EnvelopeRow",
    "FailpointError",
    "KafkaUnavailable",
    "KeyResolutionError",
    "KeyRing",
    "Message",
    "OutputError",
    "OutputRejected",
    "OutputUnavailable",
    "PartitionBatch",
    "ReadEndpoint",
    "ReadEndpointConfig",
    "Reason",
    "ReceiptBuilder",
    "ReceiptBuilderService",
    "RunState",
    "RunnerConfig",
    "SinkDataError",
    "SinkError",
    "SinkUnavailable",
    "StepEntry",
    "StepRow",
    "VerifyReport",
    "chdb_path",
    "chio_refusal",
    "decode_public_key",
    "envelope_row",
    "failpoint",
    "fetch_public_keys",
    "load_keys_file",
    "open_client",
    "open_reader",
    "owner_pid",
    "parse_dead_letter_headers",
    "parse_kernel_keys",
    "parse_read_bind",
    "partition_counts",
    "read_endpoint",
    "receipt_from_row",
    "signed_by",
    "step_row",
    "verify_envelope_signature",
    "verify_run",
]
