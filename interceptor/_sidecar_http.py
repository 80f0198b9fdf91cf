"""``HttpSidecar``: the evaluator protocol over HTTP (httpx), for a remote policy sidecar.

One pooled ``httpx.AsyncClient`` per instance, explicit timeouts, bounded retries
(``schemas.retry_async``: exponential backoff with full jitter) on connection-level errors only.
httpx errors never escape: they become :class:`~interceptor.ChioSidecarUnavailable` (retry
later) or :class:`~interceptor.ChioSidecarRejected` (the request is wrong). Every returned
receipt is checked: its wire body must be the canonical encoding of the returned fields, its
signature must verify under the sidecar's published keys, and the Chio kernel receipt it carries
must pass ``schemas.check_chio_step`` under those keys.

The sidecar credential's secret (``token=``, or ``CHIO_SIDECAR_TOKEN`` when not given) is sent
as ``Authorization: Bearer`` and never printed or logged.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import httpx

from chio_receipts.interceptor._errors import (
    ChioSidecarError,
    ChioSidecarProtocolError,
    ChioSidecarRejected,
    ChioSidecarUnavailable,
    ChioTemporalConfigError,
    ScopeWidening,
    UnknownCapability,
)
from chio_receipts.interceptor._http_pool import PooledHttpClient
from chio_receipts.interceptor._model import (
    CapabilityToken,
    EvaluationRequest,
    SignedReceipt,
    receipt_from_json,
)
from chio_receipts.schemas import (
    EncodeError,
    StepOutcome,
    StepReceipt,
    check_chio_outcome,
    check_chio_step,
    step_body,
    verify_body,
)

__all__ = ["SIDECAR_TOKEN_ENV", "HttpSidecar"]

SIDECAR_TOKEN_ENV = "CHIO_SIDECAR_TOKEN"  # noqa: S105 - a variable name, not a secret
"""Where the credential's secret is read from when ``token`` is not given."""

_log = logging.getLogger(__name__)


class HttpSidecar(PooledHttpClient):
    """Client of a remote chio sidecar (for example ``chio-receipts sidecar serve``).

    An idempotent async context manager; it also works without ``async with`` (the client is
    opened on first use) and must then be closed with :meth:`aclose`. ``token`` is the secret of
    the sidecar credential to call with (default: ``CHIO_SIDECAR_TOKEN``; none when unset).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 2.0,
        connect_timeout: float = 1.0,
        retries: int = 2,
        retry_wait: float = 0.05,
        max_connections: int = 32,
        verify_signatures: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            bearer=token if token is not None else os.environ.get(SIDECAR_TOKEN_ENV),
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            retry_wait=retry_wait,
            max_connections=max_connections,
            transport=transport,
            describe="sidecar request",
            peer="sidecar",
        )
        self._verify = verify_signatures
        self._keys: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"HttpSidecar({self.base_url!r})"

    # -- transport -----------------------------------------------------------------------------

    async def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        response = await self._exchange(method, path, body)
        return self._decode(response)

    def _decode(self, response: httpx.Response) -> Any:
        status = response.status_code
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if status >= 500:
            raise ChioSidecarUnavailable(f"sidecar {self.base_url} answered {status}")
        if status >= 400:
            error = payload.get("error", "rejected") if isinstance(payload, dict) else "rejected"
            reason = payload.get("reason", "") if isinstance(payload, dict) else response.text
            message = f"sidecar rejected the request ({status} {error}): {reason}"
            if error == "unknown_capability":
                raise UnknownCapability(message)
            if error == "scope_widening":
                raise ScopeWidening(message)
            if error == "invalid_capability":
                raise ChioTemporalConfigError(message)
            raise ChioSidecarRejected(message, status=status, error=str(error))
        if payload is None:
            raise ChioSidecarProtocolError(f"sidecar answered {status} with a non-JSON body")
        return payload

    # -- Evaluator -----------------------------------------------------------------------------

    def _token_from(self, payload: Any) -> CapabilityToken:
        try:
            return CapabilityToken.from_json(payload)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ChioSidecarProtocolError(f"malformed capability from sidecar: {exc!r}") from exc

    async def create_capability(
        self,
        subject: str,
        scope: Iterable[str],
        ttl_seconds: float,
        *,
        parent_id: str | None = None,
    ) -> CapabilityToken:
        """Mint a capability (``POST /v1/capabilities``)."""
        body: dict[str, Any] = {
            "subject": subject,
            "scope": list(scope),
            "ttl_seconds": ttl_seconds,
        }
        if parent_id is not None:
            body["parent_id"] = parent_id
        return self._token_from(await self._request("POST", "/v1/capabilities", body))

    async def attenuate(
        self,
        capability_id: str,
        *,
        scope: Iterable[str],
        ttl_seconds: float | None = None,
    ) -> CapabilityToken:
        """Mint a narrower child (``POST /v1/capabilities/{id}/attenuate``)."""
        body: dict[str, Any] = {"scope": list(scope)}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        path = f"/v1/capabilities/{_segment(capability_id)}/attenuate"
        return self._token_from(await self._request("POST", path, body))

    async def get_capability(self, capability_id: str) -> CapabilityToken:
        """Fetch a capability (``GET /v1/capabilities/{id}``)."""
        path = f"/v1/capabilities/{_segment(capability_id)}"
        return self._token_from(await self._request("GET", path))

    async def revoke(self, capability_id: str) -> None:
        """Revoke a capability (``POST /v1/capabilities/{id}/revoke``)."""
        await self._request("POST", f"/v1/capabilities/{_segment(capability_id)}/revoke", {})

    async def public_keys(self) -> Mapping[str, bytes]:
        """The sidecar's public keys (``GET /v1/keys``)."""
        payload = await self._request("GET", "/v1/keys")
        try:
            keys = {str(k["key_id"]): bytes.fromhex(k["public_key"]) for k in payload["keys"]}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ChioSidecarProtocolError(f"malformed key list from sidecar: {exc!r}") from exc
        self._keys.update(keys)
        return MappingProxyType(keys)

    async def evaluate(self, request: EvaluationRequest) -> SignedReceipt:
        """Decide one attempt (``POST /v1/evaluate``) and check the signed answer."""
        payload = await self._request("POST", "/v1/evaluate", request.to_json())
        try:
            receipt = receipt_from_json(payload["receipt"])
            body = base64.b64decode(payload["body"], validate=True)
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise ChioSidecarProtocolError(f"malformed receipt from sidecar: {exc!r}") from exc
        try:
            canonical = step_body(receipt)
        except EncodeError as exc:
            raise ChioSidecarProtocolError(f"receipt from sidecar does not encode: {exc}") from exc
        if canonical != body:
            raise ChioSidecarProtocolError("the sidecar's wire body is not its receipt's encoding")
        if self._verify:
            await self._check_signature(receipt.key_id, body)
            self._check_chio_receipt(receipt)
        return SignedReceipt(receipt=receipt, body=body)

    async def record_outcome(self, outcome: StepOutcome) -> StepOutcome:
        """Have the sidecar sign an outcome record (``POST /v1/outcomes``) and check it.

        The record is sent without its receipt; the answer's Chio receipt must hold for the
        record as sent (``schemas.check_chio_outcome``: it binds every field) under the
        sidecar's published keys."""
        body = outcome.to_avro()
        del body["chio_receipt"], body["chio_signed"]
        payload = await self._request("POST", "/v1/outcomes", body)
        try:
            answer = payload["outcome"]
            text = answer["chio_receipt"]
            signed_bytes = bytes.fromhex(answer["chio_signed"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ChioSidecarProtocolError(f"malformed outcome from sidecar: {exc!r}") from exc
        if not isinstance(text, str) or not text:
            raise ChioSidecarProtocolError("the sidecar's outcome carries no Chio receipt")
        signed = dataclasses.replace(outcome, chio_receipt=text, chio_signed=signed_bytes)
        if self._verify:
            reason = check_chio_outcome(signed, trusted_keys=await self._trusted_hex())
            if reason is not None:
                raise ChioSidecarProtocolError(f"the sidecar's outcome receipt: {reason}")
        return signed

    async def _trusted_hex(self) -> set[str]:
        if not self._keys:
            await self.public_keys()
        return {key.hex() for key in self._keys.values()}

    def _check_chio_receipt(self, receipt: StepReceipt) -> None:
        # The step's Chio receipt must hold as the consumers will check it, signed by one of
        # the keys the sidecar publishes (known here: the Avro signature was just checked).
        if not receipt.chio_receipt:
            return
        trusted = {key.hex() for key in self._keys.values()}
        reason = check_chio_step(receipt, trusted_keys=trusted)
        if reason is not None:
            raise ChioSidecarProtocolError(f"the sidecar's Chio receipt does not hold: {reason}")

    async def _check_signature(self, key_id: str, body: bytes) -> None:
        key = self._keys.get(key_id)
        if key is None:
            await self.public_keys()
            key = self._keys.get(key_id)
        if key is None or not verify_body(body, key):
            raise ChioSidecarProtocolError(
                f"receipt signature does not verify under the sidecar's key {key_id!r}"
            )


def _segment(value: str) -> str:
    if not value or "/" in value or value in {".", ".."}:
        raise ChioSidecarError(f"invalid capability id {value!r}")
    return value
