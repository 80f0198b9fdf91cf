"""The ``cedar`` guard: policy as code (Cedar, through PyPI ``cedarpy``) inside the grants.

Constraints say what a grant allows of a call's parameters; Cedar says what they cannot: which
workflow types, task queues or namespaces may call a tool, on which attempt, with which
combination of arguments. A call is a Cedar request (the schema is ``policy/chio.cedarschema``,
shipped with the package):

- principal ``Chio::Workflow::"<workflow id>"`` with ``workflow_type``, ``namespace``,
  ``task_queue``, ``run_id`` (the capability id and empty strings on the kernel's routes, which
  carry no Temporal context);
- action ``Chio::Action::"call"``;
- resource ``Chio::Tool::"<server>/<tool>"`` with ``server`` and ``name``;
- context ``capability_id``, ``activity_type``, ``activity_id``, ``attempt``, ``is_local``, and
  the arguments as two tagged entities: ``context.args`` (every string leaf) and
  ``context.numbers`` (every integer leaf), keyed by path: ``"0"`` is the first positional
  argument of a Temporal activity (parameters ``{"args": [...]}``), ``"0.amount"`` a field of
  it, ``"path"`` a top-level key elsewhere. A policy tests ``context.args.hasTag("0") &&
  context.args.getTag("0") like "forbidden*"``.

The capability's grants are the permit: the set always holds
``@id("chio.grants") permit(principal, action, resource);``, so the policies that decide are
``forbid`` policies. A forbid annotated ``@approval("required")`` asks for a person's approval
instead of denying (a plain forbid that also applies wins: deny). The outcome and the
determining policies (their ``@id``, else ``<file>#<n>``) go into the guard's evidence.

Policies load from a ``.cedar`` file or every ``*.cedar`` of a directory (sorted), are parsed
once into a ``cedarpy.PolicySet`` (a request never re-parses them) and validated against the
schema; a duplicate ``@id`` is an error. :class:`PolicyReloader` swaps a newly loaded set into a
running sidecar (SIGHUP) and keeps the old one when the new one does not load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Protocol

import cedarpy

from chio_receipts.schemas import canonical_json
from chio_receipts.sidecar import _chio
from chio_receipts.sidecar._constraints import ConstraintGuard
from chio_receipts.sidecar._errors import SidecarError
from chio_receipts.sidecar._guards import CallContext, Guard, GuardResult, GuardVerdict

__all__ = [
    "BASE_POLICY_ID",
    "GUARD_NAME",
    "CedarGuard",
    "CedarPolicySet",
    "PolicyError",
    "PolicyProblem",
    "PolicyReloader",
    "build_guards",
    "policy_hash",
    "schema_text",
    "validate_policy_path",
]

GUARD_NAME: Final = "cedar"
BASE_POLICY_ID: Final = "chio.grants"
_BASE_POLICY: Final = f'@id("{BASE_POLICY_ID}")\npermit(principal, action, resource);\n'
_APPROVAL_ANNOTATION: Final = "approval"
_APPROVAL_VALUES: Final = frozenset({"required", "true", ""})
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1

_log = logging.getLogger(__name__)


def schema_text() -> str:
    """The Cedar schema the project ships (``chio_receipts/sidecar/policy/chio.cedarschema``)."""
    return (
        resources.files("chio_receipts.sidecar")
        .joinpath("policy/chio.cedarschema")
        .read_text(encoding="utf-8")
    )


_SCHEMA_LOCK = threading.Lock()
_SCHEMA: cedarpy.Schema | None = None


def _schema() -> cedarpy.Schema:
    global _SCHEMA
    with _SCHEMA_LOCK:
        if _SCHEMA is None:
            _SCHEMA = cedarpy.Schema.from_str(schema_text())
        return _SCHEMA


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """Why a policy file does not load: the file, the policy (id or ``@id``), the reason."""

    file: str
    policy: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.policy}" if self.policy else self.file
        return f"{where}: {self.reason}"


class PolicyError(SidecarError):
    """A policy set that does not load; ``problems`` says where and why."""

    def __init__(self, problems: Sequence[PolicyProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems) or "no policy")


def _policy_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob("*.cedar") if p.is_file())
    if path.is_file():
        return [path]
    raise PolicyError([PolicyProblem(str(path), "", "no such file or directory")])


def _annotations(text: str) -> dict[str, dict[str, str]]:
    """Positional policy id -> its annotations (Cedar's JSON form of ``text``)."""
    est = json.loads(cedarpy.policies_to_json_str(text))
    return {
        pid: dict(body.get("annotations") or {})
        for pid, body in (est.get("staticPolicies") or {}).items()
    }


def _display(pid: str, annotations: Mapping[str, str]) -> str:
    at_id = annotations.get("id")
    return f"{pid} (@id {at_id!r})" if at_id else pid


def _check_file(name: str, text: str) -> tuple[list[PolicyProblem], dict[str, dict[str, str]]]:
    try:
        cedarpy.PolicySet.from_str(text)
        annotations = _annotations(text)
    except ValueError as exc:
        return [PolicyProblem(name, "", f"does not parse: {exc}")], {}
    problems = []
    result = cedarpy.validate_policies(text, _schema())
    for error in result.errors:
        pid = error.policy_id
        problems.append(PolicyProblem(name, _display(pid, annotations.get(pid, {})), error.error))
    for pid, notes in annotations.items():
        value = notes.get(_APPROVAL_ANNOTATION)
        if value is not None and value not in _APPROVAL_VALUES:
            problems.append(
                PolicyProblem(
                    name, _display(pid, notes), f'@approval must be "required": {value!r}'
                )
            )
    return problems, annotations


def _order(pid: str) -> int:
    digits = pid.removeprefix("policy")
    return int(digits) if digits.isdigit() else 0


@dataclass(frozen=True, slots=True)
class CedarPolicySet:
    """A parsed, validated Cedar policy set (immutable; a reload builds a new one)."""

    policies: Any = field(repr=False)
    """The ``cedarpy.PolicySet`` handle (parsed once)."""
    names: Mapping[str, str]
    """Positional policy id in the loaded set -> the name evidence uses."""
    approval: frozenset[str]
    """Positional ids of the forbid policies that ask for approval."""
    files: tuple[str, ...]
    digest: str
    """SHA-256 hex of the canonical JSON (Cedar's JSON form) of the loaded policies."""

    @classmethod
    def from_texts(cls, texts: Sequence[tuple[str, str]]) -> CedarPolicySet:
        """Parse and validate ``(file name, text)`` pairs, in order, as one set (raises
        :class:`PolicyError` with every problem)."""
        problems: list[PolicyProblem] = []
        per_file: list[tuple[str, dict[str, dict[str, str]]]] = []
        for name, text in texts:
            file_problems, annotations = _check_file(name, text)
            problems.extend(file_problems)
            per_file.append((name, annotations))
        seen: dict[str, str] = {BASE_POLICY_ID: "(built in)"}
        for name, annotations in per_file:
            for notes in annotations.values():
                at_id = notes.get("id")
                if at_id is None:
                    continue
                if at_id in seen:
                    problems.append(
                        PolicyProblem(
                            name, f"@id {at_id!r}", f"duplicate @id (also in {seen[at_id]})"
                        )
                    )
                seen.setdefault(at_id, name)
        if problems:
            raise PolicyError(problems)
        combined = _BASE_POLICY + "".join(f"{text}\n" for _, text in texts)
        policies = cedarpy.PolicySet.from_str(combined)
        # Positional ids follow the text: the base permit is policy0, then each file's policies.
        names: dict[str, str] = {"policy0": BASE_POLICY_ID}
        approval: set[str] = set()
        offset = 1
        for name, annotations in per_file:
            for pid in sorted(annotations, key=_order):
                combined_id = f"policy{offset + _order(pid)}"
                notes = annotations[pid]
                names[combined_id] = notes.get("id") or f"{name}#{_order(pid)}"
                if notes.get(_APPROVAL_ANNOTATION) is not None:
                    approval.add(combined_id)
            offset += len(annotations)
        digest = hashlib.sha256(
            canonical_json(json.loads(cedarpy.policies_to_json_str(combined)))
        ).hexdigest()
        return cls(
            policies=policies,
            names=names,
            approval=frozenset(approval),
            files=tuple(name for name, _ in texts),
            digest=digest,
        )

    @classmethod
    def load(cls, path: Path | str) -> CedarPolicySet:
        """The policies of a ``.cedar`` file or of a directory's ``*.cedar`` files."""
        path = Path(path)
        files = _policy_files(path)
        if not files:
            raise PolicyError([PolicyProblem(str(path), "", "no *.cedar file")])
        texts = []
        for f in files:
            try:
                texts.append((f.name, f.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as exc:
                raise PolicyError([PolicyProblem(f.name, "", f"unreadable: {exc}")]) from None
        return cls.from_texts(texts)

    def __len__(self) -> int:
        """The loaded policies, the built-in permit left out."""
        return len(self.names) - 1


def validate_policy_path(path: Path | str) -> list[PolicyProblem]:
    """Every problem of the policies at ``path`` (empty: they load)."""
    try:
        CedarPolicySet.load(path)
    except PolicyError as exc:
        return list(exc.problems)
    return []


# -- requests --------------------------------------------------------------------------------


def _flatten(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _flatten(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{path}.{i}" if path else str(i))
    else:
        yield path, value


def argument_tags(parameters: Any) -> tuple[dict[str, str], dict[str, int]]:
    """The string and integer leaves of ``parameters`` by path (``{"args": [...]}`` counts
    from the argument list)."""
    if isinstance(parameters, Mapping) and set(parameters) == {"args"}:
        parameters = parameters["args"]
    strings: dict[str, str] = {}
    numbers: dict[str, int] = {}
    for path, leaf in _flatten(parameters, ""):
        if isinstance(leaf, str):
            strings[path] = leaf
        elif (
            isinstance(leaf, int) and not isinstance(leaf, bool) and _LONG_MIN <= leaf <= _LONG_MAX
        ):
            numbers[path] = leaf
    return strings, numbers


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def cedar_request(call: CallContext) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Cedar request and entities of ``call``."""
    t = call.temporal
    principal = {"type": "Chio::Workflow", "id": _text(t.get("workflow_id")) or call.capability_id}
    resource = {"type": "Chio::Tool", "id": f"{call.tool_server}/{call.tool}"}
    args = {"type": "Chio::Arguments", "id": call.request_id or "call"}
    numbers = {"type": "Chio::Numbers", "id": call.request_id or "call"}
    strings, ints = argument_tags(call.parameters)
    attempt = t.get("attempt")
    request = {
        "principal": principal,
        "action": {"type": "Chio::Action", "id": "call"},
        "resource": resource,
        "context": {
            "capability_id": call.capability_id,
            "activity_type": _text(t.get("activity_type")),
            "activity_id": _text(t.get("activity_id")),
            "attempt": attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0,
            "is_local": t.get("is_local") is True,
            "args": {"__entity": args},
            "numbers": {"__entity": numbers},
        },
    }
    entities = [
        {
            "uid": principal,
            "attrs": {
                "workflow_type": _text(t.get("workflow_type")),
                "namespace": _text(t.get("namespace")),
                "task_queue": _text(t.get("task_queue")),
                "run_id": _text(t.get("run_id")),
            },
            "parents": [],
        },
        {
            "uid": resource,
            "attrs": {"server": call.tool_server, "name": call.tool},
            "parents": [],
        },
        {"uid": args, "attrs": {}, "parents": [], "tags": strings},
        {"uid": numbers, "attrs": {}, "parents": [], "tags": ints},
    ]
    return request, entities


class CedarGuard:
    """Decide a call with a parsed :class:`CedarPolicySet` (no parsing per request)."""

    name: Final = GUARD_NAME

    def __init__(self, policy_set: CedarPolicySet) -> None:
        self.policy_set = policy_set

    def __repr__(self) -> str:
        return f"CedarGuard(policies={len(self.policy_set)}, digest={self.policy_set.digest[:12]})"

    def check(self, call: CallContext) -> GuardResult:
        ps = self.policy_set
        request, entities = cedar_request(call)
        result = cedarpy.is_authorized(request, ps.policies, entities)
        reasons = sorted(result.diagnostics.reasons, key=_order)
        names = [ps.names.get(r, r) for r in reasons]
        details: dict[str, Any] = {
            "decision": result.decision.value,
            "policies": names,
            "policy_set": ps.digest,
        }
        if result.diagnostics.errors:
            # An error in a policy's condition skips that policy (Cedar's semantics); counted,
            # never quoted (the messages may hold argument values).
            details["errors"] = len(result.diagnostics.errors)
        if result.allowed:
            return GuardResult(guard=GUARD_NAME, verdict=GuardVerdict.ALLOW, details=details)
        forbids = [r for r in reasons if r != "policy0"]
        if forbids and all(r in ps.approval for r in forbids):
            return GuardResult(
                guard=GUARD_NAME,
                verdict=GuardVerdict.APPROVAL_REQUIRED,
                reason=f"policy {', '.join(names)} requires approval",
                constraint=names[0],
                details=details,
            )
        deciding = [ps.names.get(r, r) for r in forbids if r not in ps.approval] or names
        return GuardResult(
            guard=GUARD_NAME,
            verdict=GuardVerdict.DENY,
            reason=f"forbidden by policy {', '.join(deciding) or '(none: no permit applies)'}",
            constraint=deciding[0] if deciding else "",
            details=details,
        )


# -- the active policy -----------------------------------------------------------------------


def policy_hash(guards: Sequence[Guard]) -> str:
    """``policy_hash`` of receipts decided by ``guards``: SHA-256 hex of the canonical JSON of
    the sidecar's base policy, the guards in order, and the Cedar set's digest."""
    document = {
        "base": _chio.POLICY_DOCUMENT,
        "guards": [
            {"name": g.name, "cedar": g.policy_set.digest}
            if isinstance(g, CedarGuard)
            else {"name": g.name}
            for g in guards
        ],
    }
    return hashlib.sha256(canonical_json(document)).hexdigest()


def build_guards(
    policy: Path | str | None, *, constraints: bool = True
) -> tuple[tuple[Guard, ...], str]:
    """The sidecar's guards and their ``policy_hash``: the constraints guard, then a Cedar guard
    when ``policy`` names a file or directory (raises :class:`PolicyError`)."""
    guards: list[Guard] = []
    if constraints:
        guards.append(ConstraintGuard())
    if policy is not None:
        guards.append(CedarGuard(CedarPolicySet.load(policy)))
    return tuple(guards), policy_hash(guards)


class _UsesGuards(Protocol):
    def use_guards(self, guards: Sequence[Guard], policy_hash: str) -> None: ...


class PolicyReloader:
    """Reload the policy at ``path`` into ``sidecar`` (the SIGHUP handler).

    :meth:`reload` builds the new guards aside and swaps them in at once
    (``LocalSidecar.use_guards``): a request in flight finishes with the set it started with. A
    set that does not load leaves the old one in place and is logged with every problem.
    ``on_reload`` gets ``"ok"`` or ``"error"`` after each attempt (a metrics counter's hook).
    """

    def __init__(
        self,
        sidecar: _UsesGuards,
        path: Path | str | None,
        *,
        constraints: bool = True,
        on_reload: Callable[[str], None] | None = None,
    ) -> None:
        self.sidecar = sidecar
        self.path = None if path is None else Path(path)
        self.constraints = constraints
        self.on_reload = on_reload
        self.last_error: PolicyError | None = None

    def load(self) -> str:
        """Load and install the policy (raises :class:`PolicyError`); the new ``policy_hash``."""
        guards, digest = build_guards(self.path, constraints=self.constraints)
        self.sidecar.use_guards(guards, digest)
        return digest

    def reload(self) -> bool:
        """Load and install the policy again; False (old set kept, logged) when it fails."""
        try:
            digest = self.load()
        except PolicyError as exc:
            self.last_error = exc
            _log.error("policy reload failed, the previous policy set stays active: %s", exc)
            self._count("error")
            return False
        self.last_error = None
        _log.info("policy reloaded: policy_hash %s", digest)
        self._count("ok")
        return True

    def _count(self, result: str) -> None:
        if self.on_reload is not None:
            self.on_reload(result)
