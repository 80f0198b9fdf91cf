"""chio-sdk-python's objects in the interceptor: its client, its tokens, its scopes.

Tokens are minted by the real ``chio_sdk.ChioClient`` against this project's sidecar served on
a loopback port (no mocks); decisions go through the interceptor's gate without a worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from chio_sdk import ChioClient as SdkChioClient
from chio_sdk.models import CapabilityToken as SdkCapabilityToken
from chio_sdk.models import ChioScope, Operation, ToolGrant
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from chio_receipts.interceptor import (
    CONFIG_ERROR_TYPE,
    DENIED_ERROR_TYPE,
    ChioActivityInterceptor,
    ChioClient,
    ChioKernelSidecar,
    ChioTemporalConfigError,
    InMemoryReceiptSink,
    WorkflowGrant,
    raw_token,
    scope_for,
)
from chio_receipts.interceptor._sdk import evaluator_for
from chio_receipts.schemas import Verdict, verify_capability_token
from chio_receipts.sidecar import LocalSidecar, SidecarServer

pytestmark = pytest.mark.unit


@dataclasses.dataclass
class Served:
    local: LocalSidecar
    url: str
    chio: SdkChioClient


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    local = LocalSidecar()
    async with SidecarServer(local) as server, SdkChioClient(server.url) as chio:
        yield Served(local, server.url, chio)


def _info(**kw: object) -> object:
    base = ActivityEnvironment.default_info()
    defaults: dict[str, object] = {
        "workflow_id": "wf-1",
        "workflow_run_id": "run-1",
        "workflow_type": "Wf",
        "activity_type": "read_database",
        "namespace": "default",
        "current_attempt_scheduled_time": datetime(2026, 1, 1, tzinfo=UTC),
    }
    defaults.update(kw)
    return dataclasses.replace(base, **defaults)  # type: ignore[arg-type]


# -- tokens ------------------------------------------------------------------------------------


async def test_an_sdk_token_round_trips_to_the_signed_kernel_token(served: Served) -> None:
    token = await served.chio.create_capability(
        subject="agent:my-pipeline",
        scope=scope_for("call_tool", "read_database", "send_email"),
        ttl_seconds=3600,
    )
    assert isinstance(token, SdkCapabilityToken)
    signed = served.local.chio_token(token.id)
    assert signed is not None
    # The SDK's own serialisation does not verify: it drops "schema" and respells operations.
    assert not verify_capability_token(token.model_dump(exclude_none=True)).valid
    raw = raw_token(token)
    assert raw == signed
    assert raw is not None
    assert raw["schema"] == "chio.capability.v1"
    assert raw["scope"]["grants"][0]["operations"] == ["invoke"]
    assert verify_capability_token(raw).valid

    grant = WorkflowGrant(workflow_id="agent-run-123", token=token, tool_server="agent-tools")
    assert grant.raw_token == signed
    assert grant.capability_id == token.id
    assert grant.scope == ("call_tool", "read_database", "send_email")
    assert grant.chio_scope == token.scope
    assert grant.expires_at_us == token.expires_at * 1_000_000
    assert not grant.expired()
    assert grant.expired(grant.expires_at_us)


async def test_a_changed_sdk_token_has_no_raw_token(served: Served) -> None:
    token = await served.chio.create_capability(
        subject="agent:a", scope=scope_for("read_database"), ttl_seconds=60
    )
    widened = token.model_copy(update={"scope": scope_for("read_database", "send_email")})
    assert raw_token(widened) is None
    assert WorkflowGrant(workflow_id="wf", token=widened).raw_token is None
    later = token.model_copy(update={"expires_at": token.expires_at + 1})
    assert raw_token(later) is None


async def test_the_projects_token_has_no_raw_token() -> None:
    side = LocalSidecar()
    cap = await side.create_capability("agent:a", ["read"], 60)
    grant = WorkflowGrant(workflow_id="wf", token=cap)
    assert raw_token(cap) is None
    assert grant.raw_token is None
    assert grant.scope == ("read",)
    assert grant.expires_at_us == cap.expires_at
    with pytest.raises(ChioTemporalConfigError):
        WorkflowGrant(workflow_id="wf", token={"id": "cap-1"})  # type: ignore[arg-type]


# -- the client --------------------------------------------------------------------------------


async def test_an_sdk_client_evaluates_on_the_kernel_route_at_the_sidecar_url(
    served: Served,
) -> None:
    icp = ChioActivityInterceptor(
        chio_client=served.chio, sidecar_url=served.url, default_tool_server="agent-tools"
    )
    assert isinstance(icp.evaluator, ChioKernelSidecar)
    assert icp.evaluator.base_url == served.url
    assert icp.sidecar_url == served.url
    # Without sidecar_url: the SDK client's own base URL.
    fallback = ChioActivityInterceptor(chio_client=served.chio)
    assert isinstance(fallback.evaluator, ChioKernelSidecar)
    assert fallback.evaluator.base_url == served.url
    await fallback.aclose()
    # The project's client keeps its own evaluator (not closed by the interceptor).
    local = LocalSidecar()
    assert ChioActivityInterceptor(chio_client=ChioClient(local)).evaluator is local
    with pytest.raises(ChioTemporalConfigError):
        evaluator_for(object(), None)  # type: ignore[arg-type]
    nameless = SdkChioClient(served.url)
    del nameless._base_url
    with pytest.raises(ChioTemporalConfigError, match="sidecar_url"):
        ChioActivityInterceptor(chio_client=nameless)
    await nameless.close()

    sink = InMemoryReceiptSink()
    icp.receipt_sink = sink
    token = await served.chio.create_capability(
        subject="agent:a", scope=scope_for("read_database"), ttl_seconds=60
    )
    icp.register_workflow_grant(WorkflowGrant(workflow_id="wf-1", token=token))
    await icp.before_attempt(_info(), ["x"])  # type: ignore[arg-type]
    with pytest.raises(ApplicationError) as denied:
        await icp.before_attempt(_info(activity_type="send_email"), ["x"])  # type: ignore[arg-type]
    assert denied.value.type == DENIED_ERROR_TYPE
    assert [(r.tool, r.verdict, r.capability_id) for r, _ in sink.steps] == [
        ("read_database", Verdict.ALLOW, token.id),
        ("send_email", Verdict.DENY, token.id),
    ]
    await icp.aclose()
    assert icp.evaluator._client is None  # type: ignore[attr-defined]


# -- attenuation and overrides -----------------------------------------------------------------


async def test_attenuate_for_activity_with_the_sdk_client(served: Served) -> None:
    token = await served.chio.create_capability(
        subject="agent:a", scope=scope_for("call_tool", "read_database"), ttl_seconds=60
    )
    grant = WorkflowGrant(workflow_id="wf-1", token=token, tool_server="agent-tools")
    narrower = await grant.attenuate_for_activity(
        served.chio, new_scope=scope_for("read_database"), tool_server="db-readonly"
    )
    assert isinstance(narrower.token, SdkCapabilityToken)
    assert narrower.scope == ("read_database",)
    assert narrower.tool_server == "db-readonly"
    assert narrower.workflow_id == "wf-1"
    assert narrower.capability_id != grant.capability_id
    assert narrower.raw_token == served.local.chio_token(narrower.capability_id)
    assert narrower.raw_token is not None
    assert narrower.raw_token["delegation_chain"][0]["capability_id"] == token.id
    # Tool names are narrowed too, keeping the parent's grants.
    by_name = await grant.attenuate_for_activity(served.chio, new_scope=["call_tool"])
    assert by_name.scope == ("call_tool",)
    # Wider or disjoint scopes fail before the sidecar is asked.
    for wider in (scope_for("send_email"), scope_for("read_database", "send_email")):
        with pytest.raises(ChioTemporalConfigError):
            await grant.attenuate_for_activity(served.chio, new_scope=wider)
    # A server the parent does not cover is not a subset either.
    on_server = await served.chio.create_capability(
        subject="agent:a", scope=scope_for("read_database", "x", server="db"), ttl_seconds=60
    )
    pinned = WorkflowGrant(workflow_id="wf-2", token=on_server)
    with pytest.raises(ChioTemporalConfigError, match="not a subset"):
        await pinned.attenuate_for_activity(served.chio, new_scope=scope_for("read_database"))
    with pytest.raises(ChioTemporalConfigError, match="ttl_seconds"):
        await grant.attenuate_for_activity(
            served.chio, new_scope=scope_for("read_database"), ttl_seconds=5
        )
    # The project's client narrows an SDK grant by id and tool names.
    project = ChioClient(served.url)
    via_project = await grant.attenuate_for_activity(project, new_scope=scope_for("call_tool"))
    assert via_project.scope == ("call_tool",)
    assert via_project.token.parent_id == token.id  # type: ignore[union-attr]
    await project.aclose()
    # An SDK client cannot narrow a project token: it attenuates whole tokens, not ids.
    side = LocalSidecar()
    own = WorkflowGrant(workflow_id="wf", token=await side.create_capability("a", ["r", "w"], 60))
    with pytest.raises(ChioTemporalConfigError, match="chio_sdk"):
        await own.attenuate_for_activity(served.chio, new_scope=["r"])


async def test_an_override_outside_an_sdk_grant_is_a_config_error(served: Served) -> None:
    sink = InMemoryReceiptSink()
    icp = ChioActivityInterceptor(chio_client=served.chio, receipt_sink=sink)
    token = await served.chio.create_capability(
        subject="agent:a", scope=scope_for("call_tool", "read_database"), ttl_seconds=60
    )
    grant = WorkflowGrant(workflow_id="wf-1", token=token)
    icp.register_workflow_grant(grant)
    narrower = await grant.attenuate_for_activity(served.chio, new_scope=scope_for("read_database"))
    icp.register_activity_grant_override("read_database", lambda info: narrower)
    await icp.before_attempt(_info(), ["x"])  # type: ignore[arg-type]
    assert sink.steps[-1][0].capability_id == narrower.capability_id
    # An override whose ChioScope names a tool outside the workflow grant's.
    other = await served.chio.create_capability(
        subject="agent:a", scope=scope_for("read_database", "send_email"), ttl_seconds=60
    )
    icp.register_activity_grant_override(
        "read_database", lambda info: WorkflowGrant(workflow_id="wf-1", token=other)
    )
    with pytest.raises(ApplicationError) as err:
        await icp.before_attempt(_info(), ["x"])  # type: ignore[arg-type]
    assert err.value.type == CONFIG_ERROR_TYPE
    assert "send_email" in err.value.details[0]["reason"]
    assert sink.steps[-1][0].verdict is Verdict.DENY
    await icp.aclose()


async def test_the_projects_client_takes_a_chio_scope() -> None:
    chio = ChioClient(LocalSidecar())
    cap = await chio.create_capability("agent:a", scope_for("b", "a"), 60)
    assert cap.scope == ("a", "b")
    child = await chio.attenuate(cap.id, scope=scope_for("a"))
    assert child.scope == ("a",)
    mixed = ChioScope(
        grants=[ToolGrant(server_id="s", tool_name="a", operations=[Operation.INVOKE])]
    )
    assert (await chio.create_capability("agent:a", mixed, 60)).scope == ("a",)
