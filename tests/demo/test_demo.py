"""The main job end to end: the demo's summary matches what its workflows were designed to do."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from chio_receipts import schemas
from chio_receipts._config import AppConfig
from chio_receipts.consumers import open_client
from chio_receipts.consumers._wire import decode_plain
from chio_receipts.demo._run import DemoOptions, DemoResult, run_demo
from chio_receipts.stack import default_clickhouse_dsn
from chio_receipts.stack._process import pid_alive
from tests.support.kernel import kernel_verifier, tampered_receipts

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, str, Path]:
    data = tmp_path_factory.mktemp("demo")
    cfg = AppConfig(
        data_dir=data,
        cache_dir=Path(os.environ.get("CHIO_CACHE_DIR", REPO / ".cache")),
        clickhouse_dsn=None,
    )
    out = io.StringIO()
    options = DemoOptions(
        fan_out=3, loop_iterations=3, split_width=4, schedule_every=timedelta(seconds=1)
    )
    result = await run_demo(cfg, console=Console(file=out, width=120), options=options)
    return result, out.getvalue(), data


@pytest.mark.e2e
def test_summary_matches_the_designed_workflows(demo: tuple[DemoResult, str, Path]) -> None:
    result, output, _data = demo
    s = result.summary
    assert s is not None
    # transfer, budgeted, fan-out, parent + child, 3 loop runs, 2 approvals, denied, flaky, split,
    # seed 003's task, 2 payments, 2 scheduled
    assert len(result.runs) == 18
    assert len(s.runs) == 18
    assert s.incomplete == 0
    assert s.step_rows == s.distinct_receipts  # nothing counted twice
    # The denies: the transfer's credit and the first step of the denied request (scope), seed
    # 003's forbidden task and the payment above the ceiling (constraints), the blocked payee
    # (Cedar), the action a person rejected, and the budgeted run's call past its budget.
    denied = {(ts, t): d for ts, t, _a, d in s.by_tool if d}
    assert denied == {
        ("payments", "credit_account"): 1,
        ("email-outbound", "send_email"): 1,
        ("agent-tools", "execute_action"): 2,
        ("payments", "pay"): 2,
        ("agent-tools", "call_tool"): 1,
    }
    for workflow_type, count in (("GuardedTaskWorkflow", 1), ("PaymentWorkflow", 2)):
        runs = s.runs_of(workflow_type)
        assert [(r.outcome, r.step_count, r.deny_count) for r in runs] == [
            ("failure", 1, 1)
        ] * count
    # The saga ran its compensation after the deny: the money back, then the debit's budget.
    (transfer,) = s.runs_of("TransferWorkflow")
    assert (transfer.outcome, transfer.step_count, transfer.deny_count) == ("failure", 4, 1)
    steps = [st.activity_type for st in s.steps if st.run_id == transfer.run_id]
    assert steps == ["debit_account", "credit_account", "refund_account", "reverse_budget_charge"]
    # Two calls fit the budget; the third is denied by the budget guard.
    (budgeted,) = s.runs_of("BudgetedToolWorkflow")
    assert (budgeted.outcome, budgeted.step_count, budgeted.deny_count) == ("failure", 3, 1)
    guards = {(t, g) for _ts, t, g, _r, _n in s.denies}
    assert guards == {
        ("credit_account", "scope"),
        ("send_email", "scope"),
        ("call_tool", "budget"),
        ("execute_action", "constraints"),  # seed 003's forbidden task
        ("execute_action", "approval"),  # the action a person rejected
        ("pay", "constraints"),  # the payment above the ceiling
        ("pay", "cedar"),  # the blocked payee
    }
    (first_denied,) = s.runs_of("DeniedFirstStepWorkflow")
    assert (first_denied.outcome, first_denied.step_count) == ("failure", 1)
    # The child carries its parent; the loop's runs are linked run to run.
    (parent,) = s.runs_of("ParentWorkflow")
    (child,) = s.runs_of("ChildWorkflow")
    assert child.parent_workflow_ids == (parent.workflow_id,)
    loop = s.runs_of("ContinueAsNewWorkflow")
    assert sorted(r.outcome for r in loop) == ["continued_as_new", "continued_as_new", "success"]
    by_run = {r.run_id: r for r in loop}
    linked = [r for r in loop if r.continued_as_new_run_id in by_run]
    assert len(linked) == 2
    assert all(by_run[r.continued_as_new_run_id].continued_from_run_id == r.run_id for r in linked)
    # The flaky tool: three attempts, three receipts, all allowed.
    (flaky,) = s.runs_of("FlakyToolWorkflow")
    attempts = sorted(st.attempt for st in s.steps if st.run_id == flaky.run_id)
    assert attempts == [1, 2, 3]
    # One run's activities on two worker processes.
    (split,) = s.runs_of("SplitWorkersWorkflow")
    workers = {st.worker_identity for st in s.steps if st.run_id == split.run_id}
    assert workers == {"demo-worker-a", "demo-worker-b"}
    assert len(s.runs_of("ScheduledReportWorkflow")) == 2
    assert {r.outcome for r in s.runs_of("ApprovalWorkflow")} == {"success"}
    # Each approval: the held action (PENDING_APPROVAL, attempt 1), then the answer: the approved
    # action ran once, the rejected one was denied naming the approver, and the requester was
    # notified. The report shows who answered, from the signed decisions.
    assert s.pending_approval == 2
    by_workflow = {a.workflow_id.split("-")[1]: a for a in s.approvals}
    assert sorted(by_workflow) == ["no", "yes"]
    yes, no = by_workflow["yes"], by_workflow["no"]
    assert (yes.activity_type, yes.outcome, yes.approver) == (
        "execute_action",
        "approved",
        "ops-alice",
    )
    assert (no.activity_type, no.outcome, no.approver) == ("execute_action", "denied", "ops-alice")
    assert no.reason == "over the refund limit"
    for run in s.runs_of("ApprovalWorkflow"):
        held = [
            (st.activity_type, st.verdict, st.attempt) for st in s.steps if st.run_id == run.run_id
        ]
        assert held[:2] == [
            ("read_database", "ALLOW", 1),
            ("execute_action", "PENDING_APPROVAL", 1),
        ]
    assert "Approvals (signed decisions, by approver)" in output
    # Every run verified from ClickHouse rows alone, and the output says so.
    assert result.verified == 18
    assert result.verify_failures == []
    assert "verify: 18/18 runs verified" in output
    assert "0 incomplete envelopes" in output


@pytest.mark.e2e
def test_summary_shows_outcomes_and_durations_per_tool(
    demo: tuple[DemoResult, str, Path],
) -> None:
    """What the demo's workflows do, as outcome records: every allowed attempt ran and left one
    outcome; only the flaky tool failed (twice, then completed); nothing was refused at the gate
    and no attempt is unaccounted for."""
    result, output, _data = demo
    s = result.summary
    assert s is not None
    assert s.outcomes_available
    assert "Outcomes and durations per tool" in output
    assert "Attempts accounted per run" in output
    allowed = sum(a for _ts, _t, a, _d in s.by_tool)
    assert allowed == s.step_rows - 7 - s.pending_approval
    by_tool = {(t.tool_server, t.tool): t for t in s.tool_outcomes}
    assert sum(t.calls for t in by_tool.values()) == allowed
    assert all(t.gate_failed == 0 for t in by_tool.values())
    (flaky,) = [t for (_ts, tool), t in by_tool.items() if tool == "flaky_tool"]
    assert (flaky.calls, flaky.completed, flaky.failed) == (3, 1, 2)
    assert flaky.p50_us is not None
    assert flaky.p95_us is not None
    assert 0 <= flaky.p50_us <= flaky.p95_us
    for t in by_tool.values():
        if t.tool != "flaky_tool":
            assert (t.completed, t.failed, t.timed_out, t.cancelled) == (t.calls, 0, 0, 0), t
    # The denied credit ran nothing: no outcome for it.
    assert ("payments", "credit_account") not in by_tool
    # Every attempt of every run is accounted for by its receipts.
    assert len(s.run_accounts) == 18
    steps = {r.run_id: r.step_count for r in s.runs}
    for account in s.run_accounts:
        assert (account.gate_failed, account.missing) == (0, 0), account
        assert account.worker_lost in (0, None), account
        if account.attempts is not None:
            assert account.attempts == account.receipted == steps[account.run_id], account


@dataclasses.dataclass(frozen=True)
class DemoReceipt:
    """One Chio receipt of the demo's ClickHouse, or a tampered copy of one."""

    name: str
    receipt: dict[str, Any]
    step: schemas.StepReceipt  # the step it is carried by (with this receipt)
    valid: bool


@pytest.fixture(scope="module")
def demo_receipts(demo: tuple[DemoResult, str, Path]) -> tuple[list[DemoReceipt], set[str]]:
    """Every step's Chio receipt from the demo's ClickHouse, then tampered copies of each; and
    the sidecar's public keys (hex) from the demo's keys.json, the builder's left out."""
    result, _output, data = demo
    assert result.keys_path is not None
    listed = json.loads(result.keys_path.read_text())
    sidecar_keys = {v for k, v in listed.items() if k != "demo-builder"}
    assert sidecar_keys
    assert len(sidecar_keys) < len(listed)
    client = open_client(default_clickhouse_dsn(data))
    try:
        rows = client.query(
            "SELECT toString(receipt_id), wire, chio_receipt FROM step_receipts "
            "ORDER BY toString(receipt_id)",
            column_formats={"wire": "bytes"},
        ).result_rows
    finally:
        client.close()
    items: list[DemoReceipt] = []
    for receipt_id, wire, text in rows:
        # Every step the demo's workers publish was decided on our sidecar's mediated route.
        assert text, f"step {receipt_id} carries no Chio receipt"
        step = schemas.StepReceipt.from_avro(decode_plain(wire).record)
        assert step.chio_receipt == text
        receipt = json.loads(text)
        items.append(DemoReceipt(receipt_id, receipt, step, True))
        for how, forged in tampered_receipts(receipt).items():
            chio_text, chio_signed = schemas.chio_step_payload(forged)
            carried = dataclasses.replace(step, chio_receipt=chio_text, chio_signed=chio_signed)
            items.append(DemoReceipt(f"{receipt_id}/{how}", forged, carried, False))
    return items, sidecar_keys


@pytest.mark.e2e
def test_every_demo_receipt_checks_in_the_pipeline(
    demo: tuple[DemoResult, str, Path], demo_receipts: tuple[list[DemoReceipt], set[str]]
) -> None:
    result, _output, _data = demo
    items, keys = demo_receipts
    assert result.summary is not None
    originals = [item for item in items if item.valid]
    assert len(originals) == result.summary.step_rows
    verdicts = {item.receipt["decision"]["verdict"] for item in originals}
    assert verdicts == {"allow", "deny"}
    for item in items:
        ours = schemas.verify_kernel_receipt(item.receipt, trusted_keys=sorted(keys))
        assert ours.valid is item.valid, (item.name, ours.reason)
        check = schemas.check_chio_step(item.step, trusted_keys=keys)
        assert (check is None) is item.valid, (item.name, check)
    # The sidecar's keys are the only trusted signers: under another key nothing checks.
    for item in originals:
        assert schemas.check_chio_step(item.step, trusted_keys={"00" * 32}) is not None


@pytest.mark.e2e
def test_policy_denies_name_their_guard_and_constraint(
    demo_receipts: tuple[list[DemoReceipt], set[str]],
) -> None:
    """The demo's constraint and Cedar denies: each receipt names the guard that decided and
    the constraint or policy id in its evidence, under the policy hash of the active set."""
    items, _keys = demo_receipts
    denies: list[tuple[str, str]] = []
    hashes = set()
    for item in items:
        if not item.valid:
            continue
        hashes.add(item.receipt["policy_hash"])
        decision = item.receipt["decision"]
        if decision["verdict"] != "deny" or decision["guard"] not in ("constraints", "cedar"):
            continue
        evidence = {e["guard_name"]: json.loads(e["details"]) for e in item.receipt["evidence"]}
        denies.append((decision["guard"], evidence[decision["guard"]]["constraint"]))
    # The two approval scenarios' held actions are signed as the kernel signs a held call: a
    # deny by the deciding guard (here the Cedar policy annotated @approval), marked pending.
    assert sorted(denies) == [
        ("cedar", "demo.actions-need-a-person"),
        ("cedar", "demo.actions-need-a-person"),
        ("cedar", "demo.blocked-payee"),
        ("constraints", "max_transaction_amount_usd[0]"),
        ("constraints", "memory_write_deny_patterns[0]"),
    ]
    assert len(hashes) == 1  # one policy set for the whole run


@pytest.mark.e2e
@pytest.mark.kernel
def test_the_kernel_verifier_agrees_on_every_demo_receipt(
    demo_receipts: tuple[list[DemoReceipt], set[str]],
) -> None:
    """The oracle on every receipt the demo produces: chio-receipt-verify (the kernel's own
    ChioReceipt::verify_signature) says valid to each one and invalid to each tampered copy,
    as the pipeline does. Skips, with the reason, when the kernel is not built."""
    verify = kernel_verifier()
    items, keys = demo_receipts
    verdicts = verify([json.dumps(item.receipt, ensure_ascii=False) for item in items], "receipts")
    disagree = [
        (item.name, kernel)
        for item, kernel in zip(items, verdicts, strict=True)
        if (kernel == "valid") is not item.valid
    ]
    assert not disagree, disagree
    assert {item.receipt["kernel_key"] for item in items if item.valid} <= keys


@pytest.mark.e2e
def test_report_is_one_html_file_with_charts(demo: tuple[DemoResult, str, Path]) -> None:
    result, _output, data = demo
    assert result.report_path == data / "report.html"
    text = result.report_path.read_text()
    assert result.summary is not None
    timed = any(t.p50_us is not None for t in result.summary.tool_outcomes)
    assert text.count("<svg") == 3 + timed  # + call durations per tool, once there are outcomes
    assert "credit_account" in text
    # The exhausted budget's deny names its guard and budget; the saga's refund is a step.
    assert "<h2 id='denies'>Denies: the guard that decided, and why</h2>" in text
    assert "<td>budget</td>" in text
    assert "grant 0 max_invocations 2 reached" in text
    assert "<td>reverse_budget_charge</td>" in text
    assert "<h2 id='outcomes'>Outcomes and durations per tool</h2>" in text
    assert "<h2 id='attempts'>Attempts accounted per run</h2>" in text
    # One file: no external stylesheet, script or image.
    assert "<link" not in text
    assert "<script" not in text
    assert 'src="' not in text


@pytest.mark.e2e
def test_no_process_is_left_running(demo: tuple[DemoResult, str, Path]) -> None:
    result, _output, data = demo
    assert result.worker_pids
    for pid in result.worker_pids:
        assert not pid_alive(pid)
    assert not (data / "stack.json").exists()
    for marker in (str(data / "kafka"), str(data / "temporal")):
        leftovers = [p for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(int(p))]
        assert leftovers == [], marker


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.e2e
def test_ctrl_c_stops_everything_it_started(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        CHIO_DATA_DIR=str(tmp_path),
        CHIO_CACHE_DIR=os.environ.get("CHIO_CACHE_DIR", str(REPO / ".cache")),
    )
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chio_receipts", "demo"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            # Shells hand background jobs an ignored SIGINT; a user's terminal does not.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 120
        while "pipeline:" not in out.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text()
            time.sleep(0.2)
        assert "pipeline:" in out.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, out.read_text()
    assert "everything this command started has been stopped" in out.read_text()
    leftovers = [
        p for p in os.listdir("/proc") if p.isdigit() and str(tmp_path) in _cmdline(int(p))
    ]
    assert leftovers == []
