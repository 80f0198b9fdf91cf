"""The main job: the whole pipeline on the local stack, the demo workflows, the receipts shown.

Starts Kafka and the Temporal dev server, the policy sidecar (served over HTTP so two worker
processes share capabilities and keys), the receipt builder writing to chDB, the completion
watcher, one worker in this process and one in a child process; runs the demo scenarios; waits
until every closed run has its envelope; prints a summary read from ClickHouse, writes an HTML
report, verifies every run, and stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleSpec,
    WorkflowFailureError,
    WorkflowHandle,
)

from chio_receipts._config import AppConfig
from chio_receipts.cli_approvals import answer_approval
from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ReceiptBuilderService,
    VerifyReport,
    verify_run,
)
from chio_receipts.demo import _workflows as wf
from chio_receipts.demo._report import (
    ACCOUNT_HEAD,
    APPROVAL_HEAD,
    OUTCOME_HEAD,
    Summary,
    account_table_rows,
    approval_table_rows,
    outcome_table_rows,
    outcomes_note,
    read_summary,
    write_html_report,
)
from chio_receipts.demo._worker import DEFAULT_SCOPE, WorkerSettings, demo_worker
from chio_receipts.interceptor import (
    ArgumentKey,
    CapabilityToken,
    ChioActivityInterceptor,
    ChioClient,
    WorkflowGrant,
)
from chio_receipts.schemas import KafkaConnection, KeyPair, TopicNames
from chio_receipts.sidecar import (
    CredentialSet,
    LocalSidecar,
    Role,
    SidecarServer,
    add_credential,
    build_guards,
)
from chio_receipts.stack import LocalStack, StackConfig, StackError, read_state
from chio_receipts.streamer import (
    CompletionWatcher,
    ReceiptStreamer,
    StreamerConfig,
    TopicsConfig,
    WatcherConfig,
    ensure_topics,
)

__all__ = ["DemoOptions", "DemoResult", "run_demo"]

DEMO_POLICY = Path(__file__).with_name("policy.cedar")
"""The demo sidecar's Cedar policies (package data beside this module)."""
SEED_003_CONSTRAINT = {"type": "memory_write_deny_patterns", "value": ["^forbidden"]}
"""Seed 003's rule as a Chio constraint: no argument may start with "forbidden"."""
PAYMENT_CEILING = {"type": "max_transaction_amount_usd", "value": "1000.00"}
"""The payment ceiling as a Chio constraint: a payment above 1000 USD is denied."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    """Sizes of the demo (the test runs a smaller one)."""

    fan_out: int = 8
    loop_iterations: int = 3
    split_width: int = 6
    schedule_fires: int = 2
    schedule_every: timedelta = timedelta(seconds=2)
    keep: bool = False
    report_path: Path | None = None
    settle_timeout: float = 90.0
    restore_logging: bool = True


@dataclass(slots=True)
class DemoResult:
    """What the demo did and what ClickHouse says about it."""

    task_queue: str
    runs: list[tuple[str, str]] = field(default_factory=list)
    summary: Summary | None = None
    verified: int = 0
    verify_failures: list[str] = field(default_factory=list)
    report_path: Path | None = None
    worker_pids: list[int] = field(default_factory=list)
    keys_path: Path | None = None


async def run_demo(
    cfg: AppConfig, *, console: Console, options: DemoOptions | None = None
) -> DemoResult:
    """Run the demo end to end; see the module docstring."""
    opts = options or DemoOptions()
    _refuse_if_kept_stack_running(cfg)
    for sub in ("kafka", "temporal", "clickhouse", "demo"):
        shutil.rmtree(cfg.data_dir / sub, ignore_errors=True)
    demo_dir = cfg.data_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    result = DemoResult(task_queue=f"demo-{uuid.uuid4().hex[:6]}")
    # Denials and the flaky tool's failures are expected: worker logs go to a file, not the screen.
    # (The CLI keeps them there until the process exits: shutdown logs late, at GC.)
    log_handler = logging.FileHandler(demo_dir / "demo.log")
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_handlers, root.handlers = root.handlers, [log_handler]
    stack = LocalStack(
        StackConfig(data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, clickhouse_dsn=None)
    )
    keep_stack = False
    try:
        with console.status("starting Kafka and the Temporal dev server"):
            await stack.start()
        console.print(
            f"[bold]local stack[/]: temporal {stack.temporal_address} · kafka "
            f"{stack.kafka_bootstrap} · clickhouse {stack.clickhouse_dsn}"
        )
        async with _pipeline(stack, demo_dir, result, console) as pipe:
            await _run_scenarios(pipe, opts, result, console)
            summary = await read_summary(pipe.builder.sink.query, [r for _w, r in result.runs])
            result.summary = summary
            keys = dict(await pipe.chio.public_keys())
            keys[pipe.builder_key.key_id] = pipe.builder_key.public_key
            # Public keys only: `chio-receipts verify --keys` can check the rows after the demo.
            result.keys_path = demo_dir / "keys.json"
            result.keys_path.write_text(json.dumps({k: v.hex() for k, v in keys.items()}))
            await _verify_all(pipe, result, keys, console)
            report = opts.report_path or (cfg.data_dir / "report.html")
            result.report_path = await asyncio.to_thread(write_html_report, summary, report)
        _print_summary(console, result)
        keep_stack = opts.keep
        return result
    finally:
        if keep_stack:
            stack.write_state()
            console.print(
                "\nstack left running. Query it:\n"  # noqa: S608 - text shown to the user
                '  .venv/bin/chio-receipts query "SELECT outcome, count() FROM '
                'workflow_receipts FINAL GROUP BY outcome"\n'
                f"  (kafka {stack.kafka_bootstrap}, temporal {stack.temporal_address})\n"
                "Verify a run from the rows alone:\n"
                f"  .venv/bin/chio-receipts verify --keys {result.keys_path} "
                f"--workflow-id {_example_workflow(result)}\n"
                "stop it with: .venv/bin/chio-receipts dev down"
            )
        else:
            stack.stop()
        if opts.restore_logging:
            root.handlers = saved_handlers
            log_handler.close()
        console.print(f"logs: {demo_dir}/*.log, {cfg.data_dir}/kafka, {cfg.data_dir}/temporal")


def _example_workflow(result: DemoResult) -> str:
    """The saga's workflow id (the most interesting run to verify), else any run's."""
    ids = [w for w, _r in result.runs]
    return next((w for w in ids if w.startswith("transfer-")), ids[0] if ids else "<workflow id>")


def _refuse_if_kept_stack_running(cfg: AppConfig) -> None:
    state = read_state(cfg.data_dir)
    if state is None:
        return
    from chio_receipts.stack import port_open

    if port_open(state.kafka_bootstrap) or port_open(state.temporal_address):
        raise StackError(
            "demo",
            f"a stack from an earlier run is still up ({state.kafka_bootstrap})",
            "stop it first with `.venv/bin/chio-receipts dev down`",
        )


DEMO_APPROVER = "ops-alice"
"""The operator credential that answers the demo's approvals: the approver its receipts name."""


@dataclass(frozen=True, slots=True)
class _Credentials:
    """The demo sidecar's secrets (never printed): the pipeline's own clients, the second worker
    process, and the person who answers approvals."""

    pipeline: str
    worker_b: str
    approver: str

    @classmethod
    def create(cls, path: Path) -> _Credentials:
        """A fresh credentials file at ``path`` (hashes only) and the secrets it accepts."""
        path.unlink(missing_ok=True)
        return cls(
            pipeline=add_credential(path, "demo-pipeline", Role.ADMIN),
            worker_b=add_credential(path, "demo-worker-b", Role.WORKER),
            approver=add_credential(path, DEMO_APPROVER, Role.OPERATOR),
        )


@dataclass(slots=True)
class _Pipe:
    client: Client
    sidecar_url: str
    chio: ChioClient
    interceptor: ChioActivityInterceptor
    builder: ReceiptBuilderService
    builder_key: KeyPair
    task_queue: str
    other_queue: str
    handles: list[WorkflowHandle[Any, Any]] = field(default_factory=list)
    credentials: _Credentials | None = field(default=None, repr=False)
    sidecar: LocalSidecar | None = None
    """The served sidecar, in process: grants with budgets are minted on it directly."""


@contextlib.asynccontextmanager
async def _pipeline(
    stack: LocalStack, demo_dir: Path, result: DemoResult, console: Console
) -> AsyncIterator[_Pipe]:
    """Sidecar, builder, watcher and two workers, torn down in reverse order."""
    topics = TopicsConfig(partitions=3)
    kafka = KafkaConnection(bootstrap_servers=stack.kafka_bootstrap)
    await ensure_topics(kafka, topics)
    argument_key = ArgumentKey.generate("demo-args")
    builder_key = KeyPair.generate("demo-builder")
    client = await Client.connect(stack.temporal_address)
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as exits:
        # Every call is checked against its grant's constraints, then the demo's Cedar policies.
        guards, policy_hash = build_guards(DEMO_POLICY)
        # Named credentials, as a deployment has them: the pipeline's clients (admin: they mint
        # and evaluate), the second worker process (worker: it only evaluates) and the operator
        # who answers the approvals, whose name each approval receipt records.
        creds_path = demo_dir / "sidecar-credentials.json"
        creds = _Credentials.create(creds_path)
        sidecar = await exits.enter_async_context(
            SidecarServer(
                LocalSidecar(
                    KeyPair.generate("demo-sidecar"), guards=guards, policy_hash=policy_hash
                ),
                credentials=CredentialSet(path=creds_path),
            )
        )
        chio = await exits.enter_async_context(ChioClient(sidecar.url, token=creds.pipeline))
        default = await chio.create_capability("agent:demo-default", DEFAULT_SCOPE, 3600)
        builder = await exits.enter_async_context(
            ReceiptBuilderService(
                BuilderConfig(
                    kafka=KafkaConnection(bootstrap_servers=stack.kafka_bootstrap),
                    clickhouse=ClickHouseConfig(dsn=stack.clickhouse_dsn),
                    builder_key=builder_key,
                    key_url=sidecar.url,
                    topics=TopicNames(
                        steps=topics.steps,
                        runs=topics.runs,
                        envelopes=topics.envelopes_topic,
                        dlq=topics.dlq_topic,
                    ),
                    group_id="chio-demo-builder",
                    grace_seconds=15.0,
                )
            )
        )
        watcher_sink = await exits.enter_async_context(
            ReceiptStreamer(
                StreamerConfig(
                    kafka=kafka,
                    spool_dir=str(demo_dir / "spool-watcher"),
                    topics=topics,
                    client_id="chio-demo-watcher",
                )
            )
        )
        watcher = CompletionWatcher(
            client,
            watcher_sink,
            WatcherConfig(
                checkpoint_path=str(demo_dir / "watcher.checkpoint.json"), poll_interval_s=0.5
            ),
        )
        tasks = [
            asyncio.create_task(builder.run(stop), name="receipt-builder"),
            asyncio.create_task(watcher.run(stop), name="completion-watcher"),
        ]
        exits.push_async_callback(_stop_tasks, stop, tasks)

        other_queue = f"{result.task_queue}-b"
        child = _start_second_worker(
            stack,
            sidecar.url,
            creds.worker_b,
            topics,
            demo_dir,
            other_queue,
            argument_key,
            default.id,
        )
        result.worker_pids.append(child.pid)
        exits.callback(_stop_child, child)
        _worker, interceptor, _chio = await exits.enter_async_context(
            demo_worker(
                WorkerSettings(
                    temporal_address=stack.temporal_address,
                    sidecar_url=sidecar.url,
                    kafka=kafka,
                    topics=topics,
                    spool_dir=demo_dir / "spool-worker-a",
                    task_queue=result.task_queue,
                    argument_key=argument_key,
                    default_capability_id=default.id,
                    identity="demo-worker-a",
                    sidecar_token=creds.pipeline,
                ),
                client=client,
            )
        )
        console.print(
            f"[bold]pipeline[/]: sidecar {sidecar.url} · receipt builder · completion watcher · "
            f"workers on {result.task_queue} (this process) and {other_queue} (pid {child.pid})"
        )
        yield _Pipe(
            client=client,
            sidecar_url=sidecar.url,
            chio=chio,
            interceptor=interceptor,
            builder=builder,
            builder_key=builder_key,
            task_queue=result.task_queue,
            other_queue=other_queue,
            credentials=creds,
            sidecar=sidecar.sidecar,
        )


async def _stop_tasks(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    stop.set()
    done, pending = await asyncio.wait(tasks, timeout=20)
    for task in pending:
        task.cancel()
    for task in done:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc


def _start_second_worker(
    stack: LocalStack,
    sidecar_url: str,
    sidecar_token: str,
    topics: TopicsConfig,
    demo_dir: Path,
    queue: str,
    argument_key: ArgumentKey,
    capability_id: str,
) -> subprocess.Popen[bytes]:
    """The second worker process (same code, another process, its own task queue)."""
    env = dict(os.environ)
    # The argument key is a secret: it travels in the environment, never on the command line.
    env["CHIO_ARGUMENT_KEY"] = argument_key.secret.hex()
    env["CHIO_ARGUMENT_KEY_ID"] = argument_key.key_id
    env["CHIO_SIDECAR_TOKEN"] = sidecar_token
    argv = [
        sys.executable,
        "-m",
        "chio_receipts",
        "worker",
        "--temporal-address",
        stack.temporal_address,
        "--bootstrap",
        stack.kafka_bootstrap,
        "--sidecar-url",
        sidecar_url,
        "--task-queue",
        queue,
        "--spool-dir",
        str(demo_dir / "spool-worker-b"),
        "--default-capability",
        capability_id,
        "--identity",
        "demo-worker-b",
    ]
    with (demo_dir / "worker-b.log").open("ab") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=5)


def _grant(server: str, tool: str, **budget: Any) -> dict[str, Any]:
    return {"server_id": server, "tool_name": tool, "operations": ["invoke"], **budget}


TRANSFER_GRANTS = [
    # One debit of at most 250.00 EUR: the saga's compensation refunds its budget.
    _grant(
        "payments",
        "debit_account",
        max_invocations=1,
        max_cost_per_invocation={"units": 25_000, "currency": "EUR"},
        max_total_cost={"units": 25_000, "currency": "EUR"},
    ),
    _grant("payments", "refund_account"),
    _grant("payments", "check_balance"),
    _grant("agent-tools", "reverse_budget_charge"),
]
"""The transfer's grants (kernel format; credit_account is not granted, so it is denied)."""

BUDGETED_GRANTS = [_grant("agent-tools", "call_tool", max_invocations=2)]
"""Two tool calls: the budgeted run's third is denied, its budget exhausted."""


async def _start(
    pipe: _Pipe,
    fn: Any,
    arg: Any,
    *,
    prefix: str,
    scope: tuple[str, ...] = (),
    child_scope: tuple[str, ...] | None = None,
    constraints: dict[str, list[dict[str, Any]]] | None = None,
    kernel_grants: list[dict[str, Any]] | None = None,
) -> WorkflowHandle[Any, Any]:
    """Mint and register a grant for a new workflow id (and its child), then start it.

    With ``constraints`` (tool -> Chio constraints) the grant is minted in the kernel's form,
    one ``ToolGrant`` per tool carrying its constraints, which the sidecar checks on every call.
    With ``kernel_grants`` (kernel ``ToolGrant`` objects, budgets included) the workflow's
    capability is minted in the kernel's format instead of from ``scope``.
    """
    workflow_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    grants = {workflow_id: scope}
    if child_scope is not None:
        grants[f"{workflow_id}-child"] = child_scope
    for wid, tools in grants.items():
        if kernel_grants is not None and wid == workflow_id and pipe.sidecar is not None:
            minted = pipe.sidecar.chio_mint(f"agent:{prefix}", {"grants": kernel_grants}, 3600)
            token = await pipe.chio.get_capability(minted["id"])
        elif constraints is not None:
            token = await _mint_constrained(pipe, f"agent:{prefix}", tools, constraints)
        else:
            token = await pipe.chio.create_capability(f"agent:{prefix}", tools, 3600)
        pipe.interceptor.register_workflow_grant(
            WorkflowGrant(workflow_id=wid, token=token, tool_server="agent-tools")
        )
    args = arg if isinstance(arg, list) else [arg]
    handle: WorkflowHandle[Any, Any] = await pipe.client.start_workflow(
        fn, args=args, id=workflow_id, task_queue=pipe.task_queue
    )
    pipe.handles.append(handle)
    return handle


async def _mint_constrained(
    pipe: _Pipe, subject: str, tools: tuple[str, ...], constraints: dict[str, list[dict[str, Any]]]
) -> CapabilityToken:
    """A capability whose kernel-format grants carry ``constraints`` (``POST /v1/capabilities``
    with a ``ChioScope`` object), as the worker's client sees it."""
    grants = []
    for tool in tools:
        grant: dict[str, Any] = {"server_id": "*", "tool_name": tool, "operations": ["invoke"]}
        if constraints.get(tool):
            grant["constraints"] = constraints[tool]
        grants.append(grant)
    body = {"subject": subject, "scope": {"grants": grants}, "ttl_seconds": 3600}
    headers = _bearer(pipe.credentials.pipeline if pipe.credentials else None)
    async with httpx.AsyncClient(base_url=pipe.sidecar_url, headers=headers, timeout=10) as http:
        answer = await http.post("/v1/capabilities", json=body)
        answer.raise_for_status()
    return await pipe.chio.get_capability(str(answer.json()["id"]))


async def _run_scenarios(
    pipe: _Pipe, opts: DemoOptions, result: DemoResult, console: Console
) -> None:
    """Start every scenario, drive the human approvals and the schedule, await every run."""
    await _start(
        pipe,
        wf.TransferWorkflow.run,
        wf.Transfer(source="acct-alice", destination="acct-bob", amount=250),
        prefix="transfer",
        kernel_grants=TRANSFER_GRANTS,
    )
    await _start(
        pipe, wf.BudgetedToolWorkflow.run, 3, prefix="budget", kernel_grants=BUDGETED_GRANTS
    )
    await _start(
        pipe,
        wf.FanOutWorkflow.run,
        opts.fan_out,
        prefix="fanout",
        scope=("call_tool", "summarize"),
    )
    await _start(
        pipe,
        wf.ParentWorkflow.run,
        "acct-carol",
        prefix="parent",
        scope=("call_tool", "send_email"),
        child_scope=("check_balance", "read_database"),
    )
    await _start(
        pipe,
        wf.ContinueAsNewWorkflow.run,
        opts.loop_iterations,
        prefix="loop",
        scope=("call_tool",),
    )
    approval_scope = ("read_database", "execute_action", "notify_rejection")
    approve = await _start(
        pipe,
        wf.ApprovalWorkflow.run,
        "refund-approved",
        prefix="approval-yes",
        scope=approval_scope,
    )
    reject = await _start(
        pipe,
        wf.ApprovalWorkflow.run,
        "refund-rejected",
        prefix="approval-no",
        scope=approval_scope,
    )
    # A person answers each held action the way `chio-receipts approve|reject` does.
    await _answer(pipe, approve.id, approve=True, reason="refund verified with the customer")
    await _answer(pipe, reject.id, approve=False, reason="over the refund limit")
    await _start(
        pipe,
        wf.DeniedFirstStepWorkflow.run,
        "ceo@example.com",
        prefix="denied",
        scope=("read_database",),
    )
    await _start(
        pipe, wf.FlakyToolWorkflow.run, "weather-api", prefix="flaky", scope=("flaky_tool",)
    )
    # Seed 003's rule, as a constraint of the grant: a task whose input starts with
    # "forbidden" is denied before the tool runs.
    await _start(
        pipe,
        wf.GuardedTaskWorkflow.run,
        "forbidden: delete every backup",
        prefix="seed003",
        scope=("execute_action",),
        constraints={"execute_action": [SEED_003_CONSTRAINT]},
    )
    # A payment ceiling, as a constraint of the grant; a blocked payee, as a Cedar policy.
    for prefix, payment in (
        ("ceiling", wf.Payment(payee="acct-dave", amount_usd=5000)),
        ("blocked-payee", wf.Payment(payee="acct-mallory", amount_usd=20)),
    ):
        await _start(
            pipe,
            wf.PaymentWorkflow.run,
            payment,
            prefix=prefix,
            scope=("pay",),
            constraints={"pay": [PAYMENT_CEILING]},
        )
    await _start(
        pipe,
        wf.SplitWorkersWorkflow.run,
        [pipe.other_queue, opts.split_width],
        prefix="split",
        scope=("call_tool",),
    )
    started = len(pipe.handles)
    with _progress(console) as progress:
        bars = {
            "closed": progress.add_task("workflows closed", total=started + opts.schedule_fires),
            "steps": progress.add_task("receipts in ClickHouse", total=None),
            "envelopes": progress.add_task("envelopes written", total=None),
        }
        updater = asyncio.create_task(_update_progress(pipe, progress, bars))
        try:
            await _run_schedule(pipe, opts)
            for handle in pipe.handles:
                with contextlib.suppress(WorkflowFailureError):
                    await handle.result()
            result.runs = await _closed_runs(pipe, minimum=_expected_runs(opts))
            await _settle(pipe, result, opts)
        finally:
            updater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await updater
        progress.update(bars["closed"], total=len(result.runs), completed=len(result.runs))
        await _refresh(pipe, progress, bars, final=True)


async def _answer(pipe: _Pipe, workflow_id: str, *, approve: bool, reason: str) -> None:
    """Wait for the run's held action, then answer it through the sidecar and signal the run
    (``cli_approvals.answer_approval``, what ``chio-receipts approve|reject`` runs), as the
    operator :data:`DEMO_APPROVER`."""
    approver = pipe.credentials.approver if pipe.credentials else None
    async with httpx.AsyncClient(
        base_url=pipe.sidecar_url, headers=_bearer(approver), timeout=10
    ) as http:
        held: list[dict[str, Any]] = []

        async def pending() -> bool:
            answer = await http.get("/approvals/pending", params={"workflow_id": workflow_id})
            held[:] = answer.json().get("approvals", []) if answer.status_code == 200 else []
            return bool(held)

        await _poll(pending, 60, f"the approval request of {workflow_id}")
    await answer_approval(
        sidecar_url=pipe.sidecar_url,
        credential=approver,
        workflow_id=workflow_id,
        receipt_id=str(held[0]["request_receipt_id"]),
        approve=approve,
        reason=reason,
        temporal_client=pipe.client,
    )


def _bearer(secret: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"} if secret else {}


def _expected_runs(opts: DemoOptions) -> int:
    # transfer, budgeted, fan-out, parent + child, the loop's runs, two approvals, denied,
    # flaky, split, seed 003's task, the two payments, and the schedule's runs.
    return 1 + 1 + 1 + 2 + opts.loop_iterations + 2 + 1 + 1 + 1 + 1 + 2 + opts.schedule_fires


async def _run_schedule(pipe: _Pipe, opts: DemoOptions) -> None:
    """A schedule that fires every few seconds until it has started ``schedule_fires`` runs."""
    schedule_id = f"report-schedule-{uuid.uuid4().hex[:8]}"
    handle = await pipe.client.create_schedule(
        schedule_id,
        Schedule(
            action=ScheduleActionStartWorkflow(
                wf.ScheduledReportWorkflow.run,
                id=f"scheduled-report-{uuid.uuid4().hex[:8]}",
                task_queue=pipe.task_queue,
            ),
            spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=opts.schedule_every)]),
        ),
    )
    try:

        async def fired() -> bool:
            desc = await handle.describe()
            return desc.info.num_actions >= opts.schedule_fires

        await _poll(fired, 60 + 10 * opts.schedule_every.total_seconds(), "the schedule to fire")
        await handle.pause(note="the demo saw enough runs")
        desc = await handle.describe()
    finally:
        await handle.delete()
    for action in desc.info.recent_actions:
        started = action.action
        if hasattr(started, "workflow_id"):
            pipe.handles.append(pipe.client.get_workflow_handle(started.workflow_id, run_id=None))


async def _closed_runs(pipe: _Pipe, *, minimum: int) -> list[tuple[str, str]]:
    """Every run on the demo's task queue, once all are closed (visibility is eventual)."""
    query = f"TaskQueue = '{pipe.task_queue}'"
    runs: list[tuple[str, str]] = []

    async def all_closed() -> bool:
        nonlocal runs
        found = [ex async for ex in pipe.client.list_workflows(query)]
        runs = [(ex.id, ex.run_id) for ex in found]
        open_runs = [ex for ex in found if ex.close_time is None]
        return len(found) >= minimum and not open_runs

    await _poll(all_closed, 60, "every demo run to close")
    return runs


async def _settle(pipe: _Pipe, result: DemoResult, opts: DemoOptions) -> None:
    """Wait until every closed run has a complete current envelope in ClickHouse."""
    run_ids = [r for _w, r in result.runs]

    async def settled() -> bool:
        _, rows = await pipe.builder.sink.query(
            "SELECT count(), countIf(complete) FROM workflow_receipts FINAL "
            "WHERE has({ids:Array(String)}, run_id)",
            {"ids": run_ids},
        )
        total, complete = rows[0]
        return int(total) == len(run_ids) and int(complete) == len(run_ids)

    await _poll(settled, opts.settle_timeout, "an envelope for every run")


@contextlib.contextmanager
def _progress(console: Console) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield progress


async def _update_progress(pipe: _Pipe, progress: Progress, bars: dict[str, Any]) -> None:
    while True:
        await _refresh(pipe, progress, bars)
        await asyncio.sleep(0.5)


async def _refresh(
    pipe: _Pipe, progress: Progress, bars: dict[str, Any], *, final: bool = False
) -> None:
    closed = 0
    for handle in pipe.handles:
        with contextlib.suppress(Exception):
            desc = await handle.describe()
            closed += desc.close_time is not None
    _, rows = await pipe.builder.sink.query(
        "SELECT (SELECT count() FROM step_receipts), (SELECT count() FROM workflow_receipts FINAL)"
    )
    steps, envelopes = int(rows[0][0]), int(rows[0][1])
    if not final:
        progress.update(bars["closed"], completed=closed)
    progress.update(bars["steps"], completed=steps, total=steps if final else None)
    progress.update(bars["envelopes"], completed=envelopes, total=envelopes if final else None)


async def _verify_all(
    pipe: _Pipe, result: DemoResult, keys: dict[str, bytes], console: Console
) -> None:
    """``verify`` over every run, from ClickHouse rows alone."""
    for workflow_id, run_id in result.runs:
        report = await pipe.builder.sink.call(
            functools.partial(_verify, workflow_id=workflow_id, run_id=run_id, keys=keys)
        )
        if report.ok:
            result.verified += 1
        else:
            result.verify_failures.append(report.summary())
    console.print(f"[bold]verify[/]: {result.verified}/{len(result.runs)} runs verified")
    for failure in result.verify_failures:
        console.print(f"  [red]{failure}[/]")


def _verify(client: Any, *, workflow_id: str, run_id: str, keys: dict[str, bytes]) -> VerifyReport:
    return verify_run(client, workflow_id, run_id, keys=keys)


def _print_summary(console: Console, result: DemoResult) -> None:
    s = result.summary
    if s is None:
        return
    table = Table("outcome", "runs", title="Runs by outcome")
    for outcome, runs in s.runs_by_outcome:
        table.add_row(outcome, str(runs))
    console.print(table)
    table = Table("tool server", "tool", "allowed", "denied", title="Allow / deny per tool")
    for tool_server, tool, allowed, denied in s.by_tool:
        table.add_row(tool_server, tool, str(allowed), str(denied))
    console.print(table)
    if s.most_denied:
        console.print("most denied: " + ", ".join(f"{t} ({n})" for t, n in s.most_denied))
    table = Table("activity type", "evaluations", "p50 µs", "p95 µs", title="Policy latency")
    for activity_type, n, p50, p95 in s.latency:
        table.add_row(activity_type, str(n), f"{p50:.0f}", f"{p95:.0f}")
    console.print(table)
    _print_outcomes(console, s)
    console.print(
        f"{len(s.runs)} runs · {s.step_rows} step receipts ({s.distinct_receipts} distinct) · "
        f"{s.denied} denied · {s.incomplete} incomplete envelopes"
    )
    if result.report_path is not None:
        console.print(f"HTML report: {result.report_path}")


def _print_outcomes(console: Console, s: Summary) -> None:
    """How each tool's calls ended and how long they ran; how each run's attempts are
    accounted for."""
    console.print(outcomes_note(s))
    if s.tool_outcomes:
        table = Table(*OUTCOME_HEAD, title="Outcomes and durations per tool")
        for row in outcome_table_rows(s):
            table.add_row(*row)
        console.print(table)
    table = Table(*ACCOUNT_HEAD, title="Attempts accounted per run")
    for row in account_table_rows(s):
        table.add_row(*row)
    console.print(table)
    table = Table(*APPROVAL_HEAD, title="Approvals (signed decisions, by approver)")
    for row in approval_table_rows(s):
        table.add_row(*row)
    console.print(table)


async def _poll(fn: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not await fn():
        if time.monotonic() > deadline:
            raise StackError("demo", f"timed out after {limit_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.25)
