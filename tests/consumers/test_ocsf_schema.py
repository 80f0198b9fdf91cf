"""Every OCSF event the SIEM mapping makes validates against the official OCSF JSON Schema."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from chio_receipts.consumers._envelope import Envelope
from chio_receipts.consumers._wire import STEP_SCHEMA, decode_plain, read_plain
from chio_receipts.consumers.siem import (
    OCSF_PROFILES,
    OCSF_VERSION,
    envelope_to_ocsf,
    is_deny,
    step_to_ocsf,
)
from chio_receipts.schemas import KeyPair, Verdict, sign_receipt
from tests.support.consumer_factory import receipt
from tests.support.ocsf import ocsf_errors

pytestmark = pytest.mark.unit
WORKER = KeyPair.generate("worker-ocsf")
BUILDER = KeyPair.generate("builder-ocsf")
OUTCOMES = ["success", "failure", "cancelled", "terminated", "timed_out", "continued_as_new"]


def _bodies(workflow_id: str, n: int, deny: tuple[int, ...] = ()) -> list[bytes]:
    return [
        sign_receipt(
            receipt(
                workflow_id,
                "r1",
                i,
                verdict=Verdict.DENY if i in deny else Verdict.ALLOW,
                worker_identity="4242@worker-7.example.com",
            ),
            WORKER,
        )[1]
        for i in range(n)
    ]


def _step(verdict: Verdict) -> dict[str, Any]:
    signed, body = sign_receipt(
        receipt("wf-s", "r1", 0, verdict=verdict, worker_identity="4242@worker-7.example.com"),
        WORKER,
    )
    record = read_plain(STEP_SCHEMA, body)
    record["receipt_id"] = str(record["receipt_id"])
    assert record["receipt_id"] == str(signed.receipt_id)
    return record


def _envelope(outcome: str, steps: int = 3, deny: tuple[int, ...] = (1,)) -> dict[str, Any]:
    """The plain record the exporter decodes from a real signed envelope."""
    bodies = _bodies(f"wf-{outcome}", steps, deny)
    extra = (("continued_as_new_run_id", "r2"),) if outcome == "continued_as_new" else ()
    envelope = Envelope(
        namespace="default",
        workflow_id=f"wf-{outcome}",
        run_id="r1",
        workflow_type="OrderWorkflow",
        parent_workflow_ids=(),
        started_at=1_700_000_000_000_000,
        completed_at=1_700_000_001_000_000,
        outcome=outcome,
        revision=1,
        complete=True,
        missing_steps=0,
        expected_steps=steps,
        allow_count=steps - len(deny),
        deny_count=len(deny),
        receipt_ids=tuple(str(i) for i in range(steps)),
        steps=tuple(bodies),
        chain_root=b"\x01" * 32,
        extra=extra,
    ).signed_by(BUILDER)
    return decode_plain(envelope.framed()).record


def _events() -> dict[str, dict[str, Any]]:
    events = {
        "step allow": step_to_ocsf(_step(Verdict.ALLOW)),
        "step deny": step_to_ocsf(_step(Verdict.DENY)),
        "envelope without steps": envelope_to_ocsf(_envelope("success", 0, ())),
        "envelope unknown": envelope_to_ocsf(_envelope("unknown")),
    }
    for outcome in OUTCOMES:
        events[f"envelope {outcome}"] = envelope_to_ocsf(_envelope(outcome))
        events[f"envelope {outcome} all allowed"] = envelope_to_ocsf(_envelope(outcome, 2, ()))
    return events


EVENTS = _events()


@pytest.mark.parametrize("case", sorted(EVENTS))
def test_every_event_validates_against_the_ocsf_json_schema(case: str) -> None:
    event = EVENTS[case]
    assert event["metadata"]["version"] == OCSF_VERSION == "1.5.0"
    assert event["metadata"]["profiles"] == list(OCSF_PROFILES) == ["security_control"]
    assert ocsf_errors(event) == []


def test_src_endpoint_is_the_worker_and_actor_the_agent_for_the_workflow() -> None:
    step = EVENTS["step deny"]
    assert step["src_endpoint"] == {
        "name": "4242@worker-7.example.com",
        "hostname": "worker-7.example.com",
    }
    assert step["actor"]["user"] == {"name": "agent:test", "uid": "agent:test"}
    assert (step["actor"]["app_name"], step["actor"]["app_uid"]) == ("OrderWorkflow", "wf-s")
    assert step["actor"]["authorizations"] == [{"decision": "deny", "policy": {"uid": "cap-1"}}]
    assert is_deny(step)
    run = EVENTS["envelope failure"]
    assert run["src_endpoint"]["hostname"] == "worker-7.example.com"
    assert run["actor"]["user"]["name"] == "agent:test"
    assert (run["actor"]["app_name"], run["actor"]["app_uid"]) == ("OrderWorkflow", "wf-failure")
    empty = EVENTS["envelope without steps"]
    assert empty["src_endpoint"] == {"svc_name": "temporal", "name": "default"}
    assert "user" not in empty["actor"]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_run_status(outcome: str) -> None:
    event = EVENTS[f"envelope {outcome}"]
    expected = {"success": 1, "continued_as_new": 99}.get(outcome, 2)
    assert event["status_id"] == expected
    assert event["status_detail"].startswith(outcome)
    if outcome == "continued_as_new":
        assert event["status"] == "Continued As New"
        assert event["status_detail"] == "continued_as_new as run r2"


def _without(path: str) -> dict[str, Any]:
    event = copy.deepcopy(EVENTS["envelope success"])
    *parents, leaf = path.split(".")
    node = event
    for name in parents:
        node = node[name]
    del node[leaf]
    return event


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("src_endpoint", "'src_endpoint' is a required property"),
        ("actor", "'actor' is a required property"),
        ("api.operation", "api: 'operation' is a required property"),
        ("metadata.product", "metadata: 'product' is a required property"),
    ],
)
def test_the_validator_rejects_an_event_missing_a_required_attribute(path: str, error: str) -> None:
    assert error in " ".join(ocsf_errors(_without(path)))


def test_the_validator_rejects_wrong_types_enums_and_undeclared_profiles() -> None:
    event = copy.deepcopy(EVENTS["step allow"])
    event["status_id"] = 7  # not in the enum
    event["src_endpoint"]["port"] = "443"  # port_t is an integer
    event["actor"] = {"user": {"type": "x"}}  # user needs one of account, name, uid
    errors = " ".join(ocsf_errors(event))
    assert "status_id: 7 is not one of" in errors
    assert "src_endpoint/port: '443' is not of type 'integer'" in errors
    assert "actor/user" in errors
    # action & co. belong to security_control: without the profile declared they are rejected.
    undeclared = _without("metadata.profiles")
    assert "('action', 'action_id', 'disposition', 'disposition_id' were unexpected)" in " ".join(
        ocsf_errors(undeclared)
    )
    # The same event claiming 1.3.0, where API Activity has no security_control profile.
    older = copy.deepcopy(EVENTS["step deny"])
    older["metadata"]["version"] = "1.3.0"
    assert ocsf_errors(older)
