"""Hypothesis strategies derived from the Avro schemas themselves (every schema, every field)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

import chio_receipts.schemas as schemas

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _names() -> dict[str, Any]:
    names: dict[str, Any] = {}

    def collect(node: Any, ns: str) -> None:
        if isinstance(node, dict):
            t = node.get("type")
            if t in ("record", "enum", "fixed"):
                full = (
                    node["name"]
                    if "." in node["name"]
                    else f"{node.get('namespace', ns)}.{node['name']}"
                )
                names[full] = node
                ns = full.rpartition(".")[0]
            for f in node.get("fields", []):
                collect(f["type"], ns)
            for k in ("items", "values"):
                if k in node:
                    collect(node[k], ns)
            if isinstance(t, dict | list):
                collect(t, ns)
        elif isinstance(node, list):
            for b in node:
                collect(b, ns)

    for name in schemas.SCHEMA_FILES:
        collect(schemas.raw_schema(name), "")
    return names


NAMES = _names()


def strategy(node: Any, ns: str = "dev.chio.receipts.v1", depth: int = 0) -> st.SearchStrategy[Any]:
    """Values that conform to schema ``node``."""
    if isinstance(node, list):
        return st.one_of([strategy(b, ns, depth) for b in node])
    if isinstance(node, str):
        prim = {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(-(2**31), 2**31 - 1),
            "long": st.integers(-(2**63), 2**63 - 1),
            "float": st.floats(width=32, allow_nan=False),
            "double": st.floats(allow_nan=False),
            "bytes": st.binary(max_size=80),
            "string": st.text(max_size=20),
        }
        if node in prim:
            return prim[node]
        full = node if "." in node else f"{ns}.{node}"
        return strategy(NAMES[full], ns, depth)
    t = node["type"]
    logical = node.get("logicalType")
    if logical == "uuid":
        return st.uuids().map(str)
    if logical == "timestamp-micros":
        return st.integers(0, 253402300799999999)
    if isinstance(t, dict | list):
        return strategy(t, ns, depth)
    if t == "record":
        full = (
            node["name"] if "." in node["name"] else f"{node.get('namespace', ns)}.{node['name']}"
        )
        rns = full.rpartition(".")[0]
        return st.fixed_dictionaries(
            {f["name"]: strategy(f["type"], rns, depth + 1) for f in node["fields"]}
        )
    if t == "enum":
        return st.sampled_from(node["symbols"])
    if t == "array":
        return st.lists(strategy(node["items"], ns, depth + 1), max_size=2 if depth else 3)
    if t == "map":
        return st.dictionaries(
            st.text(max_size=8), strategy(node["values"], ns, depth + 1), max_size=3
        )
    return strategy(t, ns, depth)


def normalize(value: Any) -> Any:
    """Logical-type values as the writer gave them: datetimes -> micros, UUIDs -> str."""
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, datetime):
        return (value - _EPOCH) // (datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - _EPOCH)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def sample_step(**overrides: Any) -> schemas.StepReceipt:
    """A realistic step receipt (unsigned)."""
    fields: dict[str, Any] = {
        "receipt_id": str(uuid.uuid4()),
        "namespace": "default",
        "workflow_id": "order-42",
        "run_id": "0b7c1d9e-4f44-4b8e-a0a3-4c1e4c7a2d11",
        "workflow_type": "OrderWorkflow",
        "task_queue": "orders",
        "activity_id": "3",
        "activity_type": "charge_card",
        "attempt": 1,
        "is_local": False,
        "tool_server": "payments",
        "tool": "charge_card",
        "action": "invoke",
        "resource": "payments/charge_card",
        "subject": "agent:checkout",
        "capability_id": "cap-7f3a9c",
        "capability_chain": ("cap-root",),
        "scope": ("charge_card", "refund"),
        "verdict": schemas.Verdict.ALLOW,
        "reason": "in scope",
        "argument_digest": "ab" * 32,
        "argument_key_id": "hmac-1",
        "scheduled_at": 1_763_000_000_000_000,
        "started_at": 1_763_000_000_100_000,
        "evaluated_at": 1_763_000_000_100_200,
        "latency_us": 200,
        "worker_identity": "worker-1@host",
    }
    fields.update(overrides)
    return schemas.StepReceipt(**fields)


def sample_run(**overrides: Any) -> schemas.RunCompletion:
    """A realistic run-completion event."""
    fields: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "namespace": "default",
        "workflow_id": "order-42",
        "run_id": "0b7c1d9e-4f44-4b8e-a0a3-4c1e4c7a2d11",
        "workflow_type": "OrderWorkflow",
        "task_queue": "orders",
        "outcome": schemas.Outcome.SUCCESS,
        "started_at": 1_763_000_000_000_000,
        "closed_at": 1_763_000_001_000_000,
        "parent_workflow_ids": ("parent-1",),
        "parent_run_id": "p-run",
        "expected_steps": 4,
        "source": schemas.CompletionSource.WATCHER,
        "emitted_at": 1_763_000_001_500_000,
    }
    fields.update(overrides)
    return schemas.RunCompletion(**fields)


def sample_envelope(step: schemas.StepReceipt, **overrides: Any) -> dict[str, Any]:
    """A one-step, allowed ``WorkflowReceipt`` record (the dict fastavro encodes) for ``step``."""
    record: dict[str, Any] = {
        "version": schemas.ENVELOPE_VERSION,
        "workflow_id": step.workflow_id,
        "run_id": step.run_id,
        "parent_workflow_ids": [],
        "started_at": 1,
        "completed_at": 2,
        "outcome": "success",
        "step_count": 1,
        "allow_count": 1,
        "deny_count": 0,
        "steps": [step.to_avro()],
        "metadata": {"namespace": "default", "revision": "1"},
        "outcomes": [],
        "attempts": [],
    }
    record.update(overrides)
    return record
