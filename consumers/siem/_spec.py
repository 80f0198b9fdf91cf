"""The ``--output`` text of ``siem-export``, parsed (:class:`OutputSpec`), and its output object."""

from __future__ import annotations

from dataclasses import dataclass, field

from chio_receipts.consumers._errors import ConfigError
from chio_receipts.consumers.siem._elastic import ElasticOutput
from chio_receipts.consumers.siem._hec import HecOutput
from chio_receipts.consumers.siem._jsonl import JsonLinesOutput
from chio_receipts.consumers.siem._output import Output
from chio_receipts.consumers.siem._syslog import SyslogOutput

__all__ = ["OutputSpec", "make_output", "parse_output"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSpec:
    """Parsed ``--output``: kind plus its target."""

    kind: str
    target: str
    token: str | None = field(default=None, repr=False)
    index: str | None = None


def parse_output(text: str, *, token: str | None = None, index: str | None = None) -> OutputSpec:
    """``jsonl:<path>|jsonl:-``, ``hec:<url>``, ``elastic:<url>``, ``syslog+tcp://h:p``,
    ``syslog+udp://h:p``."""
    if text.startswith("syslog+tcp://") or text.startswith("syslog+udp://"):
        return OutputSpec(kind=text.split("://")[0], target=text)
    kind, sep, target = text.partition(":")
    if not sep or kind not in ("jsonl", "hec", "elastic") or not target:
        raise ConfigError(f"unknown output {text!r}")
    if kind == "hec" and not token:
        raise ConfigError("the hec output needs a token (--hec-token / CHIO_HEC_TOKEN)")
    return OutputSpec(kind=kind, target=target, token=token, index=index)


def make_output(spec: OutputSpec) -> Output:
    """The output object for ``spec``."""
    if spec.kind == "jsonl":
        return JsonLinesOutput(spec.target)
    if spec.kind == "hec":
        return HecOutput(spec.target, spec.token or "", index=spec.index)
    if spec.kind == "elastic":
        return ElasticOutput(spec.target, index=spec.index)
    return SyslogOutput(spec.target)
