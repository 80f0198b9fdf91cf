"""The Cedar guard: requests, determining policies, approval, loading and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from chio_receipts.sidecar._cedar import (
    CedarGuard,
    CedarPolicySet,
    PolicyError,
    argument_tags,
    build_guards,
    policy_hash,
    validate_policy_path,
)
from chio_receipts.sidecar._constraints import ConstraintGuard
from chio_receipts.sidecar._guards import CallContext, GuardVerdict

pytestmark = pytest.mark.unit

SEED_003 = """
@id("seed-003-forbidden-input")
forbid(principal, action == Chio::Action::"call", resource)
when { context.args.hasTag("0") && context.args.getTag("0") like "forbidden*" };

@id("big-payment") @approval("required")
forbid(principal, action, resource == Chio::Tool::"payments/debit_account")
when { context.numbers.hasTag("1") && context.numbers.getTag("1") > 1000 };

@id("no-retries-on-reports")
forbid(principal, action, resource)
when { principal.workflow_type == "ScheduledReportWorkflow" && context.attempt > 1 };
"""


def _call(
    args: list[object], *, tool: str = "call_tool", server: str = "agent-tools", **temporal: object
) -> CallContext:
    base: dict[str, object] = {
        "workflow_id": "wf-1",
        "workflow_type": "PolicyWorkflow",
        "namespace": "default",
        "task_queue": "q",
        "run_id": "r",
        "activity_id": "1",
        "activity_type": tool,
        "attempt": 1,
        "is_local": False,
    }
    base.update(temporal)
    return CallContext(
        capability_id="cap-1",
        tool_server=server,
        tool=tool,
        parameters={"args": args},
        temporal=base,
        request_id="req-1",
    )


@pytest.fixture(scope="module")
def guard() -> CedarGuard:
    return CedarGuard(CedarPolicySet.from_texts([("seed.cedar", SEED_003)]))


def test_seed_003_rule_denies_a_forbidden_input(guard: CedarGuard) -> None:
    result = guard.check(_call(["forbidden: launch"]))
    assert result.verdict is GuardVerdict.DENY
    assert result.constraint == "seed-003-forbidden-input"
    assert result.details["policies"] == ["seed-003-forbidden-input"]
    assert result.details["decision"] == "Deny"
    assert "launch" not in str(result.details)
    assert "launch" not in result.reason


def test_other_inputs_are_allowed_by_the_grants(guard: CedarGuard) -> None:
    result = guard.check(_call(["a task"]))
    assert result.verdict is GuardVerdict.ALLOW
    assert result.details["policies"] == ["chio.grants"]


def test_approval_annotation_asks_for_approval(guard: CedarGuard) -> None:
    call = _call(["acct", 5000], tool="debit_account", server="payments")
    result = guard.check(call)
    assert result.verdict is GuardVerdict.APPROVAL_REQUIRED
    assert result.constraint == "big-payment"
    small = guard.check(_call(["acct", 10], tool="debit_account", server="payments"))
    assert small.verdict is GuardVerdict.ALLOW


def test_a_plain_forbid_beats_an_approval(guard: CedarGuard) -> None:
    result = guard.check(_call(["forbidden", 5000], tool="debit_account", server="payments"))
    assert result.verdict is GuardVerdict.DENY
    assert result.constraint == "seed-003-forbidden-input"
    assert set(result.details["policies"]) == {"seed-003-forbidden-input", "big-payment"}


def test_workflow_type_and_attempt(guard: CedarGuard) -> None:
    first = _call(["r"], workflow_type="ScheduledReportWorkflow", attempt=1)
    retry = _call(["r"], workflow_type="ScheduledReportWorkflow", attempt=2)
    assert guard.check(first).verdict is GuardVerdict.ALLOW
    assert guard.check(retry).constraint == "no-retries-on-reports"


def test_argument_tags_by_path() -> None:
    strings, numbers = argument_tags({"args": ["a", {"payee": "p", "amount": 3, "ok": True}]})
    assert strings == {"0": "a", "1.payee": "p"}
    assert numbers == {"1.amount": 3}
    assert argument_tags({"path": "/x", "n": [1]}) == ({"path": "/x"}, {"n.0": 1})


def test_load_directory_names_unannotated_policies_by_file(tmp_path: Path) -> None:
    (tmp_path / "a.cedar").write_text(SEED_003)
    (tmp_path / "b.cedar").write_text(
        'forbid(principal, action, resource) when { principal.task_queue == "quarantine" };'
    )
    (tmp_path / "ignored.txt").write_text("not cedar")
    ps = CedarPolicySet.load(tmp_path)
    assert len(ps) == 4
    assert ps.files == ("a.cedar", "b.cedar")
    result = CedarGuard(ps).check(_call(["x"], task_queue="quarantine"))
    assert result.constraint == "b.cedar#0"


@pytest.mark.parametrize(
    ("text", "where", "needle"),
    [
        ("forbid(principal, action, resource", "", "does not parse"),
        (
            '@id("x") forbid(principal, action, resource) when { context.nope == 1 };',
            "policy0 (@id 'x')",
            "nope",
        ),
        (
            "forbid(principal, action, resource) when { principal.workflow_type == 3 };",
            "policy0",
            "",
        ),
        ('@approval("maybe") forbid(principal, action, resource);', "policy0", "@approval"),
    ],
)
def test_validation_problems_name_file_and_policy(
    tmp_path: Path, text: str, where: str, needle: str
) -> None:
    (tmp_path / "bad.cedar").write_text(text)
    problems = validate_policy_path(tmp_path / "bad.cedar")
    assert problems
    assert problems[0].file == "bad.cedar"
    assert problems[0].policy == where
    assert needle in problems[0].reason


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.cedar").write_text('@id("same") forbid(principal, action, resource);')
    (tmp_path / "b.cedar").write_text('@id("same") forbid(principal, action, resource);')
    with pytest.raises(PolicyError, match="duplicate @id"):
        CedarPolicySet.load(tmp_path)


def test_policy_hash_covers_the_set_not_its_formatting() -> None:
    a = CedarPolicySet.from_texts([("a.cedar", SEED_003)])
    b = CedarPolicySet.from_texts([("a.cedar", "\n\n" + SEED_003.replace("\n", "\n  "))])
    c = CedarPolicySet.from_texts([("a.cedar", SEED_003.replace("> 1000", "> 999"))])
    assert a.digest == b.digest != c.digest
    hashes = {
        policy_hash([ConstraintGuard()]),
        policy_hash([ConstraintGuard(), CedarGuard(a)]),
        policy_hash([ConstraintGuard(), CedarGuard(c)]),
        policy_hash([]),
    }
    assert len(hashes) == 4
    assert policy_hash([ConstraintGuard(), CedarGuard(b)]) == policy_hash(
        [ConstraintGuard(), CedarGuard(a)]
    )


def test_build_guards(tmp_path: Path) -> None:
    (tmp_path / "p.cedar").write_text(SEED_003)
    guards, digest = build_guards(tmp_path / "p.cedar")
    assert [g.name for g in guards] == ["constraints", "cedar"]
    assert len(digest) == 64
    with pytest.raises(PolicyError, match="no such file"):
        build_guards(tmp_path / "missing.cedar")


def test_reloader_swaps_whole_sets_and_keeps_the_old_one_on_error(tmp_path: Path) -> None:
    from chio_receipts.sidecar import LocalSidecar, PolicyReloader

    (tmp_path / "a.cedar").write_text(SEED_003)
    side = LocalSidecar()
    results: list[str] = []
    reloader = PolicyReloader(side, tmp_path, on_reload=results.append)
    first = reloader.load()
    assert side.policy_hash == first
    assert [g.name for g in side.guards] == ["constraints", "cedar"]
    (tmp_path / "b.cedar").write_text('@id("q") forbid(principal, action, resource);')
    assert reloader.reload()
    second = side.policy_hash
    assert second != first
    (tmp_path / "c.cedar").write_text("forbid(principal, action")
    guards = side.guards
    assert not reloader.reload()
    assert side.policy_hash == second
    assert side.guards is guards
    assert reloader.last_error is not None
    assert "c.cedar" in str(reloader.last_error)
    assert results == ["ok", "error"]
