"""``HttpSidecar`` against the sidecar's HTTP API: in process (ASGI) and on a real port."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from chio_receipts.interceptor import (
    ChioClient,
    ChioSidecarProtocolError,
    ChioSidecarRejected,
    ChioSidecarUnavailable,
    ChioTemporalConfigError,
    EvaluationRequest,
    HttpSidecar,
    UnknownCapability,
    verify_receipt,
)
from chio_receipts.schemas import KeyPair, Verdict
from chio_receipts.sidecar import LocalSidecar, SidecarServer, create_sidecar_app


@pytest.mark.unit
async def test_http_sidecar_round_trip_and_errors_translated() -> None:
    side = LocalSidecar()
    transport = httpx.ASGITransport(app=create_sidecar_app(side))
    async with HttpSidecar("http://sidecar", transport=transport) as http:
        chio = ChioClient(http)
        cap = await chio.create_capability("agent:a", ["read", "write"], 60)
        child = await chio.attenuate(cap.id, scope=["read"])
        assert child.parent_id == cap.id
        assert (await chio.get_capability(child.id)).scope == ("read",)
        signed = await chio.evaluate_tool_call(child.id, "srv", "read", workflow_id="wf")
        assert signed.receipt.verdict is Verdict.ALLOW
        assert signed.receipt.workflow_id == "wf"
        assert verify_receipt(signed.receipt, await chio.public_keys())
        with pytest.raises(ChioTemporalConfigError):
            await chio.attenuate(cap.id, scope=["admin"])
        with pytest.raises(UnknownCapability):
            await chio.get_capability("cap-nope")
        await chio.revoke(cap.id)
        revoked = await chio.evaluate_tool_call(child.id, "srv", "read")
        assert revoked.receipt.verdict is Verdict.DENY


@pytest.mark.unit
async def test_http_sidecar_rejects_a_tampered_answer() -> None:
    side = LocalSidecar()
    cap = side.mint("agent:a", ["read"], 60)
    app = create_sidecar_app(side)

    async def tamper(request: httpx.Request) -> httpx.Response:
        inner = httpx.ASGITransport(app=app)
        response = await inner.handle_async_request(request)
        await response.aread()
        if request.url.path != "/v1/evaluate":
            return httpx.Response(response.status_code, content=response.content)
        data = json.loads(response.content)
        data["receipt"]["verdict"] = "ALLOW"
        data["receipt"]["tool"] = "read"
        body = base64.b64decode(data["body"])
        data["body"] = base64.b64encode(body[:-1] + bytes([body[-1] ^ 1])).decode()
        return httpx.Response(200, json=data)

    async with HttpSidecar("http://sidecar", transport=httpx.MockTransport(tamper)) as http:
        with pytest.raises(ChioSidecarProtocolError):
            await http.evaluate(EvaluationRequest(capability_id=cap.id, tool_server="s", tool="x"))


@pytest.mark.integration
async def test_served_sidecar_on_a_real_port_stops_and_comes_back() -> None:
    side = LocalSidecar()
    server = SidecarServer(side)
    await server.start()
    http = HttpSidecar(server.url, timeout=1.0, retries=1, retry_wait=0.01)
    try:
        cap = await http.create_capability("agent:a", ["read"], 60)
        raw = httpx.AsyncClient(base_url=server.url)
        async with raw:
            big = await raw.post("/v1/evaluate", content=b"{" + b" " * 70_000 + b"}")
            assert big.status_code == 413
            assert big.json()["error"] == "too_large"
        await server.stop()
        request = EvaluationRequest(capability_id=cap.id, tool_server="s", tool="read")
        with pytest.raises(ChioSidecarUnavailable):
            await http.evaluate(request)
        await server.start()
        signed = await http.evaluate(
            EvaluationRequest(capability_id=cap.id, tool_server="s", tool="read")
        )
        assert signed.receipt.verdict is Verdict.ALLOW
        async with HttpSidecar(server.url) as other:
            with pytest.raises(ChioSidecarRejected):
                await other.revoke("cap-unknown-id")
    finally:
        await http.aclose()
        await server.stop()


@pytest.mark.unit
async def test_http_sidecar_translates_5xx_timeouts_and_retries_connect_errors() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/keys":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/v1/evaluate":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(503, json={"error": "overloaded", "reason": "try later"})

    async with HttpSidecar(
        "http://sidecar", transport=httpx.MockTransport(handler), retries=2, retry_wait=0.001
    ) as http:
        with pytest.raises(ChioSidecarUnavailable, match="503"):
            await http.get_capability("cap-1")
        with pytest.raises(ChioSidecarUnavailable, match="timed out"):
            await http.evaluate(EvaluationRequest(capability_id="c", tool_server="s", tool="t"))
        with pytest.raises(ChioSidecarUnavailable, match="unreachable"):
            await http.public_keys()
    # Connection errors are retried (bounded); a timeout or a 5xx is answered at once.
    assert calls.count("/v1/keys") == 3
    assert calls.count("/v1/evaluate") == 1
    assert calls.count("/v1/capabilities/cap-1") == 1


class _ForeignChioSigner(LocalSidecar):
    """A sidecar whose Chio receipts are signed by a key it does not publish."""

    def _kernel_receipt(self, decision, **kw):  # type: ignore[no-untyped-def]
        real = self._key
        self._key = KeyPair.generate("foreign")
        try:
            return super()._kernel_receipt(decision, **kw)
        finally:
            self._key = real


@pytest.mark.unit
async def test_http_sidecar_refuses_a_chio_receipt_not_signed_by_the_sidecars_keys() -> None:
    side = _ForeignChioSigner()
    cap = side.mint("agent:a", ["read"], 60)
    transport = httpx.ASGITransport(app=create_sidecar_app(side))
    request = EvaluationRequest(capability_id=cap.id, tool_server="s", tool="read")
    async with HttpSidecar("http://sidecar", transport=transport) as http:
        with pytest.raises(ChioSidecarProtocolError, match="not a trusted signer"):
            await http.evaluate(request)
    # The same sidecar signing with its own key passes.
    honest = LocalSidecar()
    cap = honest.mint("agent:a", ["read"], 60)
    transport = httpx.ASGITransport(app=create_sidecar_app(honest))
    request = EvaluationRequest(capability_id=cap.id, tool_server="s", tool="read")
    async with HttpSidecar("http://sidecar", transport=transport) as http:
        assert (await http.evaluate(request)).receipt.chio_receipt
