"""One Kafka connection settings object, from which every Kafka client of the project is built.

``KafkaConnection`` holds the bootstrap servers and the security settings (TLS files, SASL
mechanism and credentials, extra client options). It is pure data: the streamer and the consumers
turn it into aiokafka clients with :meth:`KafkaConnection.client_kwargs`, so the worker side can
import the contract without importing a Kafka client. Secrets never appear in ``repr``.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from chio_receipts.schemas._errors import ContractError

__all__ = ["KafkaConnection", "SaslMechanism", "Secret", "SecurityProtocol"]

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
_PROTOCOLS: tuple[str, ...] = get_args(SecurityProtocol)
_MECHANISMS: tuple[str, ...] = get_args(SaslMechanism)


@dataclass(frozen=True, slots=True)
class Secret:
    """A string that never prints: ``repr`` and ``str`` show ``'***'``."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        """The secret itself, for the one place that sends it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaConnection:
    """Where the brokers are and how to authenticate to them.

    ``security_protocol`` follows Kafka's names. TLS (``SSL``, ``SASL_SSL``) uses the system trust
    store unless ``ssl_cafile`` is given; a client certificate is ``ssl_certfile`` and
    ``ssl_keyfile``. SASL (``SASL_PLAINTEXT``, ``SASL_SSL``) needs ``sasl_mechanism``,
    ``sasl_username`` and ``sasl_password``. ``client_options`` are passed to every aiokafka client
    as they are, after the settings above (escape hatch for anything else).
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: Secret | None = None
    ssl_check_hostname: bool = True
    request_timeout_ms: int = 30_000
    client_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.security_protocol not in _PROTOCOLS:
            raise ContractError(
                f"unknown Kafka security protocol {self.security_protocol!r}: "
                f"use one of {', '.join(_PROTOCOLS)}"
            )
        if self.sasl_mechanism is not None and self.sasl_mechanism not in _MECHANISMS:
            raise ContractError(
                f"unknown SASL mechanism {self.sasl_mechanism!r}: "
                f"use one of {', '.join(_MECHANISMS)}"
            )
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ContractError(
                f"security protocol {self.security_protocol} needs a SASL mechanism, user name "
                "and password"
            )
        if not sasl and self.sasl_mechanism is not None:
            raise ContractError(
                f"a SASL mechanism was given but the security protocol is "
                f"{self.security_protocol}: use SASL_PLAINTEXT or SASL_SSL"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ContractError("a TLS client certificate needs both its cert file and key file")

    @property
    def uses_tls(self) -> bool:
        """True when the connection is encrypted (``SSL`` or ``SASL_SSL``)."""
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of this connection, or None for a plaintext one."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            context.load_cert_chain(
                self.ssl_certfile,
                self.ssl_keyfile,
                password=None if self.ssl_key_password is None else self.ssl_key_password.reveal(),
            )
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        context = self.ssl_context()
        if context is not None:
            kwargs["ssl_context"] = context
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = (
                None if self.sasl_password is None else self.sasl_password.reveal()
            )
        kwargs.update(self.client_options)
        return kwargs
