"""The chio policy sidecar: capabilities, attenuation, decisions and Ed25519-signed receipts.

:class:`LocalSidecar` is the engine, in process; a worker can use it directly, since it has the
methods of the interceptor's ``Evaluator`` protocol. It keeps its state in a
:class:`SidecarStore` (SQLite: capabilities, revocations, public keys, a hash-chained receipt
log; ``:memory:`` by default). :class:`DataDir` is the served sidecar's data directory: the
store, the signing key's seed file (key ids derived from public keys, :func:`key_id_for`), and
the lock of the serving process; :func:`rotate_key` makes a new signing key and keeps the old
public keys.
:func:`create_sidecar_app` serves it over HTTP (Starlette), :class:`SidecarServer` runs that app
inside an event loop and :func:`serve_sidecar` as a process (uvicorn; the ``chio-receipts
sidecar serve`` command). :func:`openapi_document` describes the API; it is built from the same
typed models that validate request bodies. :class:`SidecarMetrics` holds its Prometheus metrics
(a private registry per app unless one is shared), served at ``GET /metrics``.
Access is by named credentials (``CredentialSet``: a file of names, roles and secret hashes) and
one route → role table (``ROUTE_ROLES``), enforced before any route runs.

Guards decide inside the grants: :class:`ConstraintGuard` (the grant's Chio constraints) and
:class:`CedarGuard` (a :class:`CedarPolicySet` loaded from ``.cedar`` files, reloaded by
:class:`PolicyReloader`); :func:`build_guards` makes both and their ``policy_hash``.

The wire objects (capability tokens, evaluation requests, signed receipts) are the contract's,
in ``chio_receipts.schemas``; this package and the worker's ``chio_receipts.interceptor`` never
import each other.
"""

from __future__ import annotations

from chio_receipts.sidecar._access import ROUTE_ROLES, check_bind, roles_for
from chio_receipts.sidecar._api import openapi_document
from chio_receipts.sidecar._app import DEFAULT_MAX_BODY, create_sidecar_app
from chio_receipts.sidecar._auth import (
    Credential,
    CredentialError,
    CredentialSet,
    Role,
    add_credential,
    credential_of,
    load_credentials,
    remove_credential,
)
from chio_receipts.sidecar._cedar import (
    CedarGuard,
    CedarPolicySet,
    PolicyError,
    PolicyProblem,
    PolicyReloader,
    build_guards,
    policy_hash,
    validate_policy_path,
)
from chio_receipts.sidecar._constraints import ConstraintGuard
from chio_receipts.sidecar._datadir import DataDir, Rotation, key_id_for, rotate_key
from chio_receipts.sidecar._errors import (
    InvalidCapability,
    ScopeWidening,
    SidecarError,
    StoreError,
    UnknownCapability,
)
from chio_receipts.sidecar._local import LocalSidecar
from chio_receipts.sidecar._metrics import SidecarMetrics
from chio_receipts.sidecar._server import SidecarServer, serve_sidecar
from chio_receipts.sidecar._store import LogReport, SidecarStore, StoredKey

__all__ = [
    "DEFAULT_MAX_BODY",
    "ROUTE_ROLES",
    "CedarGuard",
    "CedarPolicySet",
    "ConstraintGuard",
    "Credential",
    "CredentialError",
    "CredentialSet",
    "DataDir",
    "InvalidCapability",
    "LocalSidecar",
    "LogReport",
    "PolicyError",
    "PolicyProblem",
    "PolicyReloader",
    "Role",
    "Rotation",
    "ScopeWidening",
    "SidecarError",
    "SidecarMetrics",
    "SidecarServer",
    "SidecarStore",
    "StoreError",
    "StoredKey",
    "UnknownCapability",
    "add_credential",
    "build_guards",
    "check_bind",
    "create_sidecar_app",
    "credential_of",
    "key_id_for",
    "load_credentials",
    "openapi_document",
    "policy_hash",
    "remove_credential",
    "roles_for",
    "rotate_key",
    "serve_sidecar",
    "validate_policy_path",
]
