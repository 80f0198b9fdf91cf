"""The Chio kernel wire format: canonical JSON, receipts and capability tokens, checked against
the kernel crates' own signed vectors (``vectors/README.md``), RFC 8785's examples, and chio-sdk.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

import chio_receipts.schemas as schemas

pytestmark = pytest.mark.unit

VECTORS = Path(__file__).parent / "vectors"
# chio-attest-verify 0.1.2, tests/migration.rs: classical_seed() and the body's pre-binding id.
V318_SEED = b"chio-v318-fixture-seed-receipt-v"
V318_NONCE = "rcpt-v318-fixture-001"
NULL_CONTENT_HASH = "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b"

KERNEL = nacl.signing.SigningKey(bytes(range(32)))
ISSUER = nacl.signing.SigningKey(bytes([7]) * 32)
AGENT = nacl.signing.SigningKey(bytes([11]) * 32)
DELEGATE_KEY = nacl.signing.SigningKey(bytes([13]) * 32)


def _hex(key: nacl.signing.SigningKey) -> str:
    return bytes(key.verify_key).hex()


def _jcs(value: object) -> str:
    return schemas.canonical_json(value).decode("utf-8")


def _v318() -> dict[str, Any]:
    return json.loads((VECTORS / "v318_receipt_bundle.json").read_text("utf-8"))


def _loopback() -> dict[str, Any]:
    return json.loads((VECTORS / "loopback_tool_receipts.json").read_text("utf-8"))


def _deny_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "timestamp": 1_795_847_358,
        "capability_id": "cap-1",
        "tool_server": "temporal",
        "tool_name": "charge",
        "action": {"parameters": {"amount": 12.5, "to": "x", "note": "caf\u00e9 \x7f"}},
        "decision": {"verdict": "deny", "reason": "out of scope", "guard": "scope"},
        "receipt_kind": "mediated_decision",
        "boundary_class": "prevent",
        "tool_origin": "caller_executed",
        "redaction_mode": "none",
        "content_hash": schemas.content_hash(),
        "policy_hash": schemas.content_hash({"policy": "v1"}),
        "evidence": [{"guard_name": "scope", "verdict": False, "details": "no grant"}],
        "metadata": {"receipt_context": {"request_id": "req-1"}},
        "trust_level": "mediated",
    }
    body.update(overrides)
    return body


# ---------------------------------------------------------------- canonical JSON


# RFC 8785, Appendix B: IEEE 754 bit patterns and their canonical text.
RFC8785_NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "expected"), RFC8785_NUMBERS)
def test_rfc8785_appendix_b_numbers(bits: str, expected: str) -> None:
    (value,) = struct.unpack(">d", bytes.fromhex(bits))
    assert _jcs(value) == expected


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_nan_and_infinity_are_rejected(bits: str) -> None:
    (value,) = struct.unpack(">d", bytes.fromhex(bits))
    with pytest.raises(schemas.ChioWireError, match="no JSON form"):
        schemas.canonical_json({"x": [value]})


def test_rfc8785_section_3_2_4_example() -> None:
    text = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        ' "literals": [null, true, false]}'
    )
    assert (
        schemas.canonical_json(json.loads(text))
        == (
            '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
            '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
        ).encode()
    )


def test_keys_sort_by_utf16_code_units_rfc8785_section_3_2_3() -> None:
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    # RFC 8785's order. The kernel escapes the C1 control U+0080 (RFC 8785 leaves it raw).
    assert _jcs(value) == (
        '{"\\r":"Carriage Return","1":"One","\\u0080":"Control",'
        '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign",'
        '"\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Where chio-sdk 0.1.0's canonicalize_json differs from the kernel.
        (1e16, "10000000000000000"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1e-6, "0.000001"),
        (5e-324, "5e-324"),
        ("a\x7fb", '"a\\u007fb"'),
        ("\x80\x9f", '"\\u0080\\u009f"'),
        # The kernel's escaping otherwise: shorthand escapes, lowercase hex, nothing else.
        ("\x00\x1f\b\f\n\r\t", '"\\u0000\\u001f\\b\\f\\n\\r\\t"'),
        ("\u2028\u2029\u00a0/", '"\u2028\u2029\u00a0/"'),
        (1.0, "1"),
        (-0.0, "0"),
        (1e21, "1e+21"),
        (1e-7, "1e-7"),
        (123.456, "123.456"),
        (2**64 - 1, "18446744073709551615"),
        (-(2**63), "-9223372036854775808"),
        ((1, "a", None), '[1,"a",null]'),
        ({"b": [], "a": {}}, '{"a":{},"b":[]}'),
    ],
)
def test_kernel_canonical_form(value: object, expected: str) -> None:
    assert _jcs(value) == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (2**64, "64-bit"),
        (-(2**63) - 1, "64-bit"),
        ({1: "x"}, "keys must be strings"),
        ("\ud800", "surrogate"),
        ({"x": b"bytes"}, "bytes has no JSON form"),
        ({"x": {1, 2}}, "no JSON form"),
    ],
)
def test_values_without_a_canonical_form_raise(value: object, match: str) -> None:
    with pytest.raises(schemas.ChioWireError, match=match) as info:
        schemas.canonical_json(value)
    assert not schemas.is_retriable(info.value)
    assert isinstance(info.value, schemas.ProtocolError)


def test_safe_integers_follows_the_strict_text_path() -> None:
    assert _jcs(2**53 - 1) == "9007199254740991"
    assert schemas.canonical_json(-(2**53 - 1), safe_integers=True) == b"-9007199254740991"
    with pytest.raises(schemas.ChioWireError, match="I-JSON"):
        schemas.canonical_json({"n": 2**53}, safe_integers=True)


def test_hashes() -> None:
    assert schemas.content_hash() == NULL_CONTENT_HASH
    assert schemas.content_hash(None) == NULL_CONTENT_HASH
    assert schemas.parameter_hash({"q": "audit"}) == _v318()["action"]["parameter_hash"]
    chunks = [{"a": 1}, "b"]
    joined = "".join(schemas.content_hash(c) for c in chunks).encode()
    assert schemas.stream_content_hash(chunks) == hashlib.sha256(joined).hexdigest()


# ---------------------------------------------------------------- the kernel's receipt vectors


def test_v318_vector_verifies() -> None:
    fixture = _v318()
    result = schemas.verify_kernel_receipt(fixture)
    assert result.valid, result.reason
    assert result.receipt_id_valid
    assert result.signature_valid
    assert result.semantics_valid
    assert result.parameter_hash_valid
    assert schemas.receipt_id(fixture) == fixture["id"]


def test_v318_vector_is_reproduced_byte_for_byte() -> None:
    fixture = _v318()
    body = {k: v for k, v in fixture.items() if k not in ("id", "signature", "kernel_key")}
    del body["metadata"]  # the nonce binding recreates it
    signed = schemas.sign_kernel_receipt(body, nacl.signing.SigningKey(V318_SEED), nonce=V318_NONCE)
    assert signed["id"] == fixture["id"]
    assert signed["signature"] == fixture["signature"]
    assert signed["kernel_key"] == fixture["kernel_key"]
    assert list(signed.items()) == list(fixture.items())  # same fields, same order
    keypair = schemas.KeyPair.from_seed("k", V318_SEED)
    assert schemas.sign_kernel_receipt(body, keypair, nonce=V318_NONCE) == signed


def test_loopback_vectors_verify_under_their_vendor_keys() -> None:
    package = _loopback()
    vendor_keys = [vendor["publicKey"] for vendor in package["vendorKeys"]]
    assert len(package["toolReceipts"]) == 3
    for receipt in package["toolReceipts"]:
        result = schemas.verify_kernel_receipt(receipt, trusted_keys=vendor_keys)
        assert result.valid, result.reason
        assert result.parameter_hash_valid
        assert schemas.receipt_id(receipt) == receipt["id"]
    untrusted = schemas.verify_kernel_receipt(package["toolReceipts"][0], trusted_keys=["00" * 32])
    assert not untrusted
    assert untrusted.signature_valid
    assert untrusted.reason == "kernel_key is not a trusted signer"


def _signed_leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _signed_leaves(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _signed_leaves(v, (*path, i))]
    return [path]


def _tamper(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return "x"


def _all_receipt_vectors() -> list[dict[str, Any]]:
    return [_v318(), *_loopback()["toolReceipts"]]


@pytest.mark.parametrize("index", range(4))
def test_any_changed_signed_field_fails(index: int) -> None:
    receipt = _all_receipt_vectors()[index]
    leaves = [p for p in _signed_leaves(receipt) if p[0] not in ("signature",)]
    assert len(leaves) > 10
    for path in leaves:
        tampered = copy.deepcopy(receipt)
        target = tampered
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = _tamper(target[path[-1]])
        result = schemas.verify_kernel_receipt(tampered)
        assert not result.valid, f"changing {path} went unnoticed"


def test_changed_nonce_id_signature_or_key_fail() -> None:
    fixture = _v318()
    cases: dict[str, dict[str, Any]] = {}
    cases["nonce"] = copy.deepcopy(fixture)
    cases["nonce"]["metadata"]["chio_receipt_signing_nonce"] = "rcpt-v318-fixture-002"
    cases["no nonce"] = copy.deepcopy(fixture)
    del cases["no nonce"]["metadata"]
    cases["id"] = {**fixture, "id": "0" * 64}
    cases["signature"] = {**fixture, "signature": "00" * 64}
    cases["short signature"] = {**fixture, "signature": "00"}
    cases["other key"] = {**fixture, "kernel_key": _hex(KERNEL)}
    cases["p256 key"] = {**fixture, "kernel_key": "p256:04" + "00" * 64}
    cases["verdict"] = {**fixture, "decision": {"verdict": "deny", "reason": "r", "guard": "g"}}
    cases["no decision"] = {k: v for k, v in fixture.items() if k != "decision"}
    cases["added tenant"] = {**fixture, "tenant_id": "t1"}
    cases["added actor"] = {**fixture, "actor_chain": [{"actor_id": "a"}]}
    for name, receipt in cases.items():
        result = schemas.verify_kernel_receipt(receipt)
        assert not result, name
        assert result.reason, name
    assert not schemas.verify_kernel_receipt(cases["id"]).receipt_id_valid
    assert schemas.verify_kernel_receipt(cases["nonce"]).reason == (
        "the id is not the hash of the receipt body"
    )


def test_verification_reads_a_receipt_as_the_kernel_serde_types_do() -> None:
    fixture = _v318()
    equivalent = {
        **fixture,
        "kernel_key": "0x" + fixture["kernel_key"].upper(),
        "tenant_id": None,
        "evidence": [],
        "actor_chain": None,
        "observation_outcome": None,
        "unknown_field": "ignored by the kernel",
        "decision": {"verdict": "allow", "reason": None},
    }
    result = schemas.verify_kernel_receipt(equivalent)
    assert result.valid, result.reason
    assert result.kernel_key == fixture["kernel_key"]


def test_malformed_receipts_are_invalid_not_errors() -> None:
    fixture = _v318()
    for broken in (
        {},
        {**fixture, "timestamp": "1700000001"},
        {**fixture, "timestamp": -1},
        {**fixture, "action": {"parameter_hash": "x"}},
        {**fixture, "receipt_kind": "MediatedDecision"},
        {**fixture, "decision": {"verdict": "Allow"}},
        {**fixture, "evidence": [{"guard_name": "g", "verdict": "yes"}]},
        {**fixture, "bbs_projection_version": "chio.bbs-projection.receipt.v1"},
        {**fixture, "action": {**fixture["action"], "parameters": {"x": float("nan")}}},
    ):
        result = schemas.verify_kernel_receipt(broken)
        assert not result
        assert result.reason
        assert result.reason.startswith("malformed receipt")


# ---------------------------------------------------------------- signing receipts


def test_signed_deny_receipt_verifies_and_binds_the_nonce() -> None:
    receipt = schemas.sign_kernel_receipt(_deny_body(), KERNEL, nonce="  rcpt-0190  ")
    result = schemas.verify_kernel_receipt(receipt, trusted_keys=[_hex(KERNEL)])
    assert result.valid, result.reason
    assert receipt["kernel_key"] == _hex(KERNEL)
    assert receipt["metadata"] == {
        "receipt_context": {"request_id": "req-1"},
        "chio_receipt_signing_nonce": "rcpt-0190",
    }
    assert receipt["action"]["parameter_hash"] == schemas.parameter_hash(
        receipt["action"]["parameters"]
    )
    assert receipt["id"] == schemas.receipt_id(receipt)
    assert json.loads(json.dumps(receipt)) == receipt  # plain JSON, nothing but dicts and lists


def test_nonce_binding_follows_the_kernel() -> None:
    wrapped = schemas.sign_kernel_receipt(_deny_body(metadata=[1, 2]), KERNEL, nonce="n1")
    assert wrapped["metadata"] == {"original_metadata": [1, 2], "chio_receipt_signing_nonce": "n1"}
    unbound = schemas.sign_kernel_receipt(_deny_body(metadata=None), KERNEL, nonce=" ")
    assert "metadata" not in unbound
    generated = schemas.sign_kernel_receipt(_deny_body(), KERNEL)
    nonce = generated["metadata"]["chio_receipt_signing_nonce"]
    assert nonce.startswith("rcpt-")
    assert len(nonce) == len("rcpt-") + 36
    for receipt in (wrapped, unbound, generated):
        assert schemas.verify_kernel_receipt(receipt).valid


def test_signing_writes_the_normal_form() -> None:
    receipt = schemas.sign_kernel_receipt(
        _deny_body(evidence=[], actor_chain=None, tenant_id=None, observation_outcome=None),
        KERNEL,
        nonce="n",
    )
    for field in ("evidence", "actor_chain", "tenant_id", "observation_outcome"):
        assert field not in receipt
    assert schemas.verify_kernel_receipt(receipt).valid


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"decision": None}, "require a prevent boundary"),
        ({"boundary_class": "detect_only"}, "require a prevent boundary"),
        ({"boundary_class": "cannot_see"}, "cannot_see"),
        ({"trust_level": "verified"}, "trust_level mediated"),
        (
            {"receipt_kind": "advisory_evaluation", "boundary_class": "advisory_only"},
            "must not carry an authorization decision",
        ),
        ({"id": "rcpt-1"}, "does not sign"),
        ({"signature": "00"}, "does not sign"),
        ({"kernel_key": "11" * 32}, "not the public key"),
        ({"action": {"parameters": {}, "parameter_hash": "0" * 64}}, "parameter_hash"),
        ({"tool_origin": "CallerExecuted"}, "tool_origin must be one of"),
    ],
)
def test_unsignable_bodies_raise(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(schemas.ChioWireError, match=match):
        schemas.sign_kernel_receipt(_deny_body(**overrides), KERNEL, nonce="n")


def test_trace_and_advisory_receipts_sign_without_a_decision() -> None:
    for kind, boundary, trust in (
        ("trace_observation", "detect_only", "verified"),
        ("advisory_evaluation", "advisory_only", "advisory"),
    ):
        body = _deny_body(
            decision=None,
            receipt_kind=kind,
            boundary_class=boundary,
            observation_outcome="observed",
            trust_level=trust,
        )
        assert schemas.verify_kernel_receipt(schemas.sign_kernel_receipt(body, KERNEL)).valid


# ---------------------------------------------------------------- capability tokens


def _token_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "cap-1",
        "subject": _hex(AGENT),
        "scope": {
            "grants": [
                {
                    "server_id": "temporal",
                    "tool_name": "charge",
                    "operations": ["invoke", "delegate"],
                    "constraints": [{"type": "max_length", "value": 32}],
                    "max_invocations": 5,
                    "max_cost_per_invocation": {"units": 100, "currency": "USD"},
                }
            ]
        },
        "issued_at": 1_700_000_000,
        "expires_at": 1_700_003_600,
    }
    body.update(overrides)
    return body


def _delegated_pair() -> tuple[dict[str, Any], dict[str, Any]]:
    parent = schemas.sign_capability_token(_token_body(), ISSUER)
    link = schemas.sign_delegation_link(
        {
            "capability_id": parent["id"],
            "delegatee": _hex(DELEGATE_KEY),
            "attenuations": [
                {
                    "type": "reduce_budget",
                    "server_id": "temporal",
                    "tool_name": "charge",
                    "max_invocations": 1,
                }
            ],
            "timestamp": 1_700_000_100,
        },
        AGENT,
    )
    child = schemas.sign_capability_token(
        _token_body(id="cap-2", subject=_hex(DELEGATE_KEY), delegation_chain=[link]), ISSUER
    )
    return parent, child


def test_signed_token_has_the_kernel_shape_and_verifies() -> None:
    token = schemas.sign_capability_token(_token_body(), ISSUER)
    assert list(token) == [
        "schema",
        "id",
        "issuer",
        "subject",
        "scope",
        "issued_at",
        "expires_at",
        "signature",
    ]
    assert token["schema"] == schemas.CAPABILITY_SCHEMA
    assert token["issuer"] == _hex(ISSUER)
    result = schemas.verify_capability_token(token, now=1_700_000_001)
    assert result.valid, result.reason
    assert result.time_status == "valid"
    assert schemas.verify_capability_token(token, now=1_700_003_600).time_status == "expired"
    early = schemas.verify_capability_token(token, now=1_699_999_999)
    assert not early
    assert early.signature_valid
    assert early.time_status == "not_yet_valid"


def test_token_verification_reads_it_as_serde_does() -> None:
    token = schemas.sign_capability_token(_token_body(), ISSUER)
    # What a chio-sdk model round trip does to a token: drops schema, adds empty lists.
    sdk_dump = {k: v for k, v in token.items() if k != "schema"}
    sdk_dump["delegation_chain"] = []
    sdk_dump["scope"] = {**token["scope"], "resource_grants": [], "prompt_grants": []}
    sdk_dump["issuer"] = "0x" + token["issuer"].upper()
    assert schemas.verify_capability_token(sdk_dump).valid


def test_changed_token_fields_fail() -> None:
    token = schemas.sign_capability_token(_token_body(), ISSUER)
    for path in _signed_leaves(token):
        if path == ("signature",) or path == ("schema",):
            continue
        tampered = copy.deepcopy(token)
        target = tampered
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = _tamper(target[path[-1]])
        assert not schemas.verify_capability_token(tampered).valid, path
    assert not schemas.verify_capability_token({**token, "schema": "chio.capability.v2"})
    assert not schemas.verify_capability_token({**token, "signature": "00" * 64})


def test_delegation_chain_is_verified() -> None:
    _, child = _delegated_pair()
    result = schemas.verify_capability_token(child, now=1_700_000_200)
    assert result.valid, result.reason
    assert not schemas.verify_capability_token(child, max_delegation_depth=0)
    (link,) = child["delegation_chain"]

    def with_link(**changes: Any) -> dict[str, Any]:
        return {**child, "delegation_chain": [{**link, **changes}]}

    # A changed link needs the issuer to re-sign the token too, or the token signature fails.
    forged = schemas.sign_capability_token(
        {k: v for k, v in with_link(timestamp=1).items() if k not in ("signature", "issuer")},
        ISSUER,
    )
    bad_link = schemas.verify_capability_token(forged)
    assert bad_link.signature_valid
    assert not bad_link.delegation_chain_valid
    assert bad_link.reason == "signature invalid at link index 0"
    unsigned = {k: v for k, v in child.items() if k not in ("signature", "issuer")}
    wrong_leaf = schemas.sign_capability_token({**unsigned, "subject": _hex(AGENT)}, ISSUER)
    assert schemas.verify_capability_token(wrong_leaf).reason == (
        "leaf capability subject does not match the final delegation delegatee"
    )
    second = schemas.sign_delegation_link(
        {"capability_id": "cap-2", "delegatee": _hex(AGENT), "timestamp": 1_700_000_000},
        ISSUER,  # not the previous delegatee
    )
    broken = schemas.sign_capability_token(
        {**unsigned, "subject": _hex(AGENT), "delegation_chain": [link, second]}, ISSUER
    )
    assert schemas.verify_capability_token(broken).reason == (
        "link 1 delegator does not match link 0 delegatee"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"caveats": [{"type": "x"}]},
        {"budget_share_bps": 5000},
        {"attenuation_proof": {"parentScopeHash": "a"}},
        {"aggregate_invocation_budget": {"scope": "capability", "max_invocations": 1}},
        {"algorithm": "p256"},
    ],
)
def test_unsupported_tokens_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(schemas.ChioWireError):
        schemas.sign_capability_token(_token_body(**overrides), ISSUER)
    token = {**schemas.sign_capability_token(_token_body(), ISSUER), **overrides}
    result = schemas.verify_capability_token(token)
    assert not result
    assert result.reason
    assert "token" in result.reason


def test_token_signing_rejects_foreign_fields() -> None:
    with pytest.raises(schemas.ChioWireError, match="does not carry"):
        schemas.sign_capability_token(_token_body(extra=1), ISSUER)
    with pytest.raises(schemas.ChioWireError, match="not the public key"):
        schemas.sign_capability_token(_token_body(issuer=_hex(AGENT)), ISSUER)
    pascal_case = {"grants": [{"server_id": "s", "tool_name": "t", "operations": ["Invoke"]}]}
    with pytest.raises(schemas.ChioWireError, match="operations"):
        schemas.sign_capability_token(_token_body(scope=pascal_case), ISSUER)


# ---------------------------------------------------------------- chio-sdk 0.1.0 (PyPI `chio-sdk`)


def test_chio_sdk_rejects_kernel_receipts_that_the_kernel_accepts() -> None:
    chio_receipt = pytest.importorskip(
        "chio.invariants.receipt", reason="chio-sdk (PyPI) is not installed"
    )
    for receipt in _all_receipt_vectors():
        assert schemas.verify_kernel_receipt(receipt).valid
        verdict = chio_receipt.verify_receipt(receipt)
        assert verdict["parameter_hash_valid"] is True
        assert verdict["signature_valid"] is False, (
            "chio-sdk now verifies genuine kernel receipts: the known disagreement is fixed. "
            "Update the table in docs/CHIO_PROTOCOL.md and turn this test around."
        )


def test_chio_sdk_canonical_json_still_differs_from_the_kernel() -> None:
    chio_json = pytest.importorskip("chio.invariants.json", reason="chio-sdk is not installed")
    for value in (1e16, 0.1 + 0.2, 1e-6, 5e-324, "a\x7fb"):
        assert chio_json.canonicalize_json(value) != _jcs(value), (
            f"chio-sdk now canonicalises {value!r} as the kernel does: update docs/CHIO_PROTOCOL.md"
        )


def test_chio_sdk_accepts_the_tokens_we_sign() -> None:
    chio_capability = pytest.importorskip(
        "chio.invariants.capability", reason="chio-sdk is not installed"
    )
    parent, child = _delegated_pair()
    for token in (parent, child):
        verdict = chio_capability.verify_capability(token, 1_700_000_200)
        assert verdict == {
            "signature_valid": True,
            "delegation_chain_valid": True,
            "time_valid": True,
            "time_status": "valid",
        }
    tampered = {**parent, "expires_at": parent["expires_at"] + 1}
    assert chio_capability.verify_capability(tampered, 1_700_000_200)["signature_valid"] is False
