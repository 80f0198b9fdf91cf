"""``ChioKernelSidecar``: the evaluator protocol over a Chio kernel's own routes (httpx).

For a real Chio kernel sidecar (chio-api-protect 0.1.2, ``chio start``) or our sidecar's kernel
routes. Capabilities are minted with ``POST /v1/capabilities/mint`` (scope strings
``tool:SERVER:TOOL:invoke``), attenuated with ``POST /v1/capabilities/attenuate`` (our sidecar
only: the kernel refuses, 403, because it does not hold the subject's key), revoked with
``POST /v1/capabilities/release``; every attempt is decided by the mediated
``POST /v1/evaluate``, which takes the whole signed token and the worker's ``request_id``
(``schemas.request_id_for`` of the step's Temporal context), and answers with a signed
kernel-format receipt.

The worker builds the step event around that receipt: its own receipt id, the verdict the
kernel decided (``authorized`` → ALLOW, ``deny`` → DENY with the decision's reason), its own
``evaluated_at`` and latency, and ``chio_receipt``/``chio_signed`` from
``schemas.chio_step_payload``. The kernel does not sign the Avro record, so ``key_id`` is ``""``
and ``signature`` empty: the consumers accept a step whose only signature is a trusted Chio
receipt. Every receipt is checked here with ``schemas.check_chio_step`` under the kernel's key
before it is handed back.

Raw tokens stay the JSON objects the sidecar sent, kept by capability id; they are never
re-serialised through a model (a model that drops a field breaks the signature). They live in
this object only: a new process mints again, or registers tokens with :meth:`add_token`.

What is not a kernel decision:

- a request the gate already denies (``deny_reason``: no grant, misconfigured override) is not
  sent: the kernel signs only its own decisions, and asking it to authorize a call the worker
  will refuse would reserve budget and mint an execution nonce for nothing (and an authorized
  receipt cannot stand for a deny). The step is a worker-built DENY without a Chio receipt and
  without a signature, so verifiers see it as unsigned;
- a revoked capability is answered 403 by the kernel without a receipt: the step is a DENY
  without a receipt likewise (our sidecar's 403 carries a signed deny receipt, which is used);
- ``redact_parameters`` cannot be honoured: the kernel signs the parameters it is given, so a
  redacting worker is refused (:class:`ChioSidecarRejected`) rather than publishing them;
- a reused ``request_id`` (409), a timeout, a transport failure or a 5xx is
  :class:`ChioSidecarUnavailable` (retriable); none is ever an allow;
- outcome records (:meth:`ChioKernelSidecar.record_outcome`) stay unsigned: the kernel has no
  route that signs what happened after an allow for one tool call (its ``/v1/receipts`` signs
  job submissions, ``/v1/reconcile`` settles budget holds), so the records are published
  without a Chio receipt and the builder accounts for them as unsigned.

The worker fills the step's trace context (``trace_id``, ``span_id``) itself: the kernel's
receipt does not carry it, so on this path it is part of the worker-built step only.

The control token (``control_token=`` or ``CHIO_SIDECAR_CONTROL_TOKEN``) is sent as a bearer
token and never printed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import httpx

from chio_receipts.interceptor._errors import (
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
    normalize_scope,
    now_us,
    uuid7,
)
from chio_receipts.schemas import (
    ChioWireError,
    StepOutcome,
    StepReceipt,
    Verdict,
    check_chio_step,
    chio_step_payload,
    chio_verdict,
    request_id_for,
    step_body,
)

__all__ = ["CONTROL_TOKEN_ENV", "ChioKernelSidecar"]

CONTROL_TOKEN_ENV = "CHIO_SIDECAR_CONTROL_TOKEN"  # noqa: S105 - a variable name, not a secret
"""Where the control token is read from when ``control_token`` is not given."""

_STATUS_VERDICT = {"authorized": Verdict.ALLOW, "deny": Verdict.DENY}


class ChioKernelSidecar(PooledHttpClient):
    """An :class:`~chio_receipts.interceptor.Evaluator` that talks a Chio kernel's routes.

    ``tool_server`` is the server of the grants it mints (``"*"``: any server). ``kernel_key``
    (64 hex characters) pins the key receipts must be signed with; without it the keys are read
    from ``GET /v1/keys`` (our sidecar) or else taken from the issuer of the tokens the kernel
    mints over the authenticated control route. ``job_uid`` goes into every mint and release.
    An idempotent async context manager (also usable without ``async with``, then closed with
    :meth:`aclose`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        control_token: str | None = None,
        kernel_key: str | None = None,
        tool_server: str = "*",
        job_uid: str = "",
        timeout: float = 2.0,
        connect_timeout: float = 1.0,
        retries: int = 2,
        retry_wait: float = 0.05,
        max_connections: int = 32,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        token = control_token if control_token is not None else os.environ.get(CONTROL_TOKEN_ENV)
        super().__init__(
            base_url,
            bearer=token,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            retry_wait=retry_wait,
            max_connections=max_connections,
            transport=transport,
            describe="kernel sidecar request",
            peer="kernel",
        )
        self._pinned: str | None = None
        if kernel_key is not None:
            key = kernel_key.lower().removeprefix("0x")
            if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
                raise ChioTemporalConfigError("kernel_key must be 64 hex characters")
            self._pinned = key
        self.tool_server = tool_server
        self.job_uid = job_uid
        self._tokens: dict[str, dict[str, Any]] = {}
        self._caps: dict[str, CapabilityToken] = {}
        self._keys: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"ChioKernelSidecar({self.base_url!r}, capabilities={len(self._tokens)})"

    # -- transport -----------------------------------------------------------------------------

    async def _post(self, path: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        return await self._send("POST", path, body)

    async def _send(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, Any]:
        response = await self._exchange(method, path, body)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code >= 500:
            raise ChioSidecarUnavailable(f"kernel {self.base_url} answered {response.status_code}")
        return response.status_code, payload

    def _rejected(self, status: int, payload: Any, what: str) -> ChioSidecarRejected:
        error = payload.get("error", "rejected") if isinstance(payload, dict) else "rejected"
        message = payload.get("message", "") if isinstance(payload, dict) else ""
        return ChioSidecarRejected(
            f"kernel refused {what} ({status} {error}): {message}", status=status, error=str(error)
        )

    # -- capabilities --------------------------------------------------------------------------

    def add_token(
        self, token: Mapping[str, Any], *, subject: str = "", trust_issuer: bool = True
    ) -> CapabilityToken:
        """Register a raw signed kernel token (minted elsewhere) so attempts can present it.

        ``trust_issuer`` (for tokens this evaluator got from the sidecar's control routes) lets
        the issuer's key verify receipts when no ``kernel_key`` is pinned; a token from anywhere
        else (a grant) must pass ``False``: holding a token proves nothing about its issuer.
        """
        raw = dict(token)
        try:
            cap_id = str(raw["id"])
            tools = [
                str(g["tool_name"])
                for g in raw["scope"].get("grants", [])
                if "invoke" in g.get("operations", [])
            ]
            issued, expires = int(raw["issued_at"]), int(raw["expires_at"])
            issuer = str(raw["issuer"]).lower()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ChioSidecarProtocolError(f"malformed capability token: {exc!r}") from exc
        parent_id = None
        chain: tuple[str, ...] = ()
        links = raw.get("delegation_chain") or []
        if links:
            chain = tuple(str(link.get("capability_id", "")) for link in links)
            parent_id = chain[-1]
        cap = CapabilityToken(
            id=cap_id,
            subject=subject or str(raw.get("subject", "")),
            scope=normalize_scope(tools),
            issued_at=issued * 1_000_000,
            expires_at=expires * 1_000_000,
            parent_id=parent_id,
            chain=chain,
            issuer_key_id=issuer,
        )
        self._tokens[cap_id] = raw
        self._caps[cap_id] = cap
        if trust_issuer and self._pinned is None and len(issuer) == 64:
            # The issuer of a token minted over the authenticated control route is the key the
            # kernel signs receipts with (chio-api-protect signs both with its signer keypair).
            self._keys.setdefault(f"issuer-{issuer[:16]}", bytes.fromhex(issuer))
        return cap

    def raw_token(self, capability_id: str) -> dict[str, Any] | None:
        """The signed kernel token of a capability, as the sidecar sent it (None if unknown)."""
        return self._tokens.get(capability_id)

    async def create_capability(
        self,
        subject: str,
        scope: Iterable[str],
        ttl_seconds: float,
        *,
        parent_id: str | None = None,
    ) -> CapabilityToken:
        """Mint a token (``POST /v1/capabilities/mint``); with ``parent_id``, attenuate it."""
        tools = normalize_scope(scope)
        if parent_id is not None:
            return await self.attenuate(parent_id, scope=tools, ttl_seconds=ttl_seconds)
        if not tools:
            raise ChioTemporalConfigError("a capability needs at least one tool in its scope")
        if not math.isfinite(ttl_seconds) or ttl_seconds <= 0:
            raise ChioTemporalConfigError("ttl_seconds must be a positive number")
        body = {
            "subject": subject,
            "scopes": [f"tool:{self.tool_server}:{tool}:invoke" for tool in tools],
            "ttl_seconds": math.ceil(ttl_seconds),
            "job_uid": self.job_uid,
        }
        status, payload = await self._post("/v1/capabilities/mint", body)
        if status != 200 or not isinstance(payload, dict) or "capability" not in payload:
            raise self._rejected(status, payload, "the mint")
        return self.add_token(payload["capability"], subject=subject)

    async def attenuate(
        self,
        capability_id: str,
        *,
        scope: Iterable[str],
        ttl_seconds: float | None = None,
    ) -> CapabilityToken:
        """A narrower child (``POST /v1/capabilities/attenuate``); it keeps the parent's expiry
        (``ttl_seconds`` is not part of the kernel's request). The real kernel refuses every
        attenuation (403 ``chio_attenuation_requires_subject_signer``)."""
        parent = self._tokens.get(capability_id)
        if parent is None:
            raise UnknownCapability(f"no kernel token for capability {capability_id!r}")
        tools = normalize_scope(scope)
        parent_tools = self._caps[capability_id].scope
        wider = sorted(set(tools) - set(parent_tools))
        if wider or not tools:
            raise ScopeWidening(
                f"attenuation of {capability_id} asks for tools outside its scope: {wider}"
            )
        grants = [
            dict(grant)
            for grant in parent["scope"].get("grants", [])
            if grant.get("tool_name") in tools
        ]
        body = {"parent_token": parent, "new_scope": {"grants": grants}}
        status, payload = await self._post("/v1/capabilities/attenuate", body)
        if status == 409:
            raise ChioTemporalConfigError(
                f"attenuation of {capability_id} must narrow its scope strictly"
            )
        if status != 200 or not isinstance(payload, dict):
            raise self._rejected(status, payload, "the attenuation")
        return self.add_token(payload, subject=self._caps[capability_id].subject)

    async def get_capability(self, capability_id: str) -> CapabilityToken:
        """A capability this evaluator minted or was given; else read from the sidecar.

        The kernel has no route to read a token by id; the project's sidecar answers
        ``GET /v1/capabilities/{id}`` with the raw signed token (``chio_token``), which is then
        registered (its issuer not trusted by that alone).
        """
        cap = self._caps.get(capability_id)
        if cap is not None:
            return cap
        status, payload = await self._send("GET", f"/v1/capabilities/{capability_id}")
        raw = payload.get("chio_token") if status == 200 and isinstance(payload, dict) else None
        if not isinstance(raw, dict) or raw.get("id") != capability_id:
            raise UnknownCapability(
                f"no kernel token for capability {capability_id!r}: a Chio kernel cannot read "
                "one by id; mint it through this evaluator or register it with add_token()"
            )
        return self.add_token(raw, subject=str(payload.get("subject", "")), trust_issuer=False)

    async def revoke(self, capability_id: str) -> None:
        """Release (revoke) a capability (``POST /v1/capabilities/release``)."""
        body = {"capability_id": capability_id, "job_uid": self.job_uid}
        status, payload = await self._post("/v1/capabilities/release", body)
        if status != 200:
            raise self._rejected(status, payload, "the release")

    async def public_keys(self) -> Mapping[str, bytes]:
        """The keys receipts must be signed with: ``kernel_key`` when pinned; else our
        sidecar's ``GET /v1/keys``; else the issuers of the tokens the kernel minted."""
        if self._pinned is not None:
            return MappingProxyType({"kernel": bytes.fromhex(self._pinned)})
        try:
            status, payload = await self._send("GET", "/v1/keys")
        except ChioSidecarUnavailable:
            # The kernel has no key route: its catch-all proxy answers 502 upstream errors.
            if not self._keys:
                raise
            status, payload = 502, None
        if status == 200 and isinstance(payload, dict):
            try:
                listed = {str(k["key_id"]): bytes.fromhex(k["public_key"]) for k in payload["keys"]}
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ChioSidecarProtocolError(f"malformed key list: {exc!r}") from exc
            self._keys.update(listed)
        if not self._keys:
            raise ChioSidecarProtocolError(
                "the kernel publishes no key: pass kernel_key= or mint a capability first"
            )
        return MappingProxyType(dict(self._keys))

    async def _trusted(self) -> set[str]:
        if self._pinned is not None:
            return {self._pinned}
        if not self._keys:
            await self.public_keys()
        return {key.hex() for key in self._keys.values()}

    # -- evaluation ----------------------------------------------------------------------------

    async def evaluate(self, request: EvaluationRequest) -> SignedReceipt:
        """Decide one attempt on the mediated ``/v1/evaluate``; the step carries the receipt."""
        t0 = time.perf_counter_ns()
        evaluated_at = now_us()
        step = self._step(request, evaluated_at)
        if request.deny_reason is not None:
            return self._finish(step, t0, Verdict.DENY, request.deny_reason, None)
        raw = self._tokens.get(request.capability_id)
        if raw is None:
            raise UnknownCapability(
                f"no kernel token for capability {request.capability_id!r}: mint it with this "
                "evaluator or register it with add_token()"
            )
        if request.redact_parameters:
            raise ChioSidecarRejected(
                "a Chio kernel signs the parameters it is given and cannot redact them: "
                "turn redact_parameters off or use a sidecar that redacts",
                status=400,
                error="redaction_unsupported",
            )
        body = {
            "capability": raw,
            "tool_server": request.tool_server,
            "tool_name": request.tool,
            "parameters": request.parameters,
            "request_id": request_id_for(step),
        }
        status, payload = await self._post("/v1/evaluate", body)
        receipt = payload.get("receipt") if isinstance(payload, dict) else None
        if status == 409:
            raise ChioSidecarUnavailable(
                f"kernel refused the request id ({status}): retry with a new attempt"
            )
        if status == 403 and isinstance(payload, dict):
            if payload.get("error") == "chio_capability_revoked":
                reason = f"capability {request.capability_id} has been revoked"
                if isinstance(receipt, dict):  # our sidecar signs the deny: use its reason
                    signed = receipt.get("decision")
                    reason = str(signed.get("reason") or "") if isinstance(signed, dict) else ""
                return await self._finish_with(step, t0, Verdict.DENY, reason, receipt)
            raise self._rejected(status, payload, "the evaluation")
        if status != 200 or not isinstance(payload, dict) or not isinstance(receipt, dict):
            raise self._rejected(status, payload, "the evaluation")
        verdict = _STATUS_VERDICT.get(str(payload.get("status")))
        if verdict is Verdict.DENY and chio_verdict(receipt) is Verdict.PENDING_APPROVAL:
            verdict = Verdict.PENDING_APPROVAL  # a held call: a deny marked approval_required
        if verdict is None or chio_verdict(receipt) is not verdict:
            raise ChioSidecarProtocolError("the kernel's status and receipt disagree")
        decision = receipt.get("decision")
        reason = str(decision.get("reason") or "") if isinstance(decision, dict) else ""
        if verdict is Verdict.ALLOW and not reason:
            reason = f"tool {request.tool!r} allowed by capability {request.capability_id}"
        return await self._finish_with(step, t0, verdict, reason, receipt)

    async def record_outcome(self, outcome: StepOutcome) -> StepOutcome:
        """``outcome`` unchanged and unsigned: a Chio kernel cannot sign outcome records."""
        return outcome

    def _step(self, request: EvaluationRequest, evaluated_at: int) -> StepReceipt:
        return request.step(
            receipt_id=uuid7(),
            token=self._caps.get(request.capability_id),
            verdict=Verdict.UNKNOWN,
            reason="",
            evaluated_at=evaluated_at,
        )

    async def _finish_with(
        self,
        step: StepReceipt,
        t0: int,
        verdict: Verdict,
        reason: str,
        receipt: dict[str, Any] | None,
    ) -> SignedReceipt:
        trusted = await self._trusted() if receipt is not None else set()
        return self._finish(step, t0, verdict, reason, receipt, trusted)

    def _finish(
        self,
        step: StepReceipt,
        t0: int,
        verdict: Verdict,
        reason: str,
        receipt: dict[str, Any] | None,
        trusted: set[str] | None = None,
    ) -> SignedReceipt:
        chio_text, chio_signed = "", b""
        if receipt is not None:
            try:
                chio_text, chio_signed = chio_step_payload(receipt)
            except ChioWireError as exc:
                raise ChioSidecarProtocolError(
                    f"the kernel's receipt is unreadable: {exc}"
                ) from exc
        step = dataclasses.replace(
            step,
            verdict=verdict,
            reason=reason,
            chio_receipt=chio_text,
            chio_signed=chio_signed,
            latency_us=(time.perf_counter_ns() - t0) // 1000,
        )
        if receipt is not None:
            problem = check_chio_step(step, trusted_keys=trusted)
            if problem is not None:
                raise ChioSidecarProtocolError(f"the kernel's receipt does not hold: {problem}")
        return SignedReceipt(receipt=step, body=step_body(step))
