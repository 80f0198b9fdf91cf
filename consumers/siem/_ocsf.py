"""OCSF 1.5.0 API Activity (class_uid 6003) events for step receipts and envelopes (pure).

Every event declares the ``security_control`` profile in ``metadata.profiles``: it carries that
profile's ``action``/``action_id`` (the policy verdict) and ``disposition``/``disposition_id``.
``src_endpoint`` is the worker that ran the activity (Temporal's worker identity, by default
``pid@host``, whose host part becomes ``hostname``); ``actor`` is the agent (the capability's
subject) acting for the workflow (``app_name`` the workflow type, ``app_uid`` the workflow id).
Times are OCSF timestamps (milliseconds since the epoch); the receipt id is ``metadata.uid`` so
SIEMs can deduplicate. Nothing from activity arguments is present: receipts only carry a keyed
digest of them.

A step carrying a Chio kernel receipt (StepReceipt v2) also gets, in ``unmapped``, the receipt's
id (``chio_receipt_id``), its decision verdict and guard (``chio_decision``, ``chio_guard``), the
signing ``kernel_key`` and the ``policy_hash``, and the same as one OCSF ``enrichments`` entry
(name ``chio_receipt``, value the receipt id). The receipt's parameters (and their hash) are
never copied into an event. An envelope event lists its steps' Chio receipt ids and kernel keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from chio_receipts.schemas import ChioStepFields

__all__ = ["OCSF_PROFILES", "OCSF_VERSION", "envelope_to_ocsf", "is_deny", "step_to_ocsf"]

OCSF_VERSION = "1.5.0"
OCSF_PROFILES: tuple[str, ...] = ("security_control",)
_CLASS_UID = 6003
_CATEGORY_UID = 6
_ACTIVITY_OTHER = 99
_PRODUCT = {"name": "chio-receipts", "vendor_name": "chio"}

# status_id: 0 Unknown, 1 Success, 2 Failure, 99 Other (see ``status``).
_UNKNOWN, _SUCCESS, _FAILURE, _OTHER = 0, 1, 2, 99
# How a run closed (the envelope's ``outcome``) -> (status_id, status).
_RUN_STATUS: dict[str, tuple[int, str]] = {
    "success": (_SUCCESS, "Success"),
    "failure": (_FAILURE, "Failure"),
    "cancelled": (_FAILURE, "Failure"),
    "terminated": (_FAILURE, "Failure"),
    "timed_out": (_FAILURE, "Failure"),
    # Not a failure: the run handed its work on to a new run of the same workflow.
    "continued_as_new": (_OTHER, "Continued As New"),
}


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


def _metadata(uid: str, correlation_uid: str, log_name: str) -> dict[str, Any]:
    return {
        "uid": uid,
        "version": OCSF_VERSION,
        "profiles": list(OCSF_PROFILES),
        "product": _PRODUCT,
        "correlation_uid": correlation_uid,
        "log_name": log_name,
    }


def _worker_endpoint(identity: str) -> dict[str, Any]:
    """``src_endpoint`` for a Temporal worker identity (``pid@host`` unless the worker set one)."""
    endpoint: dict[str, Any] = {"name": identity or "unknown"}
    _, at, host = identity.rpartition("@")
    if at and host:
        endpoint["hostname"] = host
    return endpoint


def _actor(subject: str | None, workflow_type: str, workflow_id: str) -> dict[str, Any]:
    actor: dict[str, Any] = {"app_name": workflow_type or "workflow", "app_uid": workflow_id}
    if subject:
        actor["user"] = {"name": subject, "uid": subject}
    return actor


def is_deny(event: Mapping[str, Any]) -> bool:
    """True for an OCSF event this module made from a denial."""
    return event.get("action_id") == 2


def step_to_ocsf(record: dict[str, Any]) -> dict[str, Any]:
    """Map a plain step receipt record (ids as str, timestamps as int µs) to OCSF."""
    verdict = str(record["verdict"])
    allowed = verdict == "ALLOW"
    event = _base(str(record["action"]) or "invoke", int(record["evaluated_at"]) // 1000, allowed)
    actor = _actor(record["subject"], record["workflow_type"], record["workflow_id"])
    actor["session"] = {"uid": record["capability_id"]}
    actor["authorizations"] = [
        {"decision": "allow" if allowed else "deny", "policy": {"uid": record["capability_id"]}}
    ]
    event.update(
        {
            "status_id": _SUCCESS if allowed else _FAILURE,
            "status": "Success" if allowed else "Failure",
            "status_detail": record["reason"],
            "message": f"{verdict} {record['resource']}: {record['reason']}",
            "src_endpoint": _worker_endpoint(record["worker_identity"]),
            "actor": actor,
            "api": {
                "operation": record["activity_type"],
                "service": {"name": record["tool_server"]},
                "request": {"uid": record["receipt_id"]},
            },
            "resources": [
                {"name": record["tool"], "type": "tool", "uid": record["resource"]},
            ],
            "metadata": _metadata(
                record["receipt_id"],
                f"{record['workflow_id']}/{record['run_id']}",
                "chio.receipts.steps",
            ),
            "unmapped": {
                "namespace": record["namespace"],
                "workflow_id": record["workflow_id"],
                "run_id": record["run_id"],
                "workflow_type": record["workflow_type"],
                "task_queue": record["task_queue"],
                "activity_id": record["activity_id"],
                "attempt": record["attempt"],
                "verdict": verdict,
                "worker_identity": record["worker_identity"],
                "scope": list(record["scope"]),
                "capability_chain": list(record["capability_chain"]),
                "argument_digest": record["argument_digest"],
                "policy_latency_us": record["latency_us"],
                "key_id": record["key_id"],
            },
        }
    )
    chio = _chio(record)
    if chio is not None:
        event["unmapped"].update(
            {
                "chio_receipt_id": chio.receipt_id,
                "chio_decision": chio.decision,
                "chio_guard": chio.guard,
                "kernel_key": chio.kernel_key,
                "policy_hash": chio.policy_hash,
            }
        )
        event["enrichments"] = [
            {
                "name": "chio_receipt",
                "value": chio.receipt_id,
                "type": "chio_kernel_receipt",
                "provider": "chio",
                "data": {
                    "decision": chio.decision,
                    "guard": chio.guard,
                    "kernel_key": chio.kernel_key,
                    "policy_hash": chio.policy_hash,
                    "receipt_kind": chio.receipt_kind,
                    "trust_level": chio.trust_level,
                },
            }
        ]
    return event


def _chio(record: Mapping[str, Any]) -> ChioStepFields | None:
    """The Chio receipt's fields of a step (None for a v1 step or an unreadable receipt; the
    exporter refuses a step whose receipt does not check before mapping it)."""
    text = record.get("chio_receipt")
    if not text:
        return None
    try:
        receipt = json.loads(text)
    except ValueError:
        return None
    return ChioStepFields(receipt) if isinstance(receipt, dict) else None


def _distinct(steps: Sequence[Mapping[str, Any]], name: str) -> list[str]:
    return list(dict.fromkeys(str(s[name]) for s in steps if s.get(name)))


def envelope_to_ocsf(record: dict[str, Any]) -> dict[str, Any]:
    """Map a plain WorkflowReceipt record (timestamps as int µs) to one OCSF event per run.

    ``src_endpoint`` and ``actor.user`` come from the run's first step (steps are in receipt-id,
    i.e. time, order); every distinct worker and subject is listed in ``unmapped``. A run without
    steps has the Temporal service as its source and the workflow alone as its actor.
    """
    meta = dict(record["metadata"])
    steps: list[Mapping[str, Any]] = list(record.get("steps") or ())
    workers, subjects = _distinct(steps, "worker_identity"), _distinct(steps, "subject")
    chio_steps = [c for c in map(_chio, steps) if c is not None]
    allowed = int(record["deny_count"]) == 0
    time_us = record["completed_at"] if record["completed_at"] is not None else record["started_at"]
    run = f"{record['workflow_id']}/{record['run_id']}"
    outcome = str(record["outcome"]).lower()
    status_id, status = _RUN_STATUS.get(outcome, (_UNKNOWN, "Unknown"))
    detail = outcome
    if outcome == "continued_as_new" and meta.get("continued_as_new_run_id"):
        detail = f"continued_as_new as run {meta['continued_as_new_run_id']}"
    source: dict[str, Any] = _worker_endpoint(workers[0]) if workers else {"svc_name": "temporal"}
    if not workers and meta.get("namespace"):
        source["name"] = meta["namespace"]
    event = _base("workflow_run", int(time_us) // 1000, allowed)
    event.update(
        {
            "status_id": status_id,
            "status": status,
            "status_detail": detail,
            "message": (
                f"run {outcome}: {record['step_count']} steps, {record['deny_count']} denied"
            ),
            "src_endpoint": source,
            "actor": _actor(
                subjects[0] if subjects else None,
                meta.get("workflow_type", ""),
                str(record["workflow_id"]),
            ),
            "api": {
                "operation": meta.get("workflow_type", "") or "workflow_run",
                "service": {"name": "temporal"},
                "request": {"uid": run},
            },
            "resources": [{"name": record["workflow_id"], "type": "workflow_run", "uid": run}],
            "metadata": _metadata(
                f"{run}/{meta.get('revision', '1')}", run, "chio.receipts.envelopes"
            ),
            "unmapped": {
                "namespace": meta.get("namespace"),
                "outcome": outcome,
                "step_count": record["step_count"],
                "allow_count": record["allow_count"],
                "deny_count": record["deny_count"],
                "worker_identities": workers,
                "subjects": subjects,
                "complete": meta.get("complete"),
                "missing_steps": meta.get("missing_steps"),
                "chain_root": meta.get("chain_root"),
                "revision": meta.get("revision"),
                "continued_as_new_run_id": meta.get("continued_as_new_run_id"),
                "chio_receipt_ids": [c.receipt_id for c in chio_steps],
                "kernel_keys": list(dict.fromkeys(c.kernel_key for c in chio_steps)),
            },
        }
    )
    return event
