"""Fast unit tests of the interceptor package's pure parts (no Temporal, no network)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from chio_sdk.models import ChioScope, Operation, ToolGrant
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import chio_receipts.interceptor as interceptor
from chio_receipts.interceptor import (
    DENIED_ERROR_TYPE,
    ENVELOPE_KEYS,
    SIDECAR_ERROR_TYPE,
    SINK_ERROR_TYPE,
    ArgumentKey,
    ChioActivityInterceptor,
    ChioClient,
    ChioTemporalConfigError,
    EvaluationRequest,
    Evaluator,
    HttpSidecar,
    InMemoryReceiptSink,
    UnknownRunError,
    WorkflowGrant,
    WorkflowReceipt,
    WorkflowStepReceipt,
    argument_digest,
    canonical_arguments,
    envelope_to_json,
    scope_for,
    tool_names,
    uuid7,
)
from chio_receipts.schemas import ReceiptSink, ReceiptSinkError, Verdict, encode, receipt_hash
from chio_receipts.sidecar import LocalSidecar

pytestmark = pytest.mark.unit


def test_public_surface_matches_all() -> None:
    exported = {n for n in dir(interceptor) if not n.startswith("_")}
    assert set(interceptor.__all__) <= exported
    assert interceptor.DENIED_ERROR_TYPE == "ChioCapabilityDenied"
    assert interceptor.SIDECAR_ERROR_TYPE == "ChioSidecarError"
    for name in (
        "ChioActivityInterceptor",
        "WorkflowGrant",
        "WorkflowReceipt",
        "WorkflowStepReceipt",
        "build_chio_worker",
        "ActivityGrantOverride",
        "ChioTemporalError",
        "ChioTemporalConfigError",
        "ChioClient",
        "CapabilityToken",
        "scope_for",
        "verify_receipt",
        "Evaluator",
        "HttpSidecar",
        "InMemoryReceiptSink",
        "GrantResolver",
        "Scope",
        "EvaluationRequest",
        "SignedReceipt",
        "uuid7",
    ):
        assert name in interceptor.__all__, name
    # The sidecar is its own package: re-exporting it here would import a web server.
    for name in (
        "LocalSidecar",
        "SidecarServer",
        "create_sidecar_app",
        "openapi_document",
        "serve_sidecar",
    ):
        assert name not in interceptor.__all__, name
        assert not hasattr(interceptor, name), name


def test_scope_for_is_a_chio_scope_of_invoke_grants_on_any_server() -> None:
    scope = scope_for("b", "a", "b")
    assert isinstance(scope, ChioScope)
    assert scope.grants == [
        ToolGrant(server_id="*", tool_name="a", operations=[Operation.INVOKE]),
        ToolGrant(server_id="*", tool_name="b", operations=[Operation.INVOKE]),
    ]
    assert (scope.resource_grants, scope.prompt_grants) == ([], [])
    assert tool_names(scope) == ("a", "b")
    assert scope_for("a", server="db").grants[0].server_id == "db"
    # The SDK's own subset check treats "*" as any server.
    assert scope_for("a", server="db").is_subset_of(scope_for("a", "b"))
    assert not scope_for("a").is_subset_of(scope_for("a", server="db"))
    for bad in [("",), (), (3,)]:
        with pytest.raises(ChioTemporalConfigError):
            scope_for(*bad)  # type: ignore[arg-type]
    with pytest.raises(ChioTemporalConfigError):
        scope_for("a", server="")


def test_tool_names_of_either_scope_form() -> None:
    assert tool_names(["b", "a", "b"]) == ("a", "b")
    mixed = ChioScope(
        grants=[
            ToolGrant(server_id="s", tool_name="run", operations=[Operation.INVOKE]),
            ToolGrant(server_id="s", tool_name="peek", operations=[Operation.READ_RESULT]),
        ]
    )
    assert tool_names(mixed) == ("run",)
    with pytest.raises(ChioTemporalConfigError):
        tool_names("ab")


def test_uuid7_is_version_7_and_sorts_in_creation_order() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    before_ms = time.time_ns() // 1_000_000
    for text in ids[:: len(ids) // 50]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical lower-case 8-4-4-4-12 form
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        # The first 48 bits are the Unix time in ms (the sequence may run a few ms ahead).
        assert abs((parsed.int >> 80) - before_ms) < 5_000


def test_uuid7_random_bits_are_not_shared_with_a_forked_child() -> None:
    import os

    uuid7()  # the parent's generator is seeded and has state a child would inherit
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write_end, uuid7().encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    child = os.read(read_end, 64).decode()
    os.close(read_end)
    parent = uuid7()
    # rand_b (the last 62 bits) would be equal if the child reused the parent's random state.
    assert uuid.UUID(child).int & ((1 << 62) - 1) != uuid.UUID(parent).int & ((1 << 62) - 1)


# -- grants ------------------------------------------------------------------------------------


def _request(cap_id: str, tool: str = "read", **kw: object) -> EvaluationRequest:
    return EvaluationRequest(capability_id=cap_id, tool_server="srv", tool=tool, **kw)  # type: ignore[arg-type]


async def test_attenuation_must_be_a_subset() -> None:
    side = LocalSidecar()
    cap = await side.create_capability("agent:a", ["read", "write"], 60)
    grant = WorkflowGrant(workflow_id="wf", token=cap, tool_server="t")
    narrower = await grant.attenuate_for_activity(side, new_scope=["read"], tool_server="ro")
    assert narrower.scope == ("read",)
    assert narrower.tool_server == "ro"
    assert narrower.token.parent_id == cap.id
    assert narrower.workflow_id == "wf"
    with pytest.raises(ChioTemporalConfigError):
        await grant.attenuate_for_activity(side, new_scope=["read", "admin"])
    with pytest.raises(ChioTemporalConfigError):
        await grant.attenuate_for_activity(side, new_scope=["admin"])


# -- digest ------------------------------------------------------------------------------------


@dataclass
class _Transfer:
    source: str
    amount: int


def test_argument_digest_is_keyed_canonical_and_secret() -> None:
    key = ArgumentKey.from_hex("k1", "11" * 32)
    other = ArgumentKey.from_hex("k2", "22" * 32)
    a = argument_digest(key, [_Transfer("acct-1", 5), {"b": 1, "a": 2}])
    assert a == argument_digest(key, [_Transfer("acct-1", 5), {"a": 2, "b": 1}])
    assert a != argument_digest(key, [_Transfer("acct-1", 6), {"a": 2, "b": 1}])
    assert a != argument_digest(other, [_Transfer("acct-1", 5), {"b": 1, "a": 2}])
    assert len(a) == 64
    # HMAC-SHA256 under the key, over the canonical encoding (the key's state is reused).
    args = [{"order": "o-1", "items": [1, 2]}, "x"]
    for _ in range(2):
        assert (
            argument_digest(key, args)
            == hmac.new(
                bytes.fromhex("11" * 32), canonical_arguments(args), hashlib.sha256
            ).hexdigest()
        )
    assert "11" * 8 not in repr(key)
    assert argument_digest(key, [object()]) == argument_digest(key, [object()])


# -- envelope ----------------------------------------------------------------------------------


async def test_workflow_receipt_envelope_has_exactly_the_seed_fields() -> None:
    side = LocalSidecar()
    cap = await side.create_capability("agent:a", ["read"], 60)
    wr = WorkflowReceipt(workflow_id="wf", run_id="r1")
    for tool in ("read", "write", "read"):
        s = await side.evaluate(
            _request(cap.id, tool, workflow_id="wf", run_id="r1", scheduled_at=7, namespace="ns")
        )
        wr.add_step(WorkflowStepReceipt(receipt=s.receipt, body=s.body))
    wr.finalize("failure", 99)
    env = wr.to_envelope()
    assert tuple(env) == ENVELOPE_KEYS
    assert env["version"] == "chio-temporal/v1"
    assert (env["step_count"], env["allow_count"], env["deny_count"]) == (3, 2, 1)
    assert env["outcome"] == "failure"
    assert env["completed_at"] == 99
    assert env["started_at"] == 7
    assert [s["receipt_id"] for s in env["steps"]] == sorted(s["receipt_id"] for s in env["steps"])
    assert env["metadata"]["namespace"] == "ns"
    # The envelope is a valid Avro WorkflowReceipt record.
    assert encode("dev.chio.receipts.v1.WorkflowReceipt", env)[:2] == b"\xc3\x01"
    assert '"version":"chio-temporal/v1"' in envelope_to_json(env)
    with pytest.raises(ValueError, match="outcome"):
        wr.finalize("exploded", 1)


# -- the interceptor without a worker ---------------------------------------------------------


def _info(**kw: object) -> object:
    base = ActivityEnvironment.default_info()
    defaults: dict[str, object] = {
        "workflow_id": "wf-1",
        "workflow_run_id": "run-1",
        "workflow_type": "Wf",
        "activity_type": "read",
        "namespace": "default",
        "current_attempt_scheduled_time": datetime(2026, 1, 1, tzinfo=UTC),
    }
    defaults.update(kw)
    return dataclasses.replace(base, **defaults)  # type: ignore[arg-type]


def test_constructor_rejects_scope_map_and_missing_sidecar() -> None:
    with pytest.raises(TypeError):
        ChioActivityInterceptor(evaluator=LocalSidecar(), scope_map={"a": "b"})  # type: ignore[call-arg]
    with pytest.raises(ChioTemporalConfigError):
        ChioActivityInterceptor()


async def test_no_grant_denies_with_a_receipt_and_a_fix_in_the_reason() -> None:
    sink = InMemoryReceiptSink()
    icp = ChioActivityInterceptor(evaluator=LocalSidecar(), receipt_sink=sink)
    with pytest.raises(ApplicationError) as err:
        await icp.before_attempt(_info(), ["x"])  # type: ignore[arg-type]
    assert err.value.type == DENIED_ERROR_TYPE
    assert err.value.non_retryable
    details = err.value.details[0]
    assert "register_workflow_grant" in details["reason"]
    assert [r.receipt_id for r, _ in sink.steps] == [details["receipt_id"]]
    assert sink.steps[0][0].verdict is Verdict.DENY


async def test_allow_chains_receipts_and_flush_frees_the_run() -> None:
    side = LocalSidecar()
    sink = InMemoryReceiptSink()
    icp = ChioActivityInterceptor(
        chio_client=ChioClient(side),
        default_tool_server="tools",
        activity_tool_server_map={"write": "db"},
        receipt_sink=sink,
    )
    cap = await side.create_capability("agent:a", ["read", "write"], 60)
    icp.register_workflow_grant(WorkflowGrant(workflow_id="wf-1", token=cap))
    await icp.before_attempt(_info(activity_type="read"), [1])  # type: ignore[arg-type]
    await icp.before_attempt(_info(activity_type="write", attempt=2), [2])  # type: ignore[arg-type]
    (r1, b1), (r2, _) = sink.steps
    assert r1.prev_hash == b""
    assert r2.prev_hash == receipt_hash(b1)
    assert (r1.tool_server, r2.tool_server) == ("tools", "db")
    assert r2.attempt == 2
    icp.finalize_workflow(workflow_id="wf-1", run_id="run-1", outcome="success")
    env = await icp.flush_workflow_receipt(workflow_id="wf-1", run_id="run-1")
    assert env["step_count"] == 2
    assert env["outcome"] == "success"
    assert sink.envelopes[-1] is env
    assert [c.run_id for c in sink.completions] == ["run-1"]
    assert sink.completions[0].source.value == "FINALIZE"
    assert icp.open_runs == 0
    with pytest.raises(UnknownRunError, match="already flushed"):
        await icp.flush_workflow_receipt(workflow_id="wf-1", run_id="run-1")


async def test_run_pinned_grant_does_not_cover_other_runs_and_resolver_is_a_fallback() -> None:
    side = LocalSidecar()
    cap = await side.create_capability("agent:a", ["read"], 60)
    resolved: list[str] = []

    def resolver(info: object) -> WorkflowGrant | None:
        resolved.append(info.workflow_run_id)  # type: ignore[attr-defined]
        return None

    icp = ChioActivityInterceptor(evaluator=side, grant_resolver=resolver)
    icp.register_workflow_grant(WorkflowGrant(workflow_id="wf-1", token=cap, run_id="run-1"))
    await icp.before_attempt(_info(), [])  # type: ignore[arg-type]
    with pytest.raises(ApplicationError) as err:
        await icp.before_attempt(_info(workflow_run_id="run-2"), [])  # type: ignore[arg-type]
    assert err.value.type == DENIED_ERROR_TYPE
    assert resolved == ["run-2"]


async def test_sink_error_is_retryable_and_records_nothing() -> None:
    class FullSink(InMemoryReceiptSink):
        async def publish_step(self, receipt: object, body: bytes) -> None:
            raise ReceiptSinkError("spool full")

    side = LocalSidecar()
    cap = await side.create_capability("agent:a", ["read"], 60)
    icp = ChioActivityInterceptor(evaluator=side, receipt_sink=FullSink())
    icp.register_workflow_grant(WorkflowGrant(workflow_id="wf-1", token=cap))
    with pytest.raises(ApplicationError) as err:
        await icp.before_attempt(_info(), [])  # type: ignore[arg-type]
    assert err.value.type == SINK_ERROR_TYPE
    assert not err.value.non_retryable
    assert icp.workflow_receipt(workflow_id="wf-1", run_id="run-1").step_count == 0


async def test_unreachable_sidecar_is_a_retryable_error_never_an_allow() -> None:
    icp = ChioActivityInterceptor(sidecar_url="http://127.0.0.1:9", receipt_sink=None)
    side = LocalSidecar()
    cap = await side.create_capability("agent:a", ["read"], 60)
    icp.register_workflow_grant(WorkflowGrant(workflow_id="wf-1", token=cap))
    with pytest.raises(ApplicationError) as err:
        await icp.before_attempt(_info(), [])  # type: ignore[arg-type]
    assert err.value.type == SIDECAR_ERROR_TYPE
    assert not err.value.non_retryable
    assert icp.stats.sidecar_errors == 1
    await icp.aclose()


async def test_concurrent_runs_keep_separate_steps_and_state_is_bounded() -> None:
    side = LocalSidecar()
    cap = await side.create_capability("agent:a", ["read"], 60)
    icp = ChioActivityInterceptor(evaluator=side, max_runs=8)
    for i in range(8):
        icp.register_workflow_grant(WorkflowGrant(workflow_id=f"wf-{i}", token=cap))
    await asyncio.gather(
        *(
            icp.before_attempt(_info(workflow_id=f"wf-{i % 8}", activity_id=str(j)), [j])  # type: ignore[arg-type]
            for i in range(8)
            for j in range(3)
        )
    )
    for i in range(8):
        wr = icp.workflow_receipt(workflow_id=f"wf-{i}", run_id="run-1")
        assert wr.step_count == 3
        assert {s.receipt.workflow_id for s in wr.steps} == {f"wf-{i}"}
        hashes = [s.hash for s in wr.steps]
        assert [s.receipt.prev_hash for s in wr.steps] == [b"", *hashes[:-1]]
    icp.register_workflow_grant(WorkflowGrant(workflow_id="wf-new", token=cap))
    await icp.before_attempt(_info(workflow_id="wf-new"), [])  # type: ignore[arg-type]
    assert icp.open_runs == 8
    assert icp.stats.evicted_runs == 1
    with pytest.raises(UnknownRunError):
        icp.workflow_receipt(workflow_id="wf-0", run_id="run-1")


async def test_wider_override_is_a_config_error_with_a_deny_receipt() -> None:
    side = LocalSidecar()
    sink = InMemoryReceiptSink()
    wide = await side.create_capability("agent:a", ["read", "admin"], 60)
    base = await side.create_capability("agent:a", ["read"], 60)
    icp = ChioActivityInterceptor(evaluator=side, receipt_sink=sink)
    icp.register_workflow_grant(WorkflowGrant(workflow_id="wf-1", token=base))
    icp.register_activity_grant_override(
        "read", lambda info: WorkflowGrant(workflow_id="wf-1", token=wide)
    )
    with pytest.raises(ApplicationError) as err:
        await icp.before_attempt(_info(), [])  # type: ignore[arg-type]
    assert err.value.type == "ChioTemporalConfigError"
    assert err.value.non_retryable
    assert sink.steps[-1][0].verdict is Verdict.DENY
    assert "not a subset" in sink.steps[-1][0].reason


def test_implementations_satisfy_their_protocols() -> None:
    assert isinstance(InMemoryReceiptSink(), ReceiptSink)
    assert isinstance(LocalSidecar(), Evaluator)
    assert isinstance(HttpSidecar("http://127.0.0.1:1"), Evaluator)


async def test_expired_grants_are_pruned_as_the_table_grows() -> None:
    side = LocalSidecar()
    live = side.mint("agent:a", ["read"], 600)
    dead = dataclasses.replace(live, id="cap-dead", expires_at=1)
    icp = ChioActivityInterceptor(evaluator=side)
    for i in range(1500):
        icp.register_workflow_grant(WorkflowGrant(workflow_id=f"old-{i}", token=dead))
    icp.register_workflow_grant(WorkflowGrant(workflow_id="live", token=live))
    assert icp.workflow_grant_for("live", None) is not None
    assert icp.workflow_grant_for("old-0", None) is None
    assert icp.workflow_grant_for("old-1499", None) is not None


def _circular() -> list[object]:
    value: list[object] = ["loop"]
    value.append(value)
    return value


ARGUMENT_SAMPLES: list[list[object]] = [
    [{"order_id": "o-123456", "amount_cents": 12_500, "currency": "EUR", "items": [1, 2, 3]}],
    ["plain", 1, 2.5, True, [1, "x"], {"b": 1, "a": {"z": None, "é": "ü"}}],
    [],
    [None],
    [b"raw-bytes"],
    [("tuple", 1)],
    [{"nested": [{"k": float("inf")}]}],
    [{1: "int key"}],
    [{"when": __import__("datetime").datetime(2026, 1, 1)}],
    [{1: "mixed", "a": "key types"}],  # sort_keys refuses to compare int with str
    [_circular()],
    [{"after": "a refused value, the encoder starts clean"}],
]


@pytest.mark.unit
@pytest.mark.parametrize("args", ARGUMENT_SAMPLES)
def test_plain_json_fast_path_frames_exactly_what_the_converter_does(args: list[object]) -> None:
    import temporalio.converter

    converter = temporalio.converter.default().payload_converter
    assert canonical_arguments(args) == canonical_arguments(args, converter)
