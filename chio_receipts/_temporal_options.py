"""The Temporal connection options every command that talks to Temporal takes, declared once.

``@temporal_options`` replaces a command's ``temporal: TemporalConnection`` parameter by the flags
below (each with its environment variable) and builds the :class:`TemporalConnection` from them:

    --temporal-address      CHIO_TEMPORAL_ADDRESS       host:port of the frontend
    --temporal-namespace    CHIO_TEMPORAL_NAMESPACE
    --temporal-tls          CHIO_TEMPORAL_TLS           TLS with the system trust store
    --temporal-tls-cert     CHIO_TEMPORAL_TLS_CERT      client certificate (PEM, mTLS)
    --temporal-tls-key      CHIO_TEMPORAL_TLS_KEY       its private key (PEM)
    --temporal-tls-ca       CHIO_TEMPORAL_TLS_CA        CA that signs the server (PEM)
    --temporal-tls-server-name CHIO_TEMPORAL_TLS_SERVER_NAME
    (API key)               CHIO_TEMPORAL_API_KEY       environment only; implies TLS

``--temporal`` and ``--namespace`` stay accepted as the older spellings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from chio_receipts._options import option_group
from chio_receipts._temporal import TemporalConnection
from chio_receipts.schemas import ContractError, Secret

__all__ = ["temporal_options"]


def _pem(flag: str, variable: str, help_text: str) -> tuple[Any, Any]:
    return (
        Annotated[
            Path | None,
            typer.Option(
                flag, envvar=variable, exists=True, dir_okay=False, readable=True, help=help_text
            ),
        ],
        None,
    )


_OPTIONS: dict[str, tuple[Any, Any]] = {
    "temporal_address": (
        Annotated[
            str,
            typer.Option(
                "--temporal-address",
                "--temporal",
                envvar="CHIO_TEMPORAL_ADDRESS",
                help="Temporal frontend host:port.",
            ),
        ],
        "127.0.0.1:7233",
    ),
    "temporal_namespace": (
        Annotated[
            str,
            typer.Option(
                "--temporal-namespace",
                "--namespace",
                envvar="CHIO_TEMPORAL_NAMESPACE",
                help="Temporal namespace.",
            ),
        ],
        "default",
    ),
    "temporal_tls": (
        Annotated[
            bool,
            typer.Option(
                "--temporal-tls",
                envvar="CHIO_TEMPORAL_TLS",
                help="Connect over TLS (implied by any other TLS flag and by "
                "CHIO_TEMPORAL_API_KEY).",
            ),
        ],
        False,
    ),
    "temporal_tls_cert": _pem(
        "--temporal-tls-cert", "CHIO_TEMPORAL_TLS_CERT", "Client certificate, PEM (mTLS)."
    ),
    "temporal_tls_key": _pem(
        "--temporal-tls-key", "CHIO_TEMPORAL_TLS_KEY", "Client private key, PEM (mTLS)."
    ),
    "temporal_tls_ca": _pem(
        "--temporal-tls-ca",
        "CHIO_TEMPORAL_TLS_CA",
        "CA that signs the server, PEM (default: system trust store).",
    ),
    "temporal_tls_server_name": (
        Annotated[
            str | None,
            typer.Option(
                "--temporal-tls-server-name",
                envvar="CHIO_TEMPORAL_TLS_SERVER_NAME",
                help="Server name to verify (default: the host of the address). "
                "API key: CHIO_TEMPORAL_API_KEY.",
            ),
        ],
        None,
    ),
}


def connection_from_options(values: dict[str, Any]) -> TemporalConnection:
    """The :class:`TemporalConnection` the flags describe; a bad combination is a usage error."""
    api_key = os.environ.get("CHIO_TEMPORAL_API_KEY")
    try:
        return TemporalConnection(
            address=values["temporal_address"],
            namespace=values["temporal_namespace"],
            tls=values["temporal_tls"],
            tls_cert=values["temporal_tls_cert"],
            tls_key=values["temporal_tls_key"],
            tls_ca=values["temporal_tls_ca"],
            tls_server_name=values["temporal_tls_server_name"],
            api_key=Secret(api_key) if api_key else None,
        )
    except ContractError as exc:
        raise typer.BadParameter(str(exc)) from exc


temporal_options = option_group("temporal", _OPTIONS, connection_from_options)
"""Give a command the Temporal flags; it receives them as ``temporal: TemporalConnection``."""
