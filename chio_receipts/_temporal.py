"""One Temporal connection settings object, from which every Temporal client of the CLI is built.

``TemporalConnection`` holds the frontend address, the namespace and the security settings (TLS
files, server name, API key). :meth:`TemporalConnection.connect_kwargs` turns it into the keyword
arguments of ``temporalio.client.Client.connect``; an API key implies TLS, as Temporal Cloud
requires. The API key never appears in ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio.client import Client, TLSConfig

from chio_receipts.schemas import ContractError, Secret

__all__ = ["TemporalConnection"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TemporalConnection:
    """Where the Temporal frontend is and how to authenticate to it.

    TLS is used when ``tls`` is set or any TLS setting or the API key is given; without
    ``tls_ca`` the system trust store checks the server. A client certificate (mTLS) is
    ``tls_cert`` and ``tls_key``, both PEM files.
    """

    address: str = "127.0.0.1:7233"
    namespace: str = "default"
    tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_server_name: str | None = None
    api_key: Secret | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ContractError("a Temporal TLS client certificate needs both its cert and key")

    @property
    def uses_tls(self) -> bool:
        """True when the connection is encrypted."""
        return (
            self.tls
            or self.api_key is not None
            or self.tls_cert is not None
            or self.tls_ca is not None
            or self.tls_server_name is not None
        )

    def tls_config(self) -> TLSConfig | None:
        """The TLS settings of this connection (reads the PEM files), or None for plaintext."""
        if not self.uses_tls:
            return None
        try:
            return TLSConfig(
                server_root_ca_cert=_read(self.tls_ca),
                domain=self.tls_server_name,
                client_cert=_read(self.tls_cert),
                client_private_key=_read(self.tls_key),
            )
        except OSError as exc:
            raise ContractError(f"cannot read a Temporal TLS file: {exc}") from exc

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Client.connect`` besides the address."""
        kwargs: dict[str, Any] = {"namespace": self.namespace}
        tls = self.tls_config()
        if tls is not None:
            kwargs["tls"] = tls
        if self.api_key is not None:
            kwargs["api_key"] = self.api_key.reveal()
        return kwargs

    async def connect(self) -> Client:
        """A client connected to this frontend (callers bound the wait)."""
        return await Client.connect(self.address, **self.connect_kwargs())


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()
