"""Consumers: the receipt builder (Kafka -> ClickHouse envelopes, exactly once), the dead-letter
topic, the SIEM exporter and the read-side tools (``query``, ``verify``).

Never imports temporalio or interceptor; depends on ``schemas`` only.
"""

from __future__ import annotations

from chio_receipts.consumers._builder import ReceiptBuilder, RunState, StepEntry
from chio_receipts.consumers._clickhouse import (
    ClickHouseConfig,
    ClickHouseSink,
    chdb_path,
    open_client,
    owner_pid,
)
from chio_receipts.consumers._consumer import (
    BuilderConfig,
    ReceiptBuilderService,
    Topics,
    check_copartitioned,
)
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
from chio_receipts.consumers._ocsf import OCSF_VERSION, envelope_to_ocsf, step_to_ocsf
from chio_receipts.consumers._rows import (
    EnvelopeRow,
    StepRow,
    envelope_row,
    receipt_from_row,
    step_row,
)
from chio_receipts.consumers._siem import (
    ElasticOutput,
    EventFilter,
    ExporterConfig,
    HecOutput,
    JsonLinesOutput,
    Output,
    OutputSpec,
    SiemExporter,
    SyslogOutput,
    parse_output,
)
from chio_receipts.consumers._verify import VerifyReport, verify_run

__all__ = [
    "DLQ_HEADER_PREFIX",
    "OCSF_VERSION",
    "BuilderConfig",
    "ClickHouseConfig",
    "ClickHouseSink",
    "ConfigError",
    "ConsumerError",
    "ConsumerMetrics",
    "DatabaseBusy",
    "DeadLetter",
    "ElasticOutput",
    "Envelope",
    "EnvelopeRow",
    "EventFilter",
    "ExporterConfig",
    "FailpointError",
    "HecOutput",
    "JsonLinesOutput",
    "KafkaUnavailable",
    "KeyResolutionError",
    "KeyRing",
    "Output",
    "OutputError",
    "OutputRejected",
    "OutputSpec",
    "OutputUnavailable",
    "Reason",
    "ReceiptBuilder",
    "ReceiptBuilderService",
    "RunState",
    "SiemExporter",
    "SinkDataError",
    "SinkError",
    "SinkUnavailable",
    "StepEntry",
    "StepRow",
    "SyslogOutput",
    "Topics",
    "VerifyReport",
    "chdb_path",
    "check_copartitioned",
    "decode_public_key",
    "envelope_row",
    "envelope_to_ocsf",
    "failpoint",
    "fetch_public_keys",
    "load_keys_file",
    "open_client",
    "owner_pid",
    "parse_dead_letter_headers",
    "parse_output",
    "receipt_from_row",
    "step_row",
    "step_to_ocsf",
    "verify_envelope_signature",
    "verify_run",
]
