"""The SIEM exporter: receipts as OCSF API Activity events to a file, Splunk HEC, Elastic or
syslog.

Each output is a class with ``async write(batch)``; the exporter is the deliver step of the
package's batch runner. Shares the runner, the dead-letter records, the wire decoding, the errors
and the metrics with the receipt builder, and nothing else.
"""

from __future__ import annotations

from chio_receipts.consumers.siem._elastic import ElasticOutput
from chio_receipts.consumers.siem._exporter import ExporterConfig, SiemExporter
from chio_receipts.consumers.siem._filter import EventFilter
from chio_receipts.consumers.siem._hec import HecOutput
from chio_receipts.consumers.siem._jsonl import JsonLinesOutput
from chio_receipts.consumers.siem._ocsf import (
    OCSF_PROFILES,
    OCSF_VERSION,
    attempt_events,
    envelope_to_ocsf,
    is_deny,
    is_gap,
    outcome_to_ocsf,
    step_to_ocsf,
)
from chio_receipts.consumers.siem._output import Output
from chio_receipts.consumers.siem._spec import OutputSpec, make_output, parse_output
from chio_receipts.consumers.siem._syslog import SyslogOutput

__all__ = [
    "OCSF_PROFILES",
    "OCSF_VERSION",
    "ElasticOutput",
    "EventFilter",
    "ExporterConfig",
    "HecOutput",
    "JsonLinesOutput",
    "Output",
    "OutputSpec",
    "SiemExporter",
    "SyslogOutput",
    "attempt_events",
    "envelope_to_ocsf",
    "is_deny",
    "is_gap",
    "make_output",
    "outcome_to_ocsf",
    "parse_output",
    "step_to_ocsf",
]
