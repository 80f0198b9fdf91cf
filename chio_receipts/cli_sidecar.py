"""``chio-receipts sidecar``: serve the policy sidecar over HTTP; list and rotate its keys."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from prometheus_client import start_http_server

from chio_receipts._config import load_config
from chio_receipts._logging import use_level as use_log_level
from chio_receipts._options import DEFAULT_METRICS_HOST, MetricsHost, MetricsPort
from chio_receipts.sidecar import (
    DEFAULT_MAX_BODY,
    DataDir,
    LocalSidecar,
    PolicyError,
    PolicyReloader,
    SidecarError,
    SidecarMetrics,
    build_guards,
    rotate_key,
    serve_sidecar,
    validate_policy_path,
)

__all__ = ["app"]

app = typer.Typer(
    help="The chio policy sidecar: capabilities, attenuation and Ed25519-signed receipts.",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="The sidecar's signing keys: list the public keys, rotate the signing key.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
policy_app = typer.Typer(
    help="The sidecar's Cedar policies: validate them against the shipped schema.",
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="CHIO_SIDECAR_DATA_DIR",
        file_okay=False,
        help="Directory of the sidecar's state and signing key "
        "(CHIO_SIDECAR_DATA_DIR; default: <CHIO_DATA_DIR>/sidecar).",
        show_default=False,
    ),
]


@app.callback()
def main() -> None:
    """The chio policy sidecar."""


def _data_dir(path: Path | None) -> DataDir:
    return DataDir(path if path is not None else load_config().data_dir / "sidecar")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


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
    data_dir: DataDirOption = None,
    ephemeral: Annotated[
        bool,
        typer.Option(
            help="Keep nothing: state in memory and a fresh signing key, lost on exit.",
        ),
    ] = False,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest accepted request body.", min=1024)
    ] = DEFAULT_MAX_BODY,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = DEFAULT_METRICS_HOST,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            envvar="CHIO_SIDECAR_POLICY",
            help="Cedar policies (a .cedar file or a directory of them) decided inside the "
            "grants; SIGHUP reloads them (CHIO_SIDECAR_POLICY).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the policy sidecar API (OpenAPI at /openapi.json) until interrupted.

    State (capabilities, revocations, public keys, the receipt log) and the signing key live in
    the data directory and survive restarts; SIGHUP loads a key made by ``sidecar keys rotate``
    and reloads the --policy set (a set that does not load leaves the old one active).
    Every call is checked against its grant's Chio constraints. Prometheus metrics are at
    /metrics, and on --metrics-port when given.
    """
    use_log_level(log_level)
    log = logging.getLogger(__name__)
    if policy is not None:
        _check_policy(policy)
    if host not in ("127.0.0.1", "::1", "localhost") and token is None:
        log.warning(
            "serving on %s without a bearer token: anyone who can reach it can mint capabilities",
            host,
        )
    metrics = SidecarMetrics()
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)
    if ephemeral:
        sidecar = LocalSidecar()
        policies = _use_policy(sidecar, policy)

        def reload_policy() -> None:
            policies.reload()

        asyncio.run(
            serve_sidecar(
                sidecar,
                host=host,
                port=port,
                token=token,
                max_body_bytes=max_body_bytes,
                log_level=log_level.lower(),
                on_reload=reload_policy,
                metrics=metrics,
            )
        )
        return
    with _data_dir(data_dir) as directory:
        try:
            directory.lock()
            sidecar = LocalSidecar(directory.signing_key(), store=directory.store)
        except SidecarError as exc:
            raise _fail(str(exc)) from None
        log.info("sidecar data directory %s, signing key %s", directory.path, sidecar.key_id)
        policies = _use_policy(sidecar, policy)

        def reload() -> None:
            policies.reload()
            key = directory.signing_key()
            if key.key_id != sidecar.key_id:
                sidecar.use_key(key)
                log.info("signing key is now %s", key.key_id)

        asyncio.run(
            serve_sidecar(
                sidecar,
                host=host,
                port=port,
                token=token,
                max_body_bytes=max_body_bytes,
                log_level=log_level.lower(),
                on_reload=reload,
                metrics=metrics,
            )
        )


def _check_policy(path: Path) -> None:
    problems = validate_policy_path(path)
    if problems:
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)


def _use_policy(sidecar: LocalSidecar, path: Path | None) -> PolicyReloader:
    """The constraints guard and, with ``path``, the Cedar guard, installed in ``sidecar``."""
    policies = PolicyReloader(sidecar, path)
    try:
        digest = policies.load()
    except PolicyError as exc:
        raise _fail(str(exc)) from None
    logging.getLogger(__name__).info("policy_hash %s", digest)
    return policies


@policy_app.command("validate")
def validate_policy(
    path: Annotated[Path, typer.Argument(help="A .cedar file or a directory of .cedar files.")],
) -> None:
    """Check Cedar policies against the sidecar's schema: exit 0 when they load, else 1 with
    each problem's file, policy and reason."""
    problems = validate_policy_path(path)
    if problems:
        for problem in problems:
            typer.echo(f"FAIL: {problem}")
        raise typer.Exit(1)
    _, digest = build_guards(path)
    typer.echo(f"OK: {path} loads and validates; policy_hash {digest}")


@keys_app.command("list")
def list_keys(
    data_dir: DataDirOption = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the /v1/keys document (usable as the builder's keys file)."
        ),
    ] = False,
) -> None:
    """Print the key ids and public keys (hex) of the sidecar, current first. No secret."""
    with _data_dir(data_dir) as directory:
        if not directory.path.is_dir():
            raise _fail(f"no sidecar data directory at {directory.path}")
        try:
            keys = directory.store.keys()
        except SidecarError as exc:
            raise _fail(str(exc)) from None
    keys.sort(key=lambda k: (k.retired_at is not None, -(k.retired_at or 0)))
    if as_json:
        current = next((k.key_id for k in keys if k.retired_at is None), None)
        document = {
            "current": current,
            "keys": [
                {"key_id": k.key_id, "algorithm": "Ed25519", "public_key": k.public_key.hex()}
                for k in keys
            ],
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    for k in keys:
        state = "current" if k.retired_at is None else "retired"
        typer.echo(f"{k.key_id}  {state:<7}  {k.public_key.hex()}")


@keys_app.command("rotate")
def rotate(
    data_dir: DataDirOption = None,
    signal_server: Annotated[
        bool,
        typer.Option(
            "--signal/--no-signal",
            help="Send SIGHUP to the sidecar serving the directory, so it signs with the new "
            "key at once (else: from its next start).",
        ),
    ] = True,
) -> None:
    """Make a new signing key; the old public keys stay published so earlier receipts verify."""
    with _data_dir(data_dir) as directory:
        if not directory.path.is_dir():
            raise _fail(f"no sidecar data directory at {directory.path}")
        try:
            done = rotate_key(directory, signal_server=signal_server)
        except SidecarError as exc:
            raise _fail(str(exc)) from None
    typer.echo(f"rotated {done.old_key_id} -> {done.new_key_id}  {done.new_public_key.hex()}")
    if done.signalled_pid is not None:
        typer.echo(f"the serving sidecar (pid {done.signalled_pid}) was sent SIGHUP")
    else:
        typer.echo("no sidecar serves this directory now: the new key is used from its next start")


@app.command("verify-log")
def verify_log(data_dir: DataDirOption = None) -> None:
    """Check the sidecar's receipt log: hash chain, content hashes, signatures."""
    with _data_dir(data_dir) as directory:
        if not directory.path.is_dir():
            raise _fail(f"no sidecar data directory at {directory.path}")
        try:
            report = directory.store.verify_log()
        except SidecarError as exc:
            raise _fail(str(exc)) from None
    if report.ok:
        typer.echo(f"OK: {report.rows} receipt(s) in the log, chain and signatures hold")
        return
    for problem in report.problems:
        typer.echo(f"FAIL: {problem}")
    raise typer.Exit(1)
