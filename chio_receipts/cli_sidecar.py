"""``chio-receipts sidecar``: serve the policy sidecar over HTTP; list and rotate its keys; add,
list and remove its named credentials."""

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
from chio_receipts._temporal import TemporalConnection
from chio_receipts._temporal_options import temporal_options
from chio_receipts.sidecar import (
    DEFAULT_MAX_BODY,
    CredentialSet,
    DataDir,
    LocalSidecar,
    PolicyError,
    PolicyReloader,
    Role,
    SidecarError,
    SidecarMetrics,
    add_credential,
    build_guards,
    check_bind,
    load_credentials,
    remove_credential,
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
credential_app = typer.Typer(
    help="The sidecar's named credentials (name, role, hash of the secret): add, list, remove.",
    no_args_is_help=True,
)
app.add_typer(credential_app, name="credential")
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


CredentialsFileOption = Annotated[
    Path,
    typer.Option(
        "--file",
        envvar="CHIO_SIDECAR_CREDENTIALS",
        dir_okay=False,
        help="The credentials file (CHIO_SIDECAR_CREDENTIALS).",
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
@temporal_options
def serve(
    *,
    temporal: TemporalConnection,
    approval_signals: Annotated[
        bool,
        typer.Option(
            envvar="CHIO_APPROVAL_SIGNALS",
            help="Signal an answered approval to its waiting workflow (Temporal flags).",
        ),
    ] = True,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 9090,
    credentials: Annotated[
        Path | None,
        typer.Option(
            "--credentials",
            envvar="CHIO_SIDECAR_CREDENTIALS",
            dir_okay=False,
            help="Credentials file (names, roles, secret hashes; made by 'sidecar credential "
            "add'). Callers send 'Authorization: Bearer <secret>' (CHIO_SIDECAR_CREDENTIALS).",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="CHIO_SIDECAR_TOKEN",
            help="Deprecated: one shared secret, accepted as the admin credential 'token' "
            "(CHIO_SIDECAR_TOKEN). Use --credentials.",
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
    /metrics, and on --metrics-port when given. Anything but a loopback address needs
    --credentials; each route is open to the roles of the access table.
    """
    use_log_level(log_level)
    log = logging.getLogger(__name__)
    if policy is not None:
        _check_policy(policy)
    accepted: CredentialSet | None = None
    try:
        if credentials is not None:
            accepted = CredentialSet(path=credentials)
        if token:
            log.warning("--token (CHIO_SIDECAR_TOKEN) is deprecated: use --credentials")
            if accepted is None:
                accepted = CredentialSet.from_token(token)
            else:
                accepted.add_token(token)
        check_bind(host, accepted)
    except SidecarError as exc:
        raise _fail(str(exc)) from None
    if accepted is None:
        log.info("no credentials: loopback callers only, each as the admin 'local'")
    else:
        log.info("access by %d named credential(s)", len(accepted))
    metrics = SidecarMetrics()
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)
    if ephemeral:
        memory = LocalSidecar()
        _signal_approvals(memory, temporal if approval_signals else None)
        memory_policies = _use_policy(memory, policy, metrics)

        def reload_policy() -> None:
            memory_policies.reload()

        asyncio.run(
            serve_sidecar(
                memory,
                host=host,
                port=port,
                credentials=accepted,
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
        _signal_approvals(sidecar, temporal if approval_signals else None)
        policies = _use_policy(sidecar, policy, metrics)

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
                credentials=accepted,
                data_dir=directory,
                max_body_bytes=max_body_bytes,
                log_level=log_level.lower(),
                on_reload=reload,
                metrics=metrics,
            )
        )


def _signal_approvals(sidecar: LocalSidecar, temporal: TemporalConnection | None) -> None:
    """Answered approvals reach their workflows as a Temporal signal (approvals block)."""
    if temporal is not None:
        from chio_receipts.sidecar._approvals import TemporalSignaller

        sidecar.approvals.signaller = TemporalSignaller(temporal.connect)


def _check_policy(path: Path) -> None:
    problems = validate_policy_path(path)
    if problems:
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)


def _use_policy(
    sidecar: LocalSidecar, path: Path | None, metrics: SidecarMetrics
) -> PolicyReloader:
    """The constraints guard and, with ``path``, the Cedar guard, installed in ``sidecar``;
    each reload is counted in ``metrics``."""
    policies = PolicyReloader(
        sidecar, path, on_reload=lambda result: metrics.policy_reloaded(result == "ok")
    )
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


@credential_app.command("add")
def credential_add(
    name: Annotated[str, typer.Argument(help="The credential's name (recorded as the caller).")],
    role: Annotated[Role, typer.Option("--role", help="What it may do.", case_sensitive=False)],
    file: CredentialsFileOption,
) -> None:
    """Make a credential: a new 256-bit secret, printed once on stdout; the file keeps its hash.

    Give the secret to its holder (for example CHIO_SIDECAR_TOKEN of a worker); it is never
    shown again. A serving sidecar picks up the change within a second.
    """
    try:
        secret = add_credential(file, name, role)
    except SidecarError as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"credential {name!r} ({role.value}) added to {file}; its secret, shown once:", err=True
    )
    sys.stdout.write(secret + "\n")


@credential_app.command("list")
def credential_list(file: CredentialsFileOption) -> None:
    """Print the credentials' names, roles and creation times (never a secret or a hash)."""
    try:
        rows = load_credentials(file)
    except SidecarError as exc:
        raise _fail(str(exc)) from None
    for row in rows:
        typer.echo(f"{row.name}  {row.role.value:<11}  {row.created_at}")


@credential_app.command("remove")
def credential_remove(
    name: Annotated[str, typer.Argument(help="The credential to remove.")],
    file: CredentialsFileOption,
) -> None:
    """Remove a credential: its secret stops working (on a serving sidecar within a second)."""
    try:
        removed = remove_credential(file, name)
    except SidecarError as exc:
        raise _fail(str(exc)) from None
    if not removed:
        raise _fail(f"no credential named {name!r} in {file}")
    typer.echo(f"credential {name!r} removed from {file}")


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
