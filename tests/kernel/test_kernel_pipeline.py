"""The whole pipeline with the real Chio kernel as the sidecar (issue 15, conformance).

A real Temporal worker whose ``ChioActivityInterceptor`` decides every attempt through
``ChioKernelSidecar`` on ``chio-kernel-sidecar``'s mediated ``/v1/evaluate`` publishes its steps
through ``ReceiptStreamer`` to the session's Kafka; the completion watcher emits each run's
completion; the receipt builder, trusting only the key derived from the kernel's
``authority.seed`` (no sidecar key ring), writes rows and envelopes to ClickHouse (chDB);
``verify_run`` checks them from the rows alone. Scenarios:

- every activity allowed: the kernel's authorization receipts (verdict ``incomplete``, an ALLOW)
  are on every row, the envelope is complete and verifies;
- an activity outside the minted scope: the attempt fails with ``DENIED_ERROR_TYPE``, its
  kernel-signed deny receipt is stored with its guard, the envelope counts it;
- a released (revoked) capability: the kernel 0.1.2 answers 403 without a receipt, so the
  worker's deny step is unsigned; the builder dead-letters it as ``unsigned_step`` and the run's
  envelope says one step is missing;
- the kernel's own verifier (``chio-receipt-verify``) agrees with ``check_chio_step`` and
  ``verify_kernel_receipt`` on every Chio receipt stored here, and on tampered copies.

Skipped, with the reason, when the kernel binaries are not built (``make kernel``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ReceiptBuilderService,
    parse_dead_letter_headers,
    verify_run,
)
from chio_receipts.consumers._wire import decode_plain
from chio_receipts.interceptor import (
    DENIED_ERROR_TYPE,
    ChioActivityInterceptor,
    ChioKernelSidecar,
    WorkflowGrant,
)
from chio_receipts.schemas import KafkaConnection, KeyPair, StepReceipt
from tests.kernel.test_kernel_sidecar import CONTROL_TOKEN, Sidecar, _start, _stop
from tests.support.helpers import eventually
from tests.support.kafka_topics import read_all
from tests.support.kernel import KernelVerify, tampered_receipts
from tests.support.streamer_kafka import config as streamer_config
from tests.support.workflows import ALL_ACTIVITIES, Plan, PlanWorkflow

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]

TOOL_SERVER = "temporal"


@dataclass
class KernelPipeline:
    """The worker (deciding on the kernel), the streamer, the watcher and the builder."""

    kernel: Sidecar
    client: Client
    evaluator: ChioKernelSidecar
    interceptor: ChioActivityInterceptor
    task_queue: str
    topics: schemas.TopicNames
    bootstrap: str
    sink: streamer.ReceiptStreamer
    watcher: streamer.CompletionWatcher
    builder: ReceiptBuilderService
    builder_key: KeyPair
    completed: set[tuple[str, str]] = field(default_factory=set)

    async def rows(self, sql: str, **parameters: Any) -> list[tuple[Any, ...]]:
        _, rows = await self.builder.sink.query(sql, parameters or None)
        return list(rows)

    async def run(self, workflow_id: str, plan: Plan) -> tuple[str, BaseException | None]:
        """Run ``plan`` as ``workflow_id`` to its end; (run id, the failure's cause or None)."""
        handle = await self.client.start_workflow(
            PlanWorkflow.run,
            plan,
            id=workflow_id,
            task_queue=self.task_queue,
            execution_timeout=timedelta(seconds=60),
        )
        failure: BaseException | None = None
        try:
            await asyncio.wait_for(handle.result(), 60)
        except WorkflowFailureError as exc:
            failure = exc.cause
        run_id = handle.result_run_id
        assert run_id
        return run_id, failure

    async def envelope(self, workflow_id: str, run_id: str) -> tuple[Any, ...]:
        """The run's envelope row, once the watcher's completion reached the builder."""

        async def emitted() -> bool:
            await self.watcher.poll_once()
            await self.sink.flush(10)
            return True

        async def written() -> tuple[Any, ...] | None:
            await emitted()
            rows = await self.rows(
                "SELECT step_count, allow_count, deny_count, complete, missing_steps, "
                "toString(outcome) FROM workflow_receipts FINAL "
                "WHERE workflow_id = {wf:String} AND run_id = {run:String}",
                wf=workflow_id,
                run=run_id,
            )
            return rows[0] if rows else None

        found: tuple[Any, ...] = await eventually(written, timeout=60, interval=0.3)
        return found

    async def steps(self, workflow_id: str) -> list[dict[str, Any]]:
        """The run's step rows (the Chio columns, the stored message), by activity id."""
        names = (
            "run_id",
            "activity_id",
            "activity_type",
            "attempt",
            "verdict",
            "key_id",
            "chio_receipt",
            "decision",
            "guard",
            "kernel_key",
            "receipt_kind",
            "wire",
        )
        rows = await self.rows(
            f"SELECT {', '.join(names)} FROM step_receipts "
            "WHERE workflow_id = {wf:String} ORDER BY activity_id, attempt",
            wf=workflow_id,
        )
        return [dict(zip(names, row, strict=True)) for row in rows]

    def verify(self, workflow_id: str) -> Any:
        return verify_run(
            self.builder.sink.client,
            workflow_id,
            keys={self.builder_key.key_id: self.builder_key.public_key},
            trusted_kernel_keys={self.kernel.kernel_key},
        )


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Any:
    running = _start(tmp_path_factory.mktemp("kernel-pipe") / "state", ["--ephemeral-receipts"])
    try:
        yield running
    finally:
        _stop(running)


@pytest.fixture(scope="module")
async def pipeline(
    kernel: Sidecar,
    temporal_client: Client,
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[KernelPipeline]:
    root: Path = tmp_path_factory.mktemp("kernel-pipeline")
    name = f"kpipe-{uuid.uuid4().hex[:8]}"
    cfg = streamer_config(kafka_bootstrap, str(root / "spool"), f"{name}.")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    topics = cfg.topics.names
    builder_key = KeyPair.generate(f"builder-{name}")
    builder = ReceiptBuilderService(
        BuilderConfig(
            kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
            clickhouse=ClickHouseConfig(dsn=f"chdb://{root / 'clickhouse'}"),
            builder_key=builder_key,
            # No sidecar key ring: the kernel's key is the only signer trusted.
            public_keys={},
            trusted_kernel_keys=frozenset({kernel.kernel_key}),
            topics=topics,
            group_id=f"builder-{name}",
            poll_timeout_ms=100,
            grace_seconds=2.0,
        )
    )
    stop = asyncio.Event()
    evaluator = ChioKernelSidecar(
        kernel.url,
        control_token=CONTROL_TOKEN,
        kernel_key=kernel.kernel_key,
        tool_server=TOOL_SERVER,
        timeout=10.0,
    )
    async with evaluator, streamer.ReceiptStreamer(cfg) as sink:
        interceptor = ChioActivityInterceptor(
            evaluator=evaluator, receipt_sink=sink, default_tool_server=TOOL_SERVER
        )
        task_queue = f"tq-{name}"
        watcher = streamer.CompletionWatcher(
            temporal_client,
            sink,
            streamer.WatcherConfig(
                checkpoint_path=str(root / "watcher.json"),
                start_from=datetime.now(UTC) - timedelta(minutes=1),
                query_filter=f'TaskQueue = "{task_queue}"',
                lag_window_s=30,
                poll_interval_s=0.2,
            ),
        )
        await builder.start()
        loop_task = asyncio.create_task(builder.run(stop))
        try:
            async with Worker(
                temporal_client,
                task_queue=task_queue,
                workflows=[PlanWorkflow],
                activities=ALL_ACTIVITIES,
                interceptors=[interceptor],
            ):
                yield KernelPipeline(
                    kernel=kernel,
                    client=temporal_client,
                    evaluator=evaluator,
                    interceptor=interceptor,
                    task_queue=task_queue,
                    topics=topics,
                    bootstrap=kafka_bootstrap,
                    sink=sink,
                    watcher=watcher,
                    builder=builder,
                    builder_key=builder_key,
                )
        finally:
            stop.set()
            await asyncio.wait_for(loop_task, 30)
            await builder.stop()


def _denial(failure: BaseException | None) -> ApplicationError:
    """The workflow's failure is the interceptor's denial (unwrapped from the ActivityError, the
    interceptor's default), non-retryable."""
    assert isinstance(failure, ApplicationError), failure
    assert not isinstance(failure, ActivityError)
    assert failure.type == DENIED_ERROR_TYPE
    assert failure.non_retryable
    return failure


def _check_kernel_receipt(row: dict[str, Any], kernel_key: str, verdict: str) -> dict[str, Any]:
    assert row["key_id"] == ""  # the kernel does not sign the Avro record: its receipt does
    receipt: dict[str, Any] = json.loads(row["chio_receipt"])
    assert receipt["kernel_key"] == kernel_key == row["kernel_key"]
    assert receipt["decision"]["verdict"] == verdict == row["decision"]
    assert row["receipt_kind"] == "mediated_decision"
    step = StepReceipt.from_avro(decode_plain(row["wire"]).record)
    assert schemas.check_chio_step(step, trusted_keys={kernel_key}) is None
    assert receipt["metadata"]["receipt_context"]["request_id"] == schemas.request_id_for(step)
    return receipt


async def _grant(pipe: KernelPipeline, workflow_id: str, tools: list[str]) -> str:
    cap = await pipe.evaluator.create_capability(f"agent:{workflow_id}", tools, 600)
    pipe.interceptor.register_workflow_grant(WorkflowGrant(workflow_id=workflow_id, token=cap))
    return cap.id


@pytest.fixture(scope="module")
async def allowed_run(pipeline: KernelPipeline) -> tuple[str, str]:
    wf = f"kernel-allow-{uuid.uuid4().hex[:8]}"
    await _grant(pipeline, wf, ["call_tool", "read_database", "send_email"])
    run_id, failure = await pipeline.run(wf, Plan(["call_tool", "read_database", "send_email"]))
    assert failure is None, failure
    return wf, run_id


@pytest.fixture(scope="module")
async def denied_run(pipeline: KernelPipeline) -> tuple[str, str, BaseException | None]:
    wf = f"kernel-deny-{uuid.uuid4().hex[:8]}"
    await _grant(pipeline, wf, ["call_tool"])
    run_id, failure = await pipeline.run(wf, Plan(["call_tool", "send_email", "call_tool"]))
    return wf, run_id, failure


@pytest.fixture(scope="module")
async def revoked_run(pipeline: KernelPipeline) -> tuple[str, str, BaseException | None]:
    wf = f"kernel-revoked-{uuid.uuid4().hex[:8]}"
    cap_id = await _grant(pipeline, wf, ["call_tool"])
    await pipeline.evaluator.revoke(cap_id)  # POST /v1/capabilities/release
    run_id, failure = await pipeline.run(wf, Plan(["call_tool"]))
    return wf, run_id, failure


async def test_allowed_run_is_built_from_kernel_receipts_and_verifies(
    pipeline: KernelPipeline, allowed_run: tuple[str, str]
) -> None:
    wf, run_id = allowed_run
    step_count, allow, deny, complete, missing, outcome = await pipeline.envelope(wf, run_id)
    assert (step_count, allow, deny, complete, missing) == (3, 3, 0, True, 0)
    assert outcome == "success"
    rows = await pipeline.steps(wf)
    assert [(r["activity_type"], r["attempt"], r["verdict"]) for r in rows] == [
        ("call_tool", 1, "ALLOW"),
        ("read_database", 1, "ALLOW"),
        ("send_email", 1, "ALLOW"),
    ]
    for row in rows:
        # The kernel's allow is a pre-execution authorization: "incomplete", mapped to ALLOW.
        receipt = _check_kernel_receipt(row, pipeline.kernel.kernel_key, "incomplete")
        assert receipt["tool_server"] == TOOL_SERVER
        assert receipt["tool_name"] == row["activity_type"]
    report = pipeline.verify(wf)
    assert report.ok, report.summary()
    assert (report.runs, report.envelopes, report.steps) == (1, 1, 3)
    # Trusting another key instead, verify refuses every step (the kernel key is the anchor).
    other = verify_run(
        pipeline.builder.sink.client,
        wf,
        keys={pipeline.builder_key.key_id: pipeline.builder_key.public_key},
        trusted_kernel_keys={"00" * 32},
    )
    assert not other.ok
    assert sum("untrusted_kernel_key" in p for p in other.problems) == 3, other.problems


async def test_out_of_scope_activity_is_denied_with_a_signed_deny_receipt(
    pipeline: KernelPipeline, denied_run: tuple[str, str, BaseException | None]
) -> None:
    wf, run_id, failure = denied_run
    assert "not in capability scope" in str(_denial(failure))
    step_count, allow, deny, complete, missing, outcome = await pipeline.envelope(wf, run_id)
    assert (step_count, allow, deny, complete, missing) == (2, 1, 1, True, 0)
    assert outcome == "failure"
    rows = await pipeline.steps(wf)
    assert [(r["activity_type"], r["attempt"], r["verdict"]) for r in rows] == [
        ("call_tool", 1, "ALLOW"),
        ("send_email", 1, "DENY"),  # one attempt: a deny is not retried
    ]
    _check_kernel_receipt(rows[0], pipeline.kernel.kernel_key, "incomplete")
    receipt = _check_kernel_receipt(rows[1], pipeline.kernel.kernel_key, "deny")
    assert rows[1]["guard"] == receipt["decision"]["guard"] == "kernel"
    assert "not in capability scope" in receipt["decision"]["reason"]
    report = pipeline.verify(wf)
    assert report.ok, report.summary()


async def test_revoked_capability_gives_an_unsigned_deny_the_builder_dead_letters(
    pipeline: KernelPipeline, revoked_run: tuple[str, str, BaseException | None]
) -> None:
    wf, run_id, failure = revoked_run
    cause = _denial(failure)
    assert "revoked" in str(cause)
    # The kernel answers 403 without a receipt: the worker's DENY step carries none and has no
    # Avro signature either. Nothing vouches for it, so the builder refuses it: no row, a dead
    # letter that says why, and an envelope (after the grace period) that says a step is missing.
    step_count, allow, deny, complete, missing, outcome = await pipeline.envelope(wf, run_id)
    assert (step_count, allow, deny, complete, missing) == (0, 0, 0, False, 1)
    assert outcome == "failure"
    assert await pipeline.steps(wf) == []
    dead = await _dead_letters_of(pipeline, wf)
    assert len(dead) == 1, dead
    headers, step = dead[0]
    assert headers["reason"] == "unsigned_step", headers
    assert "neither an Avro signature nor a Chio receipt" in headers["detail"], headers
    assert (step.verdict, step.key_id, step.signature, step.chio_receipt) == (
        schemas.Verdict.DENY,
        "",
        b"",
        "",
    )
    assert "revoked" in step.reason
    # The rows (none) and the builder-signed envelope agree, but Temporal started an attempt
    # that nothing accounts for (its only record was refused): verify names that gap.
    report = pipeline.verify(wf)
    assert (report.runs, report.steps, report.envelopes) == (1, 0, 1)
    assert report.missing == [(wf, run_id, "1", 1)], report.summary()
    assert not report.ok
    assert all("MISSING attempt" in p for p in report.problems), report.problems


async def _dead_letters_of(
    pipe: KernelPipeline, workflow_id: str
) -> list[tuple[dict[str, str], StepReceipt]]:
    out: list[tuple[dict[str, str], StepReceipt]] = []
    for message in await read_all(pipe.bootstrap, pipe.topics.dlq, 1, timeout=15):
        step = StepReceipt.from_avro(decode_plain(message.value).record)
        if step.workflow_id == workflow_id:
            out.append((parse_dead_letter_headers(message.headers), step))
    return out


async def test_the_kernel_verifier_agrees_on_every_stored_receipt_and_tampered_copies(
    pipeline: KernelPipeline,
    allowed_run: tuple[str, str],
    denied_run: tuple[str, str, BaseException | None],
    revoked_run: tuple[str, str, BaseException | None],
    kernel_verify: KernelVerify,
) -> None:
    for wf, run_id, *_ in (allowed_run, denied_run, revoked_run):
        await pipeline.envelope(wf, run_id)
    stored = await pipeline.rows(
        "SELECT wire, chio_receipt FROM step_receipts WHERE chio_receipt != '' "
        "ORDER BY toString(receipt_id)"
    )
    assert len(stored) == 5  # 3 allowed + (1 allowed + 1 denied); the revoked step has none
    key = pipeline.kernel.kernel_key
    items: list[tuple[str, dict[str, Any], StepReceipt, bool]] = []
    for wire, text in stored:
        step = StepReceipt.from_avro(decode_plain(wire).record)
        assert step.chio_receipt == text
        receipt = json.loads(text)
        items.append((f"{step.receipt_id}", receipt, step, True))
        items += [
            (f"{step.receipt_id}/{name}", forged, step, False)
            for name, forged in tampered_receipts(receipt).items()
        ]
    verdicts = kernel_verify([json.dumps(doc) for _, doc, _, _ in items], "receipts")
    for (name, doc, step, expected), kernel in zip(items, verdicts, strict=True):
        ours = schemas.verify_kernel_receipt(doc, trusted_keys=[key])
        text, signed = schemas.chio_step_payload(doc)
        carried = dataclasses.replace(step, chio_receipt=text, chio_signed=signed)
        check = schemas.check_chio_step(carried, trusted_keys={key})
        assert (kernel == "valid") is expected, (name, kernel)
        assert ours.valid is expected, (name, ours.reason)
        assert (check is None) is expected, (name, check)
