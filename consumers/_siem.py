"""The SIEM exporter: step receipts (and optionally envelopes) as OCSF events to SIEM outputs.

Outputs: JSON lines (file or stdout), Splunk HEC (batched, HEC event envelope), Elastic ``_bulk``
(``create`` with ``_id`` = receipt id, so a replay cannot duplicate), syslog RFC 5424 over TCP
(octet counting, RFC 6587) or UDP. A batch is retried with backoff while the output is
unavailable; offsets are committed only after the output accepted the batch. Filters never drop
a denial unless ``drop_denies`` says so explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import urlparse

import httpx
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from chio_receipts.consumers._errors import (
    ConfigError,
    ConsumerError,
    OutputError,
    OutputRejected,
    OutputUnavailable,
)
from chio_receipts.consumers._metrics import ConsumerMetrics
from chio_receipts.consumers._ocsf import envelope_to_ocsf, is_deny, step_to_ocsf
from chio_receipts.consumers._wire import ENVELOPE_SCHEMA, STEP_SCHEMA, decode_plain
from chio_receipts.schemas import Codec, DecodeError, RegistryError, SchemaRegistryClient

__all__ = [
    "ElasticOutput",
    "EventFilter",
    "ExporterConfig",
    "HecOutput",
    "JsonLinesOutput",
    "Output",
    "OutputSpec",
    "SiemExporter",
    "SyslogOutput",
    "parse_output",
]

_log = logging.getLogger(__name__)


class Output(Protocol):
    """Where OCSF events go. ``send`` returns once the output accepted the whole batch."""

    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def send(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Deliver ``events``; raise OutputUnavailable (retry) or OutputRejected."""
        ...


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


def _http_error(exc: httpx.HTTPError, what: str) -> OutputError:
    return OutputUnavailable(f"{what}: {type(exc).__name__}: {exc}")


def _status_error(status: int, text: str, what: str) -> OutputError:
    if status == 429 or status >= 500:
        return OutputUnavailable(f"{what}: HTTP {status}: {text[:300]}")
    return OutputRejected(f"{what}: HTTP {status}: {text[:300]}")


class JsonLinesOutput:
    """One JSON object per line to a file (appended, fsync'd per batch) or stdout (``-``)."""

    name = "jsonl"

    def __init__(self, target: str) -> None:
        self._target = target
        self._fh: Any = None

    async def __aenter__(self) -> Self:
        if self._target != "-" and self._fh is None:
            path = Path(self._target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = await asyncio.to_thread(path.open, "a", encoding="utf-8")
        return self

    async def __aexit__(self, *exc: object) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()

    async def send(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Write and flush the batch."""
        text = "".join(json.dumps(e, separators=(",", ":"), sort_keys=True) + "\n" for e in events)
        try:
            if self._fh is None:
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                await asyncio.to_thread(self._write, text)
        except OSError as exc:
            raise OutputUnavailable(f"jsonl: {exc}") from exc

    def _write(self, text: str) -> None:
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())


class HecOutput:
    """Splunk HTTP Event Collector: one POST per batch of HEC event envelopes."""

    name = "hec"

    def __init__(
        self,
        url: str,
        token: str,
        *,
        index: str | None = None,
        sourcetype: str = "ocsf:api_activity",
        timeout_seconds: float = 10.0,
    ) -> None:
        parsed = urlparse(url)
        self._url = (
            url if parsed.path not in ("", "/") else url.rstrip("/") + "/services/collector/event"
        )
        self._token = token
        self._index = index
        self._sourcetype = sourcetype
        self._timeout = timeout_seconds
        self._client: httpx.AsyncClient | None = None
        self._host = socket.gethostname()

    async def __aenter__(self) -> Self:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def envelope(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The HEC envelope of one OCSF event."""
        doc: dict[str, Any] = {
            "time": event["time"] / 1000,
            "host": self._host,
            "source": "chio-receipts",
            "sourcetype": self._sourcetype,
            "event": event,
        }
        if self._index:
            doc["index"] = self._index
        return doc

    async def send(self, events: Sequence[Mapping[str, Any]]) -> None:
        """POST the batch (concatenated JSON envelopes)."""
        if self._client is None:
            raise OutputUnavailable("hec output is not started")
        body = "\n".join(json.dumps(self.envelope(e), separators=(",", ":")) for e in events)
        try:
            response = await self._client.post(
                self._url,
                content=body.encode(),
                headers={"Authorization": f"Splunk {self._token}"},
            )
        except httpx.HTTPError as exc:
            raise _http_error(exc, "hec") from exc
        if response.status_code != 200:
            raise _status_error(response.status_code, response.text, "hec")


class ElasticOutput:
    """Elasticsearch / OpenSearch ``_bulk`` with ``create`` and ``_id`` = event uid."""

    name = "elastic"

    def __init__(
        self, url: str, *, index: str | None = None, timeout_seconds: float = 10.0
    ) -> None:
        self._url = url.rstrip("/") + "/_bulk" if not url.rstrip("/").endswith("_bulk") else url
        self._index = index or "chio-receipts"
        self._timeout = timeout_seconds
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def send(self, events: Sequence[Mapping[str, Any]]) -> None:
        """One ``_bulk`` request; items that already exist (409) count as accepted."""
        if self._client is None:
            raise OutputUnavailable("elastic output is not started")
        lines: list[str] = []
        for e in events:
            action = {"create": {"_index": self._index, "_id": e["metadata"]["uid"]}}
            lines.append(json.dumps(action, separators=(",", ":")))
            lines.append(json.dumps(e, separators=(",", ":")))
        try:
            response = await self._client.post(
                self._url,
                content=("\n".join(lines) + "\n").encode(),
                headers={"Content-Type": "application/x-ndjson"},
            )
        except httpx.HTTPError as exc:
            raise _http_error(exc, "elastic") from exc
        if response.status_code != 200:
            raise _status_error(response.status_code, response.text, "elastic")
        try:
            result = response.json()
        except ValueError as exc:
            raise OutputUnavailable("elastic: response is not JSON") from exc
        if not result.get("errors"):
            return
        for item in result.get("items", []):
            status = int(next(iter(item.values())).get("status", 500))
            if status in (200, 201, 409):
                continue
            raise _status_error(status, json.dumps(item)[:300], "elastic item")


class SyslogOutput:
    """RFC 5424 messages over TCP (octet-counting framing) or UDP, facility local0."""

    name = "syslog"
    _FACILITY = 16

    def __init__(self, url: str, *, timeout_seconds: float = 10.0) -> None:
        parsed = urlparse(url)
        if parsed.hostname is None or parsed.port is None:
            raise ConfigError(f"syslog output needs host:port, got {url!r}")
        self._tcp = parsed.scheme == "syslog+tcp"
        self._host, self._port = parsed.hostname, parsed.port
        self._timeout = timeout_seconds
        self._writer: asyncio.StreamWriter | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._hostname = socket.gethostname()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), self._timeout)
        udp, self._udp = self._udp, None
        if udp is not None:
            udp.close()

    def format(self, event: Mapping[str, Any]) -> bytes:
        """One RFC 5424 message: structured data carries the ids, the MSG the OCSF JSON."""
        severity = 4 if is_deny(event) else 6
        ts = datetime.fromtimestamp(event["time"] / 1000, tz=UTC).isoformat(timespec="milliseconds")
        uid = str(event["metadata"]["uid"]).replace("]", "").replace('"', "")
        sd = f'[chio@32473 uid="{uid}" action="{event["action"]}"]'
        msg = json.dumps(event, separators=(",", ":"))
        head = (
            f"<{self._FACILITY * 8 + severity}>1 {ts} {self._hostname} chio-receipts - ocsf {sd} "
        )
        return head.encode() + b"\xef\xbb\xbf" + msg.encode()

    async def send(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Send every event; TCP waits for the bytes to drain."""
        try:
            if self._tcp:
                writer = self._writer
                if writer is None:
                    _, opened = await asyncio.wait_for(
                        asyncio.open_connection(self._host, self._port), self._timeout
                    )
                    self._writer = writer = opened
                for e in events:
                    data = self.format(e)
                    writer.write(str(len(data)).encode() + b" " + data)
                await asyncio.wait_for(writer.drain(), self._timeout)
            else:
                if self._udp is None:
                    loop = asyncio.get_running_loop()
                    self._udp, _ = await loop.create_datagram_endpoint(
                        asyncio.DatagramProtocol, remote_addr=(self._host, self._port)
                    )
                for e in events:
                    self._udp.sendto(self.format(e))
        except (OSError, TimeoutError) as exc:
            await self._close()
            raise OutputUnavailable(f"syslog: {type(exc).__name__}: {exc}") from exc


def make_output(spec: OutputSpec) -> Output:
    """The output object for ``spec``."""
    if spec.kind == "jsonl":
        return JsonLinesOutput(spec.target)
    if spec.kind == "hec":
        return HecOutput(spec.target, spec.token or "", index=spec.index)
    if spec.kind == "elastic":
        return ElasticOutput(spec.target, index=spec.index)
    return SyslogOutput(spec.target)


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFilter:
    """Which events to export. A denial always passes unless ``drop_denies`` is set."""

    deny_only: bool = False
    tool_servers: frozenset[str] | None = None
    drop_denies: bool = False

    def keep(self, event: Mapping[str, Any]) -> bool:
        """True when ``event`` is exported."""
        if is_deny(event):
            return not self.drop_denies
        if self.deny_only:
            return False
        if self.tool_servers is not None:
            return str(event.get("api", {}).get("service", {}).get("name")) in self.tool_servers
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class ExporterConfig:
    """Configuration of ``chio-receipts siem-export``."""

    bootstrap_servers: str
    output: OutputSpec
    group_id: str = "chio-siem-exporter"
    steps_topic: str = "chio.receipts.steps.v1"
    envelopes_topic: str | None = None
    deny_only: bool = False
    drop_denies: bool = False
    tool_servers: frozenset[str] | None = None
    batch_size: int = 500
    poll_timeout_ms: int = 200
    retry_initial_seconds: float = 0.2
    retry_max_seconds: float = 10.0
    registry_url: str | None = None


class SiemExporter:
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
        self._consumer: AIOKafkaConsumer | None = None
        self._entered = False
        self._registry: SchemaRegistryClient | None = None
        self._codec: Codec | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the output and the consumer. Idempotent."""
        if self._consumer is not None:
            return
        await self.output.__aenter__()
        self._entered = True
        if self._config.registry_url:
            self._registry = SchemaRegistryClient(self._config.registry_url)
            self._codec = Codec(self._registry)
        topics = [self._config.steps_topic]
        if self._config.envelopes_topic:
            topics.append(self._config.envelopes_topic)
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=self._config.bootstrap_servers,
            group_id=self._config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await self.stop()
            raise ConsumerError(f"cannot start the SIEM exporter: {exc}") from exc
        self._consumer = consumer

    async def stop(self) -> None:
        """Close the consumer and the output. Idempotent."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(KafkaError):
                await asyncio.wait_for(consumer.stop(), 30)
        if self._entered:
            self._entered = False
            await self.output.__aexit__(None, None, None)
        registry, self._registry = self._registry, None
        if registry is not None:
            await registry.aclose()
        self._codec = None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Export until ``stop`` is set."""
        while stop is None or not stop.is_set():
            await self.run_once()

    async def run_once(self) -> int:
        """One poll: map, filter, deliver (retrying), commit; returns events delivered."""
        consumer = self._consumer
        if consumer is None:
            raise ConsumerError("the SIEM exporter is not started")
        data = await consumer.getmany(
            timeout_ms=self._config.poll_timeout_ms, max_records=self._config.batch_size
        )
        if not data:
            return 0
        events: list[dict[str, Any]] = []
        for records in data.values():
            for msg in records:
                await self._fetch_writer_schema(msg.value)
                event = self._map(msg)
                if event is not None and self._filter.keep(event):
                    events.append(event)
        if events:
            await self._deliver(events)
        try:
            await consumer.commit(
                {tp: records[-1].offset + 1 for tp, records in data.items() if records}
            )
        except KafkaError as exc:
            _log.warning("commit failed (%s); the batch will be exported again", exc)
        return len(events)

    async def _fetch_writer_schema(self, value: bytes | None) -> None:
        codec = self._codec
        if codec is None or not value or value[:1] != b"\x00":
            return
        delay = self._config.retry_initial_seconds
        while True:
            try:
                await codec.decode_async(value)  # caches the writer schema by id
            except DecodeError:
                return
            except RegistryError as exc:
                _log.warning("schema registry unavailable (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._config.retry_max_seconds)
                continue
            return

    def _map(self, msg: Any) -> dict[str, Any] | None:
        try:
            plain = decode_plain(msg.value or b"", self._codec)
        except DecodeError as exc:
            # The builder dead-letters these; the exporter only skips them.
            _log.warning("skipping undecodable message %s@%d: %s", msg.topic, msg.offset, exc)
            return None
        if plain.schema_name == STEP_SCHEMA:
            return step_to_ocsf(plain.record)
        if plain.schema_name == ENVELOPE_SCHEMA:
            return envelope_to_ocsf(plain.record)
        return None

    async def _deliver(self, events: list[dict[str, Any]]) -> None:
        delay = self._config.retry_initial_seconds
        while True:
            try:
                await self.output.send(events)
            except OutputUnavailable as exc:
                _log.warning(
                    "output %s unavailable (%s); retry in %.1fs", self.output.name, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._config.retry_max_seconds)
                continue
            self.metrics.exported.labels(self.output.name).inc(len(events))
            return
