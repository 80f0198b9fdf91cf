"""Serving the sidecar's app with uvicorn: embedded in a running loop, or as the process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Generator

import uvicorn

from chio_receipts.schemas import AsyncService
from chio_receipts.sidecar._access import check_bind
from chio_receipts.sidecar._app import DEFAULT_MAX_BODY, create_sidecar_app
from chio_receipts.sidecar._auth import CredentialSet, with_token
from chio_receipts.sidecar._datadir import DataDir
from chio_receipts.sidecar._errors import SidecarError
from chio_receipts.sidecar._local import LocalSidecar
from chio_receipts.sidecar._metrics import SidecarMetrics

__all__ = ["SidecarServer", "serve_sidecar"]

_log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without signal capture: the embedding process owns its signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class SidecarServer(AsyncService):
    """Serve a :class:`LocalSidecar` over HTTP inside the running event loop.

    An idempotent async context manager. ``port=0`` picks a free port; the bound port stays the
    same across :meth:`stop` / :meth:`start`, so a client can see the sidecar go away and come
    back. Listens on 127.0.0.1 unless told otherwise; any other address needs ``credentials``
    (:class:`SidecarError` otherwise). ``token`` is the deprecated shared token (the admin
    credential ``token``).
    """

    def __init__(
        self,
        sidecar: LocalSidecar,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        credentials: CredentialSet | None = None,
        data_dir: DataDir | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        shutdown_timeout: float = 5.0,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        credentials = with_token(credentials, token)
        check_bind(host, credentials)
        self.sidecar = sidecar
        self.host = host
        self.port = port
        self.metrics = metrics if metrics is not None else SidecarMetrics()
        """What ``GET /metrics`` serves (a private registry unless one is given)."""
        self._app = create_sidecar_app(
            sidecar,
            credentials=credentials,
            data_dir=data_dir,
            max_body_bytes=max_body_bytes,
            metrics=self.metrics,
        )
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._shutdown_timeout = shutdown_timeout

    def __repr__(self) -> str:
        return f"SidecarServer({self.url!r}, running={self.running})"

    @property
    def url(self) -> str:
        """Base URL of the served API."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the server task runs."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Bind and start serving (no-op when running)."""
        if self.running:
            return
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto
        # says TCP, and without it every response waits ~40 ms on Nagle + delayed ACK.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=5
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(10):
                while not server.started:
                    if self._task.done():
                        await self._task
                        raise SidecarError("the sidecar server stopped during startup")
                    await asyncio.sleep(0.01)
        finally:
            if not server.started:
                sock.close()

    async def stop(self) -> None:
        """Stop serving and close connections (idempotent, bounded by ``shutdown_timeout``)."""
        server, task = self._server, self._task
        self._server, self._task = None, None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            async with asyncio.timeout(self._shutdown_timeout):
                await task
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def serve_sidecar(
    sidecar: LocalSidecar,
    *,
    host: str = "127.0.0.1",
    port: int = 9090,
    token: str | None = None,
    credentials: CredentialSet | None = None,
    data_dir: DataDir | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    log_level: str = "info",
    on_reload: Callable[[], None] | None = None,
    metrics: SidecarMetrics | None = None,
) -> None:
    """Serve ``sidecar`` until SIGINT/SIGTERM (the ``sidecar serve`` command).

    ``on_reload`` runs on SIGHUP, on the event loop between requests (``sidecar keys rotate``
    sends it so the new signing key is used at once); a failed reload is logged and the
    sidecar keeps its current key. ``metrics`` is what ``GET /metrics`` serves (the caller may
    serve its registry on a port of its own too). uvicorn installs no handlers of its own: its
    records go to the root logger, in the one format the process chose. ``credentials`` (and the
    deprecated ``token``) are what the access middleware accepts; binding anything but loopback
    without them is refused (:class:`SidecarError`). ``data_dir`` is where ``POST
    /v1/keys/rotate`` records the new key.
    """
    credentials = with_token(credentials, token)
    check_bind(host, credentials)
    app = create_sidecar_app(
        sidecar,
        credentials=credentials,
        data_dir=data_dir,
        max_body_bytes=max_body_bytes,
        metrics=metrics,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,
        lifespan="off",
        timeout_keep_alive=5,
    )
    loop = asyncio.get_running_loop()
    if on_reload is not None:

        def reload() -> None:
            try:
                on_reload()
            except SidecarError:
                _log.exception("reload on SIGHUP failed; the current signing key stays in use")

        loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await uvicorn.Server(config).serve()
    finally:
        if on_reload is not None:
            loop.remove_signal_handler(signal.SIGHUP)
