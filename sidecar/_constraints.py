r"""The ``constraints`` guard: a grant's Chio constraints, evaluated on the call's parameters.

Each constraint of the Chio model (chio-core-types 0.1.2 ``Constraint``, serde-tagged
``{"type": ..., "value": ...}``) is evaluated as the kernel evaluates it (chio-kernel 0.1.2
``request_matching.rs`` for the argument matchers, ``governed_validation.rs`` for the governed
ones, chio-guards ``content_review.rs`` for the approval threshold):

- the argument matchers walk the string leaves of the parameters (object keys name a leaf, an
  array keeps its parent's key): ``path_prefix`` (leaves under a path-like key or with a
  path-like value; ``..`` normalised, segment-wise prefix), ``domain_exact`` and
  ``domain_glob`` (hosts parsed out of every leaf, ``*`` glob), ``regex_match`` (some leaf
  matches, unanchored), ``max_length`` (every leaf at most N UTF-8 bytes), ``max_args_size``
  (canonical JSON of the parameters at most N bytes), ``custom`` (some object holds
  ``key == value``), ``audience_allowlist``, ``memory_store_allowlist``,
  ``memory_write_deny_patterns`` (no leaf matches any pattern);
- ``governed_intent_required``, ``seller_exact``, ``minimum_runtime_assurance``,
  ``minimum_autonomy_tier`` need a governed transaction intent; no route of this sidecar carries
  one yet, so they deny, as the kernel does without one;
- ``require_approval_above`` answers "approval required" when the call's amount (numeric
  ``amount_units``/``amountUnits``/``amount`` argument) is at or above the threshold, and
  allows a call with no amount (the kernel's content-review guard); the cumulative variant and
  ``require_dual_approval: true`` always ask for approval;
- ``max_transaction_amount_usd`` denies a call whose ``amount_usd`` (or ``amount``) argument
  exceeds the ceiling or that carries no amount: the kernel fails it closed at matching and
  leaves it to a dedicated enforcement path, which this guard is;
- the data-layer constraints the kernel leaves to downstream guards (``table_allowlist``,
  ``column_denylist``, ``max_rows_returned``, ``operation_class``) allow; the ones it fails closed
  without a runtime context (``content_review_tier``, ``model_constraint`` with a requirement:
  no model metadata travels here) deny.

Regular expressions use RE2 (PyPI ``google-re2``), whose syntax is the Rust ``regex`` crate's
(no look-around, no back-references, linear time): a pattern the kernel refuses is refused here
too, and no pattern can backtrack. A pattern that does not compile denies (the kernel's
``InvalidConstraint``). One difference remains: the Perl classes ``\d``, ``\w``, ``\s`` and
``\b`` are ASCII in RE2 and Unicode in Rust's ``regex`` (``\p{N}``, ``\p{L}`` mean the same in
both); Python's ``re`` would match the Unicode classes but backtracks and accepts look-around.

Amounts are read where the kernel reads them: top-level keys of the parameters, and, for the
Temporal activity shape ``{"args": [...]}``, top-level keys of each object argument.

A deny names the guard, the constraint (``"<type>[<index>]"`` in the grant) and, in the
details, the parameter's *name* (the key of the leaf that decided), never its value.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import re2

from chio_receipts.schemas import ChioWireError, canonical_json
from chio_receipts.sidecar._guards import CallContext, GuardResult, GuardVerdict

__all__ = ["CONSTRAINT_TYPES", "GUARD_NAME", "ConstraintGuard", "check_constraints"]

GUARD_NAME: Final = "constraints"

_ARGUMENT_MATCHERS: Final = (
    "path_prefix",
    "domain_exact",
    "domain_glob",
    "regex_match",
    "max_length",
    "max_args_size",
    "custom",
    "audience_allowlist",
    "memory_store_allowlist",
    "memory_write_deny_patterns",
)
_GOVERNED: Final = (
    "governed_intent_required",
    "seller_exact",
    "minimum_runtime_assurance",
    "minimum_autonomy_tier",
)
_APPROVAL: Final = (
    "require_approval_above",
    "require_cumulative_approval_above",
    "require_dual_approval",
)
_DOWNSTREAM: Final = ("table_allowlist", "column_denylist", "max_rows_returned", "operation_class")
_FAIL_CLOSED: Final = ("content_review_tier", "model_constraint", "max_transaction_amount_usd")

CONSTRAINT_TYPES: Final = frozenset(
    _ARGUMENT_MATCHERS + _GOVERNED + _APPROVAL + _DOWNSTREAM + _FAIL_CLOSED
)
"""Every constraint type of the Chio model (chio-core-types 0.1.2), in its serde spelling."""

_AMOUNT_KEYS: Final = ("amount_units", "amountUnits", "amount")
_USD_KEYS: Final = ("amount_usd", "amount")
_AUDIENCE_KEYS: Final = frozenset(
    {"recipient", "recipients", "audience", "to", "channel", "channels"}
)
_STORE_KEYS: Final = frozenset({"store", "memory_store", "collection", "namespace"})
_PATH_KEYS: Final = frozenset({"file", "filepath", "dir", "directory", "root", "cwd"})


@dataclass(frozen=True, slots=True)
class _Leaf:
    key: str | None
    value: str


@dataclass(frozen=True, slots=True)
class _Outcome:
    """One constraint's answer: ``verdict``, why (no value), the parameter that decided."""

    verdict: GuardVerdict
    reason: str = ""
    parameter: str | None = None


_ALLOW: Final = _Outcome(GuardVerdict.ALLOW)


def _leaves(value: Any, key: str | None = None) -> Iterator[_Leaf]:
    if isinstance(value, str):
        yield _Leaf(key, value)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item, key)
    elif isinstance(value, Mapping):
        for k, item in value.items():
            yield from _leaves(item, str(k))


# -- paths -----------------------------------------------------------------------------------


def _is_path_key(key: str) -> bool:
    low = key.lower()
    return "path" in low or low in _PATH_KEYS


def _looks_like_path(value: str) -> bool:
    return "://" not in value and (
        value.startswith(("/", "./", "../", "~/")) or "/" in value or "\\" in value
    )


def _normalize_path(path: str) -> tuple[bool, list[str]] | None:
    absolute = path.startswith(("/", "\\"))
    segments: list[str] = []
    for segment in path.replace("\\", "/").split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                return None
            segments.pop()
            continue
        segments.append(segment)
    return absolute, segments


def _path_has_prefix(candidate: str, prefix: str) -> bool:
    cand, pre = _normalize_path(candidate), _normalize_path(prefix)
    if cand is None or pre is None or cand[0] != pre[0] or len(pre[1]) > len(cand[1]):
        return False
    return cand[1][: len(pre[1])] == pre[1]


# -- domains ---------------------------------------------------------------------------------


def _normalize_domain(value: str) -> str:
    return value.strip().strip(".").lower()


def _is_domain_char(c: str) -> bool:
    return (c.isascii() and c.isalnum()) or c in "-."


def _parse_domain(value: str) -> str | None:
    trimmed = value.strip()
    if not trimmed:
        return None
    rest = trimmed.split("://", 1)[1] if "://" in trimmed else trimmed
    authority = rest
    for sep in "/?#":
        authority = authority.split(sep, 1)[0]
    authority = authority.rsplit("@", 1)[-1]
    host = _normalize_domain(authority.split(":", 1)[0].strip("."))
    if host == "localhost" or (host and "." in host and all(_is_domain_char(c) for c in host)):
        return host
    return None


def _domains(leaves: Sequence[_Leaf]) -> list[tuple[str | None, str]]:
    out = []
    for leaf in leaves:
        domain = _parse_domain(leaf.value)
        if domain is not None:
            out.append((leaf.key, domain))
    return out


def _wildcard_matches(pattern: str, candidate: str) -> bool:
    """The kernel's ``wildcard_matches``: ``*`` matches any run of characters."""
    p = c = 0
    star: int | None = None
    mark = 0
    while c < len(candidate):
        if p < len(pattern) and (pattern[p] == candidate[c] or pattern[p] == "*"):
            if pattern[p] == "*":
                star, mark = p, c
                p += 1
            else:
                p += 1
                c += 1
        elif star is not None:
            p = star + 1
            mark += 1
            c = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


# -- regular expressions ---------------------------------------------------------------------

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> Any:
    """The compiled pattern, or None when it does not compile (cached either way)."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error:
        return None


# -- amounts ---------------------------------------------------------------------------------


def _amount_holders(parameters: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(parameters, Mapping):
        yield parameters
        args = parameters.get("args")
        if isinstance(args, list):
            yield from (a for a in args if isinstance(a, Mapping))


def _amount(parameters: Any, keys: Sequence[str]) -> tuple[str, decimal.Decimal] | None:
    """The first numeric amount under ``keys`` where the kernel looks: ``(key, amount)``."""
    for holder in _amount_holders(parameters):
        for key in keys:
            value = holder.get(key)
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                amount = decimal.Decimal(str(value))
            elif isinstance(value, str) and keys is _USD_KEYS:
                try:
                    amount = decimal.Decimal(value)
                except decimal.InvalidOperation:
                    continue
            else:
                continue
            if amount.is_finite() and amount >= 0:
                return key, amount
    return None


# -- the constraints -------------------------------------------------------------------------


def _strict_values(value: Any, out: list[str]) -> bool:
    if isinstance(value, str):
        out.append(value)
        return True
    if isinstance(value, list):
        return all(_strict_values(v, out) for v in value)
    return False


def _keyed_allowlist(
    parameters: Any, keys: frozenset[str], allowed: Sequence[str], what: str
) -> _Outcome:
    """The kernel's audience / memory-store allowlists: every value under a recognised key is
    allowed (no such key: allow; a non-string or empty value: deny)."""
    seen: list[tuple[str, list[str]]] = []
    invalid: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                if str(k).lower() in keys:
                    values: list[str] = []
                    if not _strict_values(v, values) or not values:
                        invalid.append(str(k))
                    seen.append((str(k), values))
                else:
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(parameters)
    if invalid:
        return _Outcome(GuardVerdict.DENY, f"{what} is not a list of names", invalid[0])
    for key, values in seen:
        if any(v not in allowed for v in values):
            return _Outcome(GuardVerdict.DENY, f"{what} is not in the allowlist", key)
    return _ALLOW


def _custom_matches(value: Any, key: str, expected: str) -> bool:
    if isinstance(value, Mapping):
        return any(
            (k == key and v == expected and isinstance(v, str)) or _custom_matches(v, key, expected)
            for k, v in value.items()
        )
    if isinstance(value, list):
        return any(_custom_matches(v, key, expected) for v in value)
    return False


def _evaluate(kind: str, value: Any, parameters: Any, leaves: Sequence[_Leaf]) -> _Outcome:
    deny = GuardVerdict.DENY
    if kind == "path_prefix":
        candidates = [
            leaf
            for leaf in leaves
            if (leaf.key is not None and _is_path_key(leaf.key)) or _looks_like_path(leaf.value)
        ]
        if not candidates:
            return _Outcome(deny, "no path parameter to check against the prefix")
        for leaf in candidates:
            if not _path_has_prefix(leaf.value, str(value)):
                return _Outcome(deny, "a path is outside the allowed prefix", leaf.key)
        return _ALLOW
    if kind in ("domain_exact", "domain_glob"):
        domains = _domains(leaves)
        if not domains:
            return _Outcome(deny, "no domain parameter to check")
        if kind == "domain_exact":
            expected = _normalize_domain(str(value))
            bad = next(((k, d) for k, d in domains if d != expected), None)
        else:
            pattern = str(value).lower()
            bad = next(((k, d) for k, d in domains if not _wildcard_matches(pattern, d)), None)
        if bad is not None:
            return _Outcome(deny, "a domain is not the allowed one", bad[0])
        return _ALLOW
    if kind == "regex_match":
        regex = _regex(str(value))
        if regex is None:
            return _Outcome(deny, "the constraint's regular expression does not compile")
        if any(regex.search(leaf.value) for leaf in leaves):
            return _ALLOW
        return _Outcome(deny, "no parameter matches the required pattern")
    if kind == "max_length":
        limit = int(value)
        long = next((leaf for leaf in leaves if len(leaf.value.encode()) > limit), None)
        if long is not None:
            return _Outcome(deny, f"a string parameter is longer than {limit} bytes", long.key)
        return _ALLOW
    if kind == "max_args_size":
        try:
            size = len(canonical_json(parameters))
        except ChioWireError:
            return _Outcome(deny, "the parameters have no canonical JSON form")
        if size > int(value):
            return _Outcome(deny, f"the parameters are {size} bytes, above {int(value)}")
        return _ALLOW
    if kind == "custom":
        key, expected = value
        if _custom_matches(parameters, str(key), str(expected)):
            return _ALLOW
        return _Outcome(deny, "the required custom key/value is absent", str(key))
    if kind == "audience_allowlist":
        return _keyed_allowlist(parameters, _AUDIENCE_KEYS, list(value), "a recipient")
    if kind == "memory_store_allowlist":
        return _keyed_allowlist(parameters, _STORE_KEYS, list(value), "a memory store")
    if kind == "memory_write_deny_patterns":
        for pattern in value:
            regex = _regex(str(pattern))
            if regex is None:
                return _Outcome(deny, "a deny pattern of the constraint does not compile")
            hit = next((leaf for leaf in leaves if regex.search(leaf.value)), None)
            if hit is not None:
                return _Outcome(deny, "a parameter matches a deny pattern", hit.key)
        return _ALLOW
    if kind in _GOVERNED:
        return _Outcome(deny, "governed transaction intent required by grant or request")
    if kind == "require_approval_above":
        threshold = int(value["threshold_units"])
        found = _amount(parameters, _AMOUNT_KEYS)
        if found is not None and found[1] >= threshold:
            return _Outcome(
                GuardVerdict.APPROVAL_REQUIRED,
                f"the amount is at or above the approval threshold of {threshold} units",
                found[0],
            )
        return _ALLOW
    if kind == "require_cumulative_approval_above":
        return _Outcome(GuardVerdict.APPROVAL_REQUIRED, "cumulative spend requires approval")
    if kind == "require_dual_approval":
        if value is True:
            return _Outcome(GuardVerdict.APPROVAL_REQUIRED, "the grant requires dual approval")
        return _ALLOW
    if kind == "max_transaction_amount_usd":
        ceiling = decimal.Decimal(str(value))
        found = _amount(parameters, _USD_KEYS)
        if found is None:
            return _Outcome(deny, "no transaction amount to check against the ceiling")
        if found[1] > ceiling:
            return _Outcome(deny, f"the transaction amount is above {ceiling} USD", found[0])
        return _ALLOW
    if kind in _DOWNSTREAM:
        return _ALLOW
    if kind == "content_review_tier":
        return _Outcome(deny, "content review needs a review guard's runtime context")
    if kind == "model_constraint":
        spec = value if isinstance(value, Mapping) else {}
        if spec.get("allowed_model_ids") or spec.get("min_safety_tier") is not None:
            return _Outcome(deny, "the grant constrains the model and no model metadata was sent")
        return _ALLOW
    return _Outcome(deny, f"unknown constraint type {kind!r}")


def _parse(constraint: Any) -> tuple[str, Any]:
    """``(type, value)`` of a serde-tagged constraint (a unit variant has no value)."""
    if isinstance(constraint, Mapping) and isinstance(constraint.get("type"), str):
        return constraint["type"], constraint.get("value")
    if isinstance(constraint, str):  # a unit variant written bare
        return constraint, None
    return "", None


def _grant_outcomes(
    constraints: Sequence[Any], parameters: Any
) -> Iterator[tuple[int, str, _Outcome]]:
    leaves = list(_leaves(parameters))
    for index, constraint in enumerate(constraints):
        kind, value = _parse(constraint)
        try:
            outcome = _evaluate(kind, value, parameters, leaves)
        except (TypeError, ValueError, KeyError, decimal.InvalidOperation):
            outcome = _Outcome(GuardVerdict.DENY, f"malformed {kind or 'constraint'} constraint")
        yield index, kind or "unknown", outcome


def check_constraints(
    constraints: Sequence[Any], parameters: Any, *, grant_index: int | None = None
) -> GuardResult:
    """The guard's answer for one grant's ``constraints`` on ``parameters`` (pure).

    The first constraint that denies decides; failing that, the first that asks for approval.
    """
    approval: GuardResult | None = None
    checked = 0
    for index, kind, outcome in _grant_outcomes(constraints, parameters):
        checked += 1
        if outcome.verdict is GuardVerdict.ALLOW:
            continue
        details: dict[str, Any] = {"constraint_type": kind, "constraint_index": index}
        if grant_index is not None:
            details["grant_index"] = grant_index
        if outcome.parameter is not None:
            details["parameter"] = outcome.parameter
        result = GuardResult(
            guard=GUARD_NAME,
            verdict=outcome.verdict,
            reason=f"constraint {kind}[{index}]: {outcome.reason}",
            constraint=f"{kind}[{index}]",
            details=details,
        )
        if outcome.verdict is GuardVerdict.DENY:
            return result
        approval = approval or result
    if approval is not None:
        return approval
    details = {"constraints_checked": checked}
    if grant_index is not None:
        details["grant_index"] = grant_index
    return GuardResult(guard=GUARD_NAME, verdict=GuardVerdict.ALLOW, details=details)


def _covers(grant: Mapping[str, Any], tool_server: str, tool: str) -> bool:
    return (
        grant.get("server_id") in ("*", tool_server)
        and grant.get("tool_name") in ("*", tool)
        and "invoke" in (grant.get("operations") or [])
    )


class ConstraintGuard:
    """The Chio constraints of the matched grant, on the call's parameters.

    The kernel picks, among the grants that cover the call, one whose constraints all hold
    (most specific first); this guard does the same over the capability's kernel-format token,
    and when none holds answers with the matched grant's first failing constraint. A call with
    no kernel-format token (a capability of tool names) has no constraints and is allowed.
    """

    name: Final = GUARD_NAME

    def __init__(self, *, on_result: Callable[[GuardResult], None] | None = None) -> None:
        self._on_result = on_result

    def __repr__(self) -> str:
        return "ConstraintGuard()"

    def check(self, call: CallContext) -> GuardResult:
        result = self._check(call)
        if self._on_result is not None:
            self._on_result(result)
        return result

    def _check(self, call: CallContext) -> GuardResult:
        grant = call.grant
        if grant is None:
            return GuardResult(
                guard=GUARD_NAME, verdict=GuardVerdict.ALLOW, details={"constraints_checked": 0}
            )
        matched = check_constraints(
            list(grant.get("constraints") or []), call.parameters, grant_index=call.grant_index
        )
        if matched.allowed or call.token is None:
            return matched
        grants = (call.token.get("scope") or {}).get("grants") or []
        candidates = sorted(
            (
                (
                    -int(g.get("server_id") == call.tool_server),
                    -int(g.get("tool_name") == call.tool),
                    -len(g.get("constraints") or []),
                    i,
                )
                for i, g in enumerate(grants)
                if i != call.grant_index
                and isinstance(g, Mapping)
                and _covers(g, call.tool_server, call.tool)
            )
        )
        for *_, i in candidates:
            other = check_constraints(
                list(grants[i].get("constraints") or []), call.parameters, grant_index=i
            )
            if other.allowed:
                return other
        return matched
