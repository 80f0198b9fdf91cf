"""ChioKernelSidecar against our sidecar's kernel routes (served on a real port)."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from chio_receipts import schemas
from chio_receipts.interceptor import (
    ChioKernelSidecar,
    ChioSidecarUnavailable,
    ChioTemporalConfigError,
    Evaluator,
)
from chio_receipts.sidecar import LocalSidecar, SidecarServer
from tests.support.kernel_evaluator import exercise, request

CONTROL = "control-token-for-tests"


@pytest.mark.integration
async def test_against_our_served_sidecar() -> None:
    side = LocalSidecar()
    server = SidecarServer(side, token=CONTROL)
    await server.start()
    try:
        async with ChioKernelSidecar(
            server.url, control_token=CONTROL, tool_server="temporal"
        ) as kernel:
            assert isinstance(kernel, Evaluator)
            assert CONTROL not in repr(kernel)
            await exercise(kernel, side.trusted_keys().pop(), allow_verdict="allow")
            # Our sidecar attenuates (the real kernel refuses): the child is a delegated token.
            cap = await kernel.create_capability("agent:att", ["charge_card", "refund_card"], 60)
            child = await kernel.attenuate(cap.id, scope=["charge_card"])
            assert child.chain == (cap.id,)
            signed = await kernel.evaluate(request(child.id, "charge_card", activity_id="9"))
            assert signed.receipt.verdict.value == "ALLOW"
            with pytest.raises(ChioTemporalConfigError):
                await kernel.attenuate(cap.id, scope=["delete"])
    finally:
        await server.stop()


@pytest.mark.unit
async def test_a_reused_request_id_or_a_5xx_is_retriable_never_an_allow() -> None:
    side = LocalSidecar()
    token = side.chio_mint(
        "agent:a",
        {
            "grants": [
                {"server_id": "temporal", "tool_name": "charge_card", "operations": ["invoke"]}
            ]
        },
        60,
    )
    for status in (409, 503):

        async def answer(req: httpx.Request, status: int = status) -> httpx.Response:
            return httpx.Response(status, json={"error": "chio_conflict", "message": "reused"})

        kernel = ChioKernelSidecar(
            "http://kernel", kernel_key="11" * 32, transport=httpx.MockTransport(answer)
        )
        kernel.add_token(token)
        with pytest.raises(ChioSidecarUnavailable):
            await kernel.evaluate(request(token["id"], "charge_card"))
        await kernel.aclose()


@pytest.mark.unit
def test_the_control_token_comes_from_the_environment_and_never_prints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHIO_SIDECAR_CONTROL_TOKEN", "env-secret-token")
    kernel = ChioKernelSidecar("http://kernel")
    assert kernel._open().headers["authorization"] == "Bearer env-secret-token"
    assert "env-secret-token" not in repr(kernel)
    with pytest.raises(ChioTemporalConfigError):
        ChioKernelSidecar("http://kernel", kernel_key="not-hex")


@pytest.mark.integration
async def test_the_worker_fills_the_trace_context_on_the_kernel_path() -> None:
    side = LocalSidecar()
    async with (
        SidecarServer(side, token=CONTROL) as server,
        ChioKernelSidecar(server.url, control_token=CONTROL, tool_server="temporal") as kernel,
    ):
        cap = await kernel.create_capability("agent:t", ["charge_card"], 60)
        traced = request(
            cap.id,
            "charge_card",
            trace_id="0af7651916cd43dd8448eb211c80319c",
            span_id="b7ad6b7169203331",
        )
        signed = await kernel.evaluate(traced)
    assert traced.matches(signed.receipt)
    assert (signed.receipt.trace_id, signed.receipt.span_id) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )
    assert signed.body == schemas.step_body(signed.receipt)


@pytest.mark.unit
def test_a_receipt_without_trace_context_matches_a_traced_request() -> None:
    """A sidecar older than the trace context signs empty ids: still the request's receipt
    (workers may be upgraded first); other ids, or half a context, are not."""
    traced = request(
        "cap-1", "charge_card", trace_id="0af7651916cd43dd8448eb211c80319c", span_id="b7ad6b71"
    )
    plain = traced.step(
        receipt_id=schemas.uuid7(),
        token=None,
        verdict=schemas.Verdict.ALLOW,
        reason="ok",
        evaluated_at=1,
    )
    untraced = dataclasses.replace(plain, trace_id="", span_id="")
    assert traced.matches(plain)
    assert traced.matches(untraced)
    assert not traced.matches(dataclasses.replace(plain, trace_id="ff" * 16))
    assert not traced.matches(dataclasses.replace(plain, span_id=""))
