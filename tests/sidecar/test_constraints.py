"""The constraints guard: each Chio constraint type, as the kernel evaluates it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chio_receipts.sidecar._constraints import (
    CONSTRAINT_TYPES,
    ConstraintGuard,
    check_constraints,
)
from chio_receipts.sidecar._guards import CallContext, GuardVerdict

pytestmark = pytest.mark.unit


def _c(kind: str, value: Any = None) -> dict[str, Any]:
    return {"type": kind} if value is None else {"type": kind, "value": value}


def _verdict(constraint: dict[str, Any], params: Any) -> GuardVerdict:
    return check_constraints([constraint], params).verdict


ALLOW, DENY, APPROVAL = GuardVerdict.ALLOW, GuardVerdict.DENY, GuardVerdict.APPROVAL_REQUIRED


@pytest.mark.parametrize(
    ("constraint", "params", "expected"),
    [
        # path_prefix: the kernel's own cases (traversal, sibling prefix), and no path at all.
        (_c("path_prefix", "/workspace/safe"), {"path": "/workspace/safe/report.txt"}, ALLOW),
        (_c("path_prefix", "/workspace/safe"), {"path": "/workspace/safe/../secret.txt"}, DENY),
        (_c("path_prefix", "/workspace/safe"), {"path": "/workspace/safeX/report.txt"}, DENY),
        (_c("path_prefix", "/workspace/safe"), {"msg": "hello"}, DENY),
        (_c("path_prefix", "/w"), {"note": "x", "file": "/w/a"}, ALLOW),
        (_c("domain_exact", "api.example.com"), {"url": "https://API.example.com/x"}, ALLOW),
        (_c("domain_exact", "api.example.com"), {"url": "https://evil.com/x"}, DENY),
        (_c("domain_glob", "*.example.com"), {"url": "https://a.example.com:8443/p"}, ALLOW),
        (_c("domain_glob", "*.example.com"), {"url": "https://example.org"}, DENY),
        (_c("domain_glob", "*.example.com"), {"n": 1}, DENY),
        (_c("regex_match", "^forbidden"), {"args": ["forbidden task"]}, ALLOW),
        (_c("regex_match", "^ok$"), {"args": ["forbidden task"]}, DENY),
        (_c("regex_match", "(?!x)"), {"args": ["y"]}, DENY),  # no look-around in Rust regex
        (_c("max_length", 3), {"a": "abc"}, ALLOW),
        (_c("max_length", 3), {"a": "é é"}, DENY),  # 5 UTF-8 bytes
        (_c("max_args_size", 12), {"a": "bc"}, ALLOW),  # {"a":"bc"} is 10 bytes
        (_c("max_args_size", 9), {"a": "bc"}, DENY),
        (_c("custom", ["env", "prod"]), {"x": {"env": "prod"}}, ALLOW),
        (_c("custom", ["env", "prod"]), {"env": "dev"}, DENY),
        (_c("audience_allowlist", ["#ops"]), {"recipient": "#ops"}, ALLOW),
        (_c("audience_allowlist", ["#ops"]), {"recipient": {"channel": "#ops"}}, DENY),
        (_c("audience_allowlist", ["#ops"]), {"recipients": []}, DENY),
        (_c("audience_allowlist", ["#ops"]), {"body": "hi"}, ALLOW),
        (_c("memory_store_allowlist", ["cache"]), {"store": "cache"}, ALLOW),
        (_c("memory_store_allowlist", ["cache"]), {"store": None}, DENY),
        (_c("memory_write_deny_patterns", ["^forbidden"]), {"args": ["forbidden x"]}, DENY),
        (_c("memory_write_deny_patterns", ["^forbidden"]), {"args": ["fine", 3]}, ALLOW),
        (_c("governed_intent_required"), {}, DENY),
        (_c("seller_exact", "shop"), {}, DENY),
        (_c("minimum_runtime_assurance", "attested"), {}, DENY),
        (_c("minimum_autonomy_tier", "delegated"), {}, DENY),
        (_c("require_approval_above", {"threshold_units": 100}), {"amount": 100}, APPROVAL),
        (_c("require_approval_above", {"threshold_units": 100}), {"args": [{"amount": 99}]}, ALLOW),
        (_c("require_approval_above", {"threshold_units": 100}), {"args": ["x", 500]}, ALLOW),
        (_c("require_cumulative_approval_above", {"threshold": {}}), {}, APPROVAL),
        (_c("require_dual_approval", True), {}, APPROVAL),
        (_c("require_dual_approval", False), {}, ALLOW),
        (_c("max_transaction_amount_usd", "100.00"), {"args": [{"amount_usd": 100}]}, ALLOW),
        (_c("max_transaction_amount_usd", "100.00"), {"args": [{"amount_usd": "100.01"}]}, DENY),
        (_c("max_transaction_amount_usd", "100.00"), {"args": ["x"]}, DENY),
        (_c("table_allowlist", ["t"]), {}, ALLOW),
        (_c("column_denylist", ["t.c"]), {}, ALLOW),
        (_c("max_rows_returned", 5), {}, ALLOW),
        (_c("operation_class", "read_only"), {}, ALLOW),
        (_c("content_review_tier", "strict"), {"text": "x"}, DENY),
        (_c("model_constraint", {"allowed_model_ids": ["m"], "min_safety_tier": None}), {}, DENY),
        (_c("model_constraint", {"allowed_model_ids": [], "min_safety_tier": None}), {}, ALLOW),
        (_c("no_such_type", 1), {}, DENY),
        (_c("max_length", "not a number"), {"a": "x"}, DENY),
    ],
)
def test_each_constraint_type(
    constraint: dict[str, Any], params: Any, expected: GuardVerdict
) -> None:
    assert _verdict(constraint, params) is expected


def test_every_model_type_has_a_case() -> None:
    assert {"path_prefix", "regex_match", "max_args_size", "require_approval_above"} <= (
        CONSTRAINT_TYPES
    )
    assert len(CONSTRAINT_TYPES) == 24  # the 24 variants of chio-core-types 0.1.2


def test_deny_names_constraint_index_and_parameter_never_the_value() -> None:
    secret = "forbidden: the launch codes"
    result = check_constraints(
        [_c("max_length", 100), _c("memory_write_deny_patterns", ["^forbidden"])],
        {"args": [{"note": secret}]},
        grant_index=2,
    )
    assert result.verdict is DENY
    assert result.guard == "constraints"
    assert result.constraint == "memory_write_deny_patterns[1]"
    assert result.details == {
        "constraint_type": "memory_write_deny_patterns",
        "constraint_index": 1,
        "grant_index": 2,
        "parameter": "note",
    }
    assert secret not in result.reason
    assert "launch" not in str(result.details)


def test_a_deny_wins_over_an_approval() -> None:
    result = check_constraints(
        [_c("require_dual_approval", True), _c("max_length", 1)], {"a": "long"}
    )
    assert result.verdict is DENY
    assert result.constraint == "max_length[1]"


def _call(grants: list[dict[str, Any]], index: int, params: Any) -> CallContext:
    return CallContext(
        capability_id="cap-1",
        tool_server="srv",
        tool="tool",
        parameters=params,
        grant=grants[index],
        grant_index=index,
        token={"scope": {"grants": grants}},
    )


def test_guard_takes_another_covering_grant_whose_constraints_hold() -> None:
    grants = [
        {
            "server_id": "srv",
            "tool_name": "tool",
            "operations": ["invoke"],
            "constraints": [_c("max_length", 2)],
        },
        {"server_id": "*", "tool_name": "tool", "operations": ["invoke"]},
    ]
    result = ConstraintGuard().check(_call(grants, 0, {"a": "long"}))
    assert result.verdict is ALLOW
    assert result.details["grant_index"] == 1
    only = ConstraintGuard().check(_call(grants[:1], 0, {"a": "long"}))
    assert only.verdict is DENY


def test_guard_allows_a_capability_without_kernel_grants() -> None:
    call = CallContext(capability_id="c", tool_server="s", tool="t", parameters={"a": "x"})
    assert ConstraintGuard().check(call).verdict is ALLOW


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(params=_json, limit=st.integers(0, 40))
def test_max_length_is_every_leaf_within_limit(params: Any, limit: int) -> None:
    def leaves(v: Any) -> list[str]:
        if isinstance(v, str):
            return [v]
        if isinstance(v, list):
            return [s for x in v for s in leaves(x)]
        if isinstance(v, dict):
            return [s for x in v.values() for s in leaves(x)]
        return []

    expected = all(len(s.encode()) <= limit for s in leaves(params))
    assert (_verdict(_c("max_length", limit), params) is ALLOW) == expected


@given(params=_json)
def test_a_deny_never_carries_a_string_of_the_parameters(params: Any) -> None:
    result = check_constraints(
        [_c("regex_match", "^\\x00never$"), _c("path_prefix", "/none")], params
    )
    assert result.verdict is DENY
    assert set(result.details) <= {"constraint_type", "constraint_index", "parameter"}


@given(segments=st.lists(st.sampled_from(["a", "b", "..", ".", ""]), max_size=6))
def test_path_prefix_never_allows_an_escape(segments: list[str]) -> None:
    path = "/root/" + "/".join(segments)
    allowed = _verdict(_c("path_prefix", "/root"), {"path": path}) is ALLOW
    depth, escaped = 1, False
    for s in segments:
        if s == "..":
            depth -= 1
            escaped = escaped or depth < 1
        elif s not in ("", "."):
            depth += 1
    assert allowed == (not escaped)
