"""Unit tests of the sidecar engine: decisions, signing, attenuation, expiry, its errors."""

from __future__ import annotations

import pytest

from chio_receipts.schemas import (
    ChioReceiptsError,
    EvaluationRequest,
    Verdict,
    encode,
    is_retriable,
    verify_receipt,
)
from chio_receipts.sidecar import (
    InvalidCapability,
    LocalSidecar,
    ScopeWidening,
    SidecarError,
    UnknownCapability,
)

pytestmark = pytest.mark.unit


def _request(cap_id: str, tool: str = "read", **kw: object) -> EvaluationRequest:
    return EvaluationRequest(capability_id=cap_id, tool_server="srv", tool=tool, **kw)  # type: ignore[arg-type]


async def test_local_sidecar_allows_in_scope_and_denies_out_of_scope() -> None:
    side = LocalSidecar()
    cap = await side.create_capability("agent:a", ["write", "read", "read"], 60)
    allowed = await side.evaluate(_request(cap.id, "read", workflow_id="wf", attempt=3))
    assert allowed.receipt.verdict is Verdict.ALLOW
    assert allowed.receipt.subject == "agent:a"
    assert allowed.receipt.scope == ("read", "write")
    assert allowed.receipt.attempt == 3
    assert allowed.receipt.resource == "srv/read"
    denied = await side.evaluate(_request(cap.id, "delete"))
    assert denied.receipt.verdict is Verdict.DENY
    assert "not in the scope" in denied.receipt.reason
    keys = await side.public_keys()
    assert verify_receipt(allowed.receipt, keys)
    assert verify_receipt(denied.receipt, keys)
    assert encode("dev.chio.receipts.v1.StepReceipt", allowed.receipt.to_avro())[:2] == b"\xc3\x01"


async def test_local_sidecar_expiry_revocation_unknown_and_requested_deny() -> None:
    side = LocalSidecar()
    cap = await side.create_capability("agent:a", ["read"], 60)
    verdict, reason, _ = side.decide(_request(cap.id), cap.expires_at)
    assert verdict is Verdict.DENY
    assert "expired" in reason
    child = await side.attenuate(cap.id, scope=["read"])
    assert child.chain == (cap.id,)
    assert child.expires_at <= cap.expires_at
    await side.revoke(cap.id)
    signed = await side.evaluate(_request(child.id))
    assert signed.receipt.verdict is Verdict.DENY
    assert "revoked" in signed.receipt.reason
    assert signed.receipt.capability_chain == (cap.id,)
    unknown = await side.evaluate(_request("cap-nope"))
    assert unknown.receipt.verdict is Verdict.DENY
    other = await side.create_capability("agent:b", ["read"], 60)
    forced = await side.evaluate(_request(other.id, deny_reason="worker says no"))
    assert forced.receipt.verdict is Verdict.DENY
    assert forced.receipt.reason == "worker says no"


async def test_refusals_raise_the_sidecar_error_tree() -> None:
    side = LocalSidecar(max_capabilities=2)
    cap = side.mint("agent:a", ["read", "write"], 60)
    with pytest.raises(ScopeWidening, match="admin"):
        await side.attenuate(cap.id, scope=["read", "admin"])
    with pytest.raises(UnknownCapability):
        await side.get_capability("cap-nope")
    with pytest.raises(UnknownCapability):
        await side.revoke("cap-nope")
    for bad in (
        lambda: side.mint("", ["read"], 60),
        lambda: side.mint("agent:a", [], 60),
        lambda: side.mint("agent:a", ["read", ""], 60),
        lambda: side.mint("agent:a", ["read", 3], 60),  # type: ignore[list-item]
        lambda: side.mint("agent:a", ["read"], 0),
        lambda: side.mint("agent:a", ["read"], float("nan")),
        lambda: side.mint("agent:a", ["read"], True),
        lambda: side.mint("agent:b", ["read"], 60, parent_id=cap.id),
    ):
        with pytest.raises(InvalidCapability) as err:
            bad()
        assert not isinstance(err.value, ScopeWidening)
    side.mint("agent:a", ["read"], 60)
    with pytest.raises(InvalidCapability, match="max_capabilities"):
        side.mint("agent:a", ["read"], 60)
    await side.revoke(cap.id)
    with pytest.raises(InvalidCapability, match="revoked"):
        await side.attenuate(cap.id, scope=["read"])
    for kind in (InvalidCapability, ScopeWidening, UnknownCapability):
        assert issubclass(kind, SidecarError)
        assert issubclass(kind, ChioReceiptsError)
        assert not is_retriable(kind("x"))


async def test_attenuation_keeps_the_parent_expiry_and_chain() -> None:
    side = LocalSidecar()
    root = side.mint("agent:a", ["read", "write"], 60)
    child = await side.attenuate(root.id, scope=["read", "write"], ttl_seconds=3600)
    grandchild = await side.attenuate(child.id, scope=["read"])
    assert child.expires_at == root.expires_at  # a longer ttl is capped at the parent's expiry
    assert grandchild.chain == (root.id, child.id)
    assert grandchild.parent_id == child.id
    assert grandchild.issuer_key_id == side.key_id
    assert (await side.get_capability(grandchild.id)) == grandchild
