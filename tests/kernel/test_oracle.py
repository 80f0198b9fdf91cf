"""The kernel's own verifier is the oracle for ours.

``chio-receipt-verify`` (chio-core-types 0.1.2: ``ChioReceipt`` deserialisation +
``verify_signature``, and the same for ``CapabilityToken``) and
``chio_receipts.schemas.verify_kernel_receipt`` / ``verify_capability_token`` must give the
same verdict on every item of one corpus: the vendored kernel vectors, receipts and tokens
signed by our signers (allow, deny, observations; floats, big integers and unicode in the
parameters) and tampered copies of each. Every item is also checked against the verdict it
should have, so a verifier that says "valid" to everything cannot agree its way through.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

import chio_receipts.schemas as schemas

pytestmark = pytest.mark.kernel

VECTORS = Path(__file__).resolve().parents[1] / "schemas" / "vectors"

KERNEL = nacl.signing.SigningKey(bytes(range(32)))
OTHER = nacl.signing.SigningKey(bytes([99]) * 32)
ISSUER = nacl.signing.SigningKey(bytes([7]) * 32)
AGENT = nacl.signing.SigningKey(bytes([11]) * 32)
DELEGATE_KEY = nacl.signing.SigningKey(bytes([13]) * 32)

Item = tuple[str, dict[str, Any], bool]  # (name, document, should it be valid)
Verify = Callable[[Sequence[str], str], list[str]]


def _hex(key: nacl.signing.SigningKey) -> str:
    return bytes(key.verify_key).hex()


def _line(document: dict[str, Any]) -> str:
    # Not canonical on purpose: both verifiers must re-canonicalise what they parse.
    return json.dumps(document, ensure_ascii=False, separators=(", ", ": "))


def _flip_hex(text: str, index: int = -1) -> str:
    position = index % len(text)
    replacement = "0" if text[position] != "0" else "1"
    return text[:position] + replacement + text[position + 1 :]


# ---------------------------------------------------------------- receipts

PARAMETERS: dict[str, dict[str, Any]] = {
    "empty": {},
    "simple": {"amount": 12.5, "to": "acct-1", "retries": 3, "dry_run": False},
    "float-sum": {"x": 0.1 + 0.2, "y": -0.0, "z": 100.0},
    "float-edges": {
        "big": 1e16,
        "bigger": 1e21,
        "tiny": 1e-6,
        "tinier": 1e-7,
        "min": 5e-324,
        "max": 1.7976931348623157e308,
        "long": 123456789012345680000.0,
        "third": 1 / 3,
    },
    "integers": {"max_safe": 2**53 - 1, "min_safe": -(2**53 - 1), "zero": 0, "neg": -17},
    "unicode": {
        "café": "naïve ☕",
        "日本": "語",
        "emoji": "😀 \U0001f9ea",
        "controls": "\x7f\x80\x9f\x01",
        "separators": "\u2028\u2029",
        "escapes": '"\\/\b\f\n\r\t',
    },
    "utf16-key-order": {"\U0001f600": 1, "\ufffd": 2, "a": 3, "Z": 4, "é": 5, "": 6},
    "nested": {"a": {"b": [1, "2", None, True, False, {"c": [], "d": {}}]}, "list": [[[]]]},
}


def _receipt_body(parameters: dict[str, Any], decision: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "timestamp": 1_795_847_358,
        "capability_id": "cap-oracle-1",
        "tool_server": "temporal",
        "tool_name": "charge_card",
        "action": {"parameters": parameters},
        "receipt_kind": "mediated_decision",
        "boundary_class": "prevent",
        "tool_origin": "caller_executed",
        "redaction_mode": "none",
        "content_hash": schemas.content_hash(),
        "policy_hash": schemas.content_hash({"policy": "oracle"}),
        "metadata": {"receipt_context": {"request_id": "req-oracle-1"}},
        "trust_level": "mediated",
    }
    if decision is not None:
        body["decision"] = decision
    return body


ALLOW = {"verdict": "allow"}
DENY = {"verdict": "deny", "reason": "out of scope", "guard": "scope"}


def _signed_receipts() -> list[tuple[str, dict[str, Any]]]:
    signed: list[tuple[str, dict[str, Any]]] = []
    for label, parameters in PARAMETERS.items():
        for verdict, decision in (("allow", ALLOW), ("deny", DENY)):
            body = _receipt_body(parameters, decision)
            receipt = schemas.sign_kernel_receipt(body, KERNEL, nonce=f"rcpt-{verdict}-{label}")
            signed.append((f"ours-{verdict}-{label}", receipt))
    variants: dict[str, dict[str, Any]] = {
        "no-metadata": {"metadata": None},
        "string-metadata": {"metadata": "operator note"},
        "evidence": {
            "evidence": [
                {"guard_name": "scope", "verdict": False, "details": "no grant"},
                {"guard_name": "budget", "verdict": True},
            ]
        },
        "actor-chain-tenant": {
            "actor_chain": [{"actor_id": "agent-1", "actor_kind": "agent"}, {"actor_id": "w-1"}],
            "tenant_id": "tenant-ü",
        },
        "cancelled": {"decision": {"verdict": "cancelled", "reason": "worker shut down"}},
        "output-hash": {"content_hash": schemas.content_hash({"charged": 12.5, "ok": True})},
        "trace-observation": {
            "decision": None,
            "receipt_kind": "trace_observation",
            "boundary_class": "detect_only",
            "observation_outcome": "observed",
            "trust_level": "verified",
        },
        "advisory": {
            "decision": None,
            "receipt_kind": "advisory_evaluation",
            "boundary_class": "advisory_only",
            "observation_outcome": "evaluated",
            "trust_level": "advisory",
        },
    }
    for label, overrides in variants.items():
        body = {**_receipt_body(PARAMETERS["simple"], DENY), **overrides}
        body = {k: v for k, v in body.items() if not (k == "decision" and v is None)}
        receipt = schemas.sign_kernel_receipt(body, KERNEL, nonce=f"rcpt-variant-{label}")
        signed.append((f"ours-{label}", receipt))
    return signed


def _vector_receipts() -> list[tuple[str, dict[str, Any]]]:
    v318 = json.loads((VECTORS / "v318_receipt_bundle.json").read_text("utf-8"))
    loopback = json.loads((VECTORS / "loopback_tool_receipts.json").read_text("utf-8"))
    vectors = [("vector-v318", v318)]
    vectors += [(f"vector-loopback-{i}", r) for i, r in enumerate(loopback["toolReceipts"])]
    return vectors


def _receipt_tampers(receipt: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def changed(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        copy_ = copy.deepcopy(receipt)
        edit(copy_)
        return copy_

    def field(r: dict[str, Any]) -> None:
        r["tool_name"] = r["tool_name"] + "-x"

    def parameter(r: dict[str, Any]) -> None:
        r["action"]["parameters"] = {**r["action"]["parameters"], "injected": 1}

    def nonce(r: dict[str, Any]) -> None:
        metadata = r.get("metadata") or {}
        metadata[schemas.RECEIPT_NONCE_KEY] = str(metadata.get(schemas.RECEIPT_NONCE_KEY)) + "-2"
        r["metadata"] = metadata

    def receipt_id(r: dict[str, Any]) -> None:
        r["id"] = _flip_hex(r["id"])

    def signature(r: dict[str, Any]) -> None:
        r["signature"] = _flip_hex(r["signature"], 5)

    def kernel_key(r: dict[str, Any]) -> None:
        r["kernel_key"] = _hex(OTHER)

    def timestamp(r: dict[str, Any]) -> None:
        r["timestamp"] = r["timestamp"] + 1

    return {
        "field": changed(field),
        "parameter": changed(parameter),
        "nonce": changed(nonce),
        "id": changed(receipt_id),
        "signature": changed(signature),
        "kernel-key": changed(kernel_key),
        "timestamp": changed(timestamp),
    }


def _reordered(document: dict[str, Any]) -> dict[str, Any]:
    return dict(reversed(list(document.items())))


def receipt_corpus() -> list[Item]:
    items: list[Item] = []
    for name, receipt in _vector_receipts() + _signed_receipts():
        items.append((name, receipt, True))
        items.append((f"{name}/reordered", _reordered(receipt), True))
        items += [(f"{name}/{t}", r, False) for t, r in _receipt_tampers(receipt).items()]
    return items


# ---------------------------------------------------------------- capability tokens


def _token_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "cap-oracle-1",
        "subject": _hex(AGENT),
        "scope": {
            "grants": [
                {"server_id": "temporal", "tool_name": "charge_card", "operations": ["invoke"]}
            ]
        },
        "issued_at": 1_700_000_000,
        "expires_at": 1_700_003_600,
    }
    body.update(overrides)
    return body


SCOPES: dict[str, dict[str, Any]] = {
    "one-grant": _token_body()["scope"],
    "empty": {},
    "rich-grants": {
        "grants": [
            {
                "server_id": "temporal",
                "tool_name": "charge_card",
                "operations": ["invoke", "delegate"],
                "constraints": [
                    {"type": "max_length", "value": 32},
                    {"type": "path_prefix", "value": "/srv/ü"},
                ],
                "max_invocations": 5,
                "max_cost_per_invocation": {"units": 100, "currency": "USD"},
                "max_total_cost": {"units": 1000, "currency": "USD"},
                "dpop_required": True,
            },
            {"server_id": "*", "tool_name": "read_status", "operations": ["read_result"]},
        ]
    },
    "resources-prompts": {
        "resource_grants": [{"uri_pattern": "file:///data/*", "operations": ["read", "subscribe"]}],
        "prompt_grants": [{"prompt_name": "summarise", "operations": ["get"]}],
    },
}


def _legacy_signed(body: dict[str, Any]) -> dict[str, Any]:
    # The kernel still accepts a plain token signed over its pre-schema body.
    token = schemas.sign_capability_token(body, ISSUER)
    unsigned = {k: v for k, v in token.items() if k not in ("signature", "schema")}
    signature = ISSUER.sign(schemas.canonical_json(unsigned)).signature.hex()
    return {**token, "signature": signature}


def _signed_tokens() -> list[tuple[str, dict[str, Any]]]:
    tokens = [
        (f"token-{label}", schemas.sign_capability_token(_token_body(scope=scope), ISSUER))
        for label, scope in SCOPES.items()
    ]
    tokens.append(
        ("token-unicode-id", schemas.sign_capability_token(_token_body(id="cap-café-😀"), ISSUER))
    )
    tokens.append(("token-legacy-body", _legacy_signed(_token_body())))
    link = schemas.sign_delegation_link(
        {
            "capability_id": "cap-oracle-1",
            "delegatee": _hex(DELEGATE_KEY),
            "attenuations": [
                {"type": "reduce_budget", "server_id": "temporal", "tool_name": "charge_card"}
                | {"max_invocations": 1}
            ],
            "timestamp": 1_700_000_100,
        },
        AGENT,
    )
    tokens.append(
        (
            "token-delegated",
            schemas.sign_capability_token(
                _token_body(id="cap-oracle-2", subject=_hex(DELEGATE_KEY), delegation_chain=[link]),
                ISSUER,
            ),
        )
    )
    return tokens


def _token_tampers(token: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def changed(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        copy_ = copy.deepcopy(token)
        edit(copy_)
        return copy_

    def scope(t: dict[str, Any]) -> None:
        t["scope"] = SCOPES["one-grant"] if t["scope"] != SCOPES["one-grant"] else {}

    def expires(t: dict[str, Any]) -> None:
        t["expires_at"] = t["expires_at"] + 1

    def subject(t: dict[str, Any]) -> None:
        t["subject"] = _hex(OTHER)

    def token_id(t: dict[str, Any]) -> None:
        t["id"] = t["id"] + "-2"

    def signature(t: dict[str, Any]) -> None:
        t["signature"] = _flip_hex(t["signature"], 7)

    def issuer(t: dict[str, Any]) -> None:
        t["issuer"] = _hex(OTHER)

    def schema(t: dict[str, Any]) -> None:
        t["schema"] = "chio.capability.v2"

    return {
        "scope": changed(scope),
        "expires": changed(expires),
        "subject": changed(subject),
        "id": changed(token_id),
        "signature": changed(signature),
        "issuer": changed(issuer),
        "schema": changed(schema),
    }


def token_corpus() -> list[Item]:
    items: list[Item] = []
    for name, token in _signed_tokens():
        items.append((name, token, True))
        items.append((f"{name}/reordered", _reordered(token), True))
        items += [(f"{name}/{t}", tok, False) for t, tok in _token_tampers(token).items()]
    return items


RECEIPTS = receipt_corpus()
TOKENS = token_corpus()


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def kernel_receipt_verdicts(kernel_verify: Verify) -> dict[str, str]:
    verdicts = kernel_verify([_line(doc) for _, doc, _ in RECEIPTS], "receipts")
    return {name: verdict for (name, _, _), verdict in zip(RECEIPTS, verdicts, strict=True)}


@pytest.fixture(scope="module")
def kernel_token_verdicts(kernel_verify: Verify) -> dict[str, str]:
    verdicts = kernel_verify([_line(doc) for _, doc, _ in TOKENS], "capabilities")
    return {name: verdict for (name, _, _), verdict in zip(TOKENS, verdicts, strict=True)}


def test_the_corpus_is_what_it_claims() -> None:
    # Every signed item must be valid and every tampered one invalid for our verifier, with a
    # reason: otherwise agreement alone would prove nothing. (Runs without the kernel too.)
    for name, receipt, expected in RECEIPTS:
        ours = schemas.verify_kernel_receipt(receipt)
        assert ours.valid is expected, (name, ours.reason)
    for name, token, expected in TOKENS:
        assert schemas.verify_capability_token(token).signature_valid is expected, name
    assert len(RECEIPTS) >= 200
    assert len(TOKENS) >= 50


@pytest.mark.parametrize(
    ("name", "receipt", "expected"), RECEIPTS, ids=[name for name, _, _ in RECEIPTS]
)
def test_kernel_and_python_agree_on_receipt(
    kernel_receipt_verdicts: dict[str, str], name: str, receipt: dict[str, Any], expected: bool
) -> None:
    kernel = kernel_receipt_verdicts[name]
    ours = schemas.verify_kernel_receipt(json.loads(_line(receipt)))
    assert (kernel == "valid") is ours.valid, f"kernel: {kernel}; ours: {ours.reason}"
    assert ours.valid is expected, ours.reason


@pytest.mark.parametrize(("name", "token", "expected"), TOKENS, ids=[name for name, _, _ in TOKENS])
def test_kernel_and_python_agree_on_capability_token(
    kernel_token_verdicts: dict[str, str], name: str, token: dict[str, Any], expected: bool
) -> None:
    # CapabilityToken::verify_signature checks the issuer's signature (and the schema); the
    # delegation chain is checked elsewhere in the kernel. Compare like with like.
    kernel = kernel_token_verdicts[name]
    ours = schemas.verify_capability_token(json.loads(_line(token)))
    assert (kernel == "valid") is ours.signature_valid, f"kernel: {kernel}; ours: {ours.reason}"
    assert ours.signature_valid is expected, ours.reason
    if "delegation_chain" not in token:
        assert ours.valid is ours.signature_valid


def test_the_kernel_verifier_reports_a_reason(kernel_verify: Verify) -> None:
    verdicts = kernel_verify(['{"id": 1}', "not json", _line(RECEIPTS[0][1])], "receipts")
    assert verdicts[0].startswith("invalid parse:")
    assert verdicts[1].startswith("invalid parse:")
    assert verdicts[2] == "valid"
