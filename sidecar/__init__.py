"""The chio policy sidecar: capabilities, attenuation, decisions and Ed25519-signed receipts.

:class:`LocalSidecar` is the engine and its store, in process and free of I/O; a worker can use
it directly, since it has the methods of the interceptor's ``Evaluator`` protocol.
:func:`create_sidecar_app` serves it over HTTP (Starlette), :class:`SidecarServer` runs that app
inside an event loop and :func:`serve_sidecar` as a process (uvicorn; the ``chio-receipts
sidecar serve`` command). :func:`openapi_document` describes the API; it is built from the same
typed models that validate request bodies.

The wire objects (capability tokens, evaluation requests, signed receipts) are the contract's,
in ``chio_receipts.schemas``; this package and the worker's ``chio_receipts.interceptor`` never
import each other.
"""

from __future__ import annotations

from chio_receipts.sidecar._api import openapi_document
from chio_receipts.sidecar._app import DEFAULT_MAX_BODY, create_sidecar_app
from chio_receipts.sidecar._errors import (
    InvalidCapability,
    ScopeWidening,
    SidecarError,
    UnknownCapability,
)
from chio_receipts.sidecar._local import LocalSidecar
from chio_receipts.sidecar._server import SidecarServer, serve_sidecar

__all__ = [
    "DEFAULT_MAX_BODY",
    "InvalidCapability",
    "LocalSidecar",
    "ScopeWidening",
    "SidecarError",
    "SidecarServer",
    "UnknownCapability",
    "create_sidecar_app",
    "openapi_document",
    "serve_sidecar",
]
