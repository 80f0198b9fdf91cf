"""``chio-receipts sidecar``: serve the in-process policy sidecar over HTTP."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from chio_receipts.schemas import KeyPair
from chio_receipts.sidecar import DEFAULT_MAX_BODY, LocalSidecar, serve_sidecar

__all__ = ["app"]

app = typer.Typer(
    help="The chio policy sidecar: capabilities, attenuation and Ed25519-signed receipts.",
    no_args_is_help=True,
)


@app.callback()
def main() -> None:
    """The chio policy sidecar."""


def _load_key(seed_file: Path | None, key_id: str) -> KeyPair:
    if seed_file is None:
        return KeyPair.generate(key_id)
    text = seed_file.read_text("utf-8").strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise typer.BadParameter("the key seed file must hold 64 hex characters") from None
    if len(seed) != 32:
        raise typer.BadParameter("the key seed file must hold a 32-byte (64 hex) seed")
    return KeyPair.from_seed(key_id, seed)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 9090,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="CHIO_SIDECAR_TOKEN",
            help="Require 'Authorization: Bearer <token>' (read from CHIO_SIDECAR_TOKEN).",
            show_default=False,
        ),
    ] = None,
    key_seed_file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="File with the hex Ed25519 seed of the signing key; a fresh key if omitted.",
        ),
    ] = None,
    key_id: Annotated[str, typer.Option(help="Id of the signing key.")] = "sidecar-1",
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest accepted request body.", min=1024)
    ] = DEFAULT_MAX_BODY,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the policy sidecar API (OpenAPI at /openapi.json) until interrupted."""
    logging.basicConfig(level=log_level.upper())
    sidecar = LocalSidecar(_load_key(key_seed_file, key_id))
    if host not in ("127.0.0.1", "::1", "localhost") and token is None:
        logging.getLogger(__name__).warning(
            "serving on %s without a bearer token: anyone who can reach it can mint capabilities",
            host,
        )
    asyncio.run(
        serve_sidecar(
            sidecar,
            host=host,
            port=port,
            token=token,
            max_body_bytes=max_body_bytes,
            log_level=log_level.lower(),
        )
    )
