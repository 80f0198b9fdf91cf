"""The Kafka connection options every command that talks to Kafka takes, declared once.

``@kafka_options`` replaces a command's ``kafka: KafkaConnection`` parameter by the flags below
(each with its environment variable) and builds the :class:`KafkaConnection` from them, so every
command is ready for a secured cluster with the same flags:

    --bootstrap                 CHIO_KAFKA_BOOTSTRAP
    --kafka-security-protocol   CHIO_KAFKA_SECURITY_PROTOCOL   PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL
    --kafka-sasl-mechanism      CHIO_KAFKA_SASL_MECHANISM      PLAIN|SCRAM-SHA-256|SCRAM-SHA-512
    --kafka-sasl-username       CHIO_KAFKA_SASL_USERNAME
    (password)                  CHIO_KAFKA_SASL_PASSWORD       environment only
    --kafka-ssl-cafile          CHIO_KAFKA_SSL_CAFILE
    --kafka-ssl-certfile        CHIO_KAFKA_SSL_CERTFILE
    --kafka-ssl-keyfile         CHIO_KAFKA_SSL_KEYFILE
    (key password)              CHIO_KAFKA_SSL_KEY_PASSWORD    environment only
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from chio_receipts._options import option_group
from chio_receipts.schemas import ContractError, KafkaConnection, Secret

__all__ = ["kafka_options"]

_OPTIONS: dict[str, tuple[Any, Any]] = {
    "bootstrap": (
        Annotated[
            str,
            typer.Option(
                "--bootstrap", envvar="CHIO_KAFKA_BOOTSTRAP", help="Kafka bootstrap servers."
            ),
        ],
        "127.0.0.1:9092",
    ),
    "kafka_security_protocol": (
        Annotated[
            str,
            typer.Option(
                envvar="CHIO_KAFKA_SECURITY_PROTOCOL",
                help="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
            ),
        ],
        "PLAINTEXT",
    ),
    "kafka_sasl_mechanism": (
        Annotated[
            str | None,
            typer.Option(
                envvar="CHIO_KAFKA_SASL_MECHANISM",
                help="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (password: CHIO_KAFKA_SASL_PASSWORD).",
            ),
        ],
        None,
    ),
    "kafka_sasl_username": (
        Annotated[str | None, typer.Option(envvar="CHIO_KAFKA_SASL_USERNAME")],
        None,
    ),
    "kafka_ssl_cafile": (
        Annotated[
            str | None,
            typer.Option(envvar="CHIO_KAFKA_SSL_CAFILE", help="CA bundle that signs the brokers."),
        ],
        None,
    ),
    "kafka_ssl_certfile": (
        Annotated[
            str | None,
            typer.Option(
                envvar="CHIO_KAFKA_SSL_CERTFILE",
                help="Client certificate (key password: CHIO_KAFKA_SSL_KEY_PASSWORD).",
            ),
        ],
        None,
    ),
    "kafka_ssl_keyfile": (
        Annotated[str | None, typer.Option(envvar="CHIO_KAFKA_SSL_KEYFILE")],
        None,
    ),
}


def _secret(variable: str) -> Secret | None:
    value = os.environ.get(variable)
    return Secret(value) if value else None


def connection_from_options(values: dict[str, Any]) -> KafkaConnection:
    """The :class:`KafkaConnection` the flags describe; a bad combination is a usage error."""
    try:
        return KafkaConnection(
            bootstrap_servers=values["bootstrap"],
            security_protocol=values["kafka_security_protocol"].upper(),
            sasl_mechanism=values["kafka_sasl_mechanism"]
            and values["kafka_sasl_mechanism"].upper(),
            sasl_username=values["kafka_sasl_username"],
            sasl_password=_secret("CHIO_KAFKA_SASL_PASSWORD"),
            ssl_cafile=values["kafka_ssl_cafile"],
            ssl_certfile=values["kafka_ssl_certfile"],
            ssl_keyfile=values["kafka_ssl_keyfile"],
            ssl_key_password=_secret("CHIO_KAFKA_SSL_KEY_PASSWORD"),
        )
    except ContractError as exc:
        raise typer.BadParameter(str(exc)) from exc


kafka_options = option_group("kafka", _OPTIONS, connection_from_options)
"""Give a command the Kafka flags; it receives them as ``kafka: KafkaConnection``."""
