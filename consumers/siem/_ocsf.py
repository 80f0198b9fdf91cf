"""OCSF 1.x API Activity (class_uid 6003) events for step receipts and envelopes (pure).

Times are OCSF timestamps (milliseconds since the epoch); the receipt id is ``metadata.uid`` so
SIEMs can deduplicate. Nothing from activity arguments is present: receipts only carry a keyed
digest of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["OCSF_VERSION", "envelope_to_ocsf", "is_deny", "step_to_ocsf"]

OCSF_VERSION = "1.3.0"
_CLASS_UID = 6003
_CATEGORY_UID = 6
_ACTIVITY_OTHER = 99
_PRODUCT = {"name": "chio-receipts", "vendor_name": "chio"}


def _base(activity_name: str, time_ms: int, allowed: bool) -> dict[str, Any]:
    return {
        "class_uid": _CLASS_UID,
        "class_name": "API Activity",
        "category_uid": _CATEGORY_UID,
        "category_name": "Application Activity",
        "activity_id": _ACTIVITY_OTHER,
        "activity_name": activity_name,
        "type_uid": _CLASS_UID * 100 + _ACTIVITY_OTHER,
        "type_name": f"API Activity: {activity_name}",
        "time": time_ms,
        "action_id": 1 if allowed else 2,
        "action": "Allowed" if allowed else "Denied",
        "disposition_id": 1 if allowed else 2,
        "disposition": "Allowed" if allowed else "Blocked",
        "severity_id": 1 if allowed else 3,
        "severity": "Informational" if allowed else "Medium",
    }


def is_deny(event: Mapping[str, Any]) -> bool:
    """True for an OCSF event this module made from a denial."""
    return event.get("action_id") == 2


def step_to_ocsf(record: dict[str, Any]) -> dict[str, Any]:
    """Map a plain step receipt record (ids as str, timestamps as int µs) to OCSF."""
    verdict = str(record["verdict"])
    allowed = verdict == "ALLOW"
    event = _base(str(record["action"]) or "invoke", int(record["evaluated_at"]) // 1000, allowed)
    event.update(
        {
            "status_id": 1 if allowed else 2,
            "status": "Success" if allowed else "Failure",
            "status_detail": record["reason"],
            "message": f"{verdict} {record['resource']}: {record['reason']}",
            "actor": {
                "user": {"name": record["subject"], "uid": record["subject"]},
                "app_name": record["worker_identity"],
                "session": {"uid": record["capability_id"]},
            },
            "api": {
                "operation": record["activity_type"],
                "service": {"name": record["tool_server"]},
                "request": {"uid": record["receipt_id"]},
            },
            "resources": [
                {"name": record["tool"], "type": "tool", "uid": record["resource"]},
            ],
            "metadata": {
                "uid": record["receipt_id"],
                "version": OCSF_VERSION,
                "product": _PRODUCT,
                "correlation_uid": f"{record['workflow_id']}/{record['run_id']}",
                "log_name": "chio.receipts.steps",
            },
            "unmapped": {
                "namespace": record["namespace"],
                "workflow_id": record["workflow_id"],
                "run_id": record["run_id"],
                "workflow_type": record["workflow_type"],
                "task_queue": record["task_queue"],
                "activity_id": record["activity_id"],
                "attempt": record["attempt"],
                "verdict": verdict,
                "scope": list(record["scope"]),
                "capability_chain": list(record["capability_chain"]),
                "argument_digest": record["argument_digest"],
                "policy_latency_us": record["latency_us"],
                "key_id": record["key_id"],
            },
        }
    )
    return event


def envelope_to_ocsf(record: dict[str, Any]) -> dict[str, Any]:
    """Map a plain WorkflowReceipt record (timestamps as int µs) to one OCSF event per run."""
    meta = dict(record["metadata"])
    allowed = int(record["deny_count"]) == 0
    time_us = record["completed_at"] if record["completed_at"] is not None else record["started_at"]
    uid = f"{record['workflow_id']}/{record['run_id']}/{meta.get('revision', '1')}"
    event = _base("workflow_run", int(time_us) // 1000, allowed)
    event.update(
        {
            "status_id": 1 if record["outcome"] == "success" else 2,
            "status": "Success" if record["outcome"] == "success" else "Failure",
            "message": (
                f"run {record['outcome']}: {record['step_count']} steps, "
                f"{record['deny_count']} denied"
            ),
            "api": {
                "operation": meta.get("workflow_type", ""),
                "service": {"name": "temporal"},
                "request": {"uid": f"{record['workflow_id']}/{record['run_id']}"},
            },
            "resources": [{"name": record["workflow_id"], "type": "workflow_run"}],
            "metadata": {
                "uid": uid,
                "version": OCSF_VERSION,
                "product": _PRODUCT,
                "correlation_uid": f"{record['workflow_id']}/{record['run_id']}",
                "log_name": "chio.receipts.envelopes",
            },
            "unmapped": {
                "step_count": record["step_count"],
                "allow_count": record["allow_count"],
                "deny_count": record["deny_count"],
                "complete": meta.get("complete"),
                "missing_steps": meta.get("missing_steps"),
                "chain_root": meta.get("chain_root"),
                "revision": meta.get("revision"),
            },
        }
    )
    return event
