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

Outcomes (``StepOutcome``, on the steps topic) are events of their own (:func:`outcome_to_ocsf`,
``metadata.log_name`` ``chio.receipts.outcomes``, ``metadata.uid`` the outcome id): a decision is
exported when it is made, before its call has ended, so its event cannot wait for the outcome.
The outcome event names its decision in ``api.request.uid`` (the decision event's own
``api.request.uid``), and carries how the call ended where OCSF has a place for it:
``status_id``/``status`` (COMPLETED is Success, FAILED, CANCELLED, TIMED_OUT and GATE_FAILED are
Failure, UNKNOWN is Unknown), ``status_code`` the StepStatus symbol, ``status_detail`` the status
and error type, ``api.response.error`` the error type (never the message), ``start_time``,
``end_time`` and ``duration`` (milliseconds; the exact ``duration_us`` is in ``unmapped``). The
keyed result digest and its key id have no OCSF attribute: they are in ``unmapped``. An outcome
that follows an allow keeps ``action`` Allowed (the control allowed the call; ``status`` says how
it went). A GATE_FAILED outcome (the gate refused the attempt before any decision: sidecar
unreachable, sink refused) is ``action`` Denied with ``disposition`` Error (27), not Blocked: the
call did not run, but no policy refused it.

Trace context: an event whose step or outcome carries an OpenTelemetry trace id declares OCSF's
``trace`` profile too and has ``trace.uid`` the trace id. An outcome's span covers its attempt, so
it is ``trace.span`` (uid, start and end time, duration, operation the activity type,
``status_code`` the status); a decision is made inside that span before it ends, so a decision
event keeps the span id in ``unmapped.span_id``. ``metadata.correlation_uid`` stays the run
(``workflow_id/run_id``) on every event.

An envelope's run event carries, in ``unmapped``, its outcome records counted by status, its
attempt accounts counted by account, and ``attempt_outcomes``: one entry per attempt Temporal
started, joining its account, its decision (receipt id, verdict) and its outcome (status, error
type, duration, result digest) by (activity_id, attempt). Every account that is not RECEIPTED
(GATE_FAILED, WORKER_LOST, MISSING, UNKNOWN) is also an event of its own (:func:`attempt_events`,
``log_name`` ``chio.receipts.attempts``, ``uid`` ``workflow_id/run_id/revision/activity_id/
attempt``): a gate failure is Denied/Error/Failure with ``status_detail`` its reason; a worker lost
and an unknown account are Unknown (the decision's own verdict when the envelope has one); a
MISSING attempt, a receipt that should exist and does not, is ``action`` Unknown, ``status``
Failure, severity High, so a SIEM can alert on a real gap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from chio_receipts.schemas import ChioStepFields

__all__ = [
    "OCSF_PROFILES",
    "OCSF_VERSION",
    "attempt_events",
    "envelope_to_ocsf",
    "is_deny",
    "is_gap",
    "outcome_to_ocsf",
    "step_to_ocsf",
]

OCSF_VERSION = "1.5.0"
OCSF_PROFILES: tuple[str, ...] = ("security_control",)
TRACE_PROFILE = "trace"
"""Declared besides :data:`OCSF_PROFILES` by events that carry a trace id."""
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


# security_control: action_id, disposition_id (27 Error: the request could not be processed).
_ACTIONS = {0: "Unknown", 1: "Allowed", 2: "Denied"}
_DISPOSITIONS = {0: "Unknown", 1: "Allowed", 2: "Blocked", 27: "Error"}
_SEVERITIES = {1: "Informational", 2: "Low", 3: "Medium", 4: "High"}
# How an attempt ended (StepStatus symbol) -> (status_id, status).
_STEP_STATUS: dict[str, tuple[int, str]] = {
    "COMPLETED": (_SUCCESS, "Success"),
    "FAILED": (_FAILURE, "Failure"),
    "CANCELLED": (_FAILURE, "Failure"),
    "TIMED_OUT": (_FAILURE, "Failure"),
    "GATE_FAILED": (_FAILURE, "Failure"),
}
_MISSING = "MISSING"
_RECEIPTED = "RECEIPTED"


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


def _control(event: dict[str, Any], action_id: int, disposition_id: int, severity_id: int) -> None:
    """Set the security_control attributes and the severity of ``event``."""
    event["action_id"], event["action"] = action_id, _ACTIONS[action_id]
    event["disposition_id"], event["disposition"] = disposition_id, _DISPOSITIONS[disposition_id]
    event["severity_id"], event["severity"] = severity_id, _SEVERITIES[severity_id]


def _trace(event: dict[str, Any], trace_id: str, span: Mapping[str, Any] | None = None) -> None:
    """Attach the trace context (and declare the ``trace`` profile) when there is a trace id."""
    if not trace_id:
        return
    trace: dict[str, Any] = {"uid": trace_id}
    if span is not None:
        trace["span"] = dict(span)
    event["trace"] = trace
    event["metadata"]["profiles"] = [*OCSF_PROFILES, TRACE_PROFILE]


def _ms(micros: int) -> int:
    return int(micros) // 1000


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


def is_gap(event: Mapping[str, Any]) -> bool:
    """True for an event this module made from a real gap: an attempt Temporal started whose
    receipt does not exist (account MISSING)."""
    metadata = event.get("metadata") or {}
    unmapped = event.get("unmapped") or {}
    return bool(
        metadata.get("log_name") == "chio.receipts.attempts" and unmapped.get("account") == _MISSING
    )


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
    trace_id = str(record.get("trace_id") or "")
    _trace(event, trace_id)
    if record.get("span_id"):
        event["unmapped"]["span_id"] = record["span_id"]
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


def _status_detail(status: str, error_type: str) -> str:
    detail = status.lower()
    return f"{detail}: {error_type}" if error_type else detail


def outcome_to_ocsf(record: dict[str, Any]) -> dict[str, Any]:
    """Map a plain StepOutcome record (timestamps as int µs) to OCSF: how the attempt's call
    ended, linked to its decision (see the module docstring)."""
    status = str(record["status"])
    error_type = str(record.get("error_type") or "")
    gate_failed = status == "GATE_FAILED"
    status_id, status_name = _STEP_STATUS.get(status, (_UNKNOWN, "Unknown"))
    event = _base("outcome", _ms(record["ended_at"]), not gate_failed)
    if gate_failed:
        _control(event, 2, 27, 3)
    elif status_id == _FAILURE:
        _control(event, 1, 1, 2)
    actor = _actor(None, record["workflow_type"], record["workflow_id"])
    if record.get("capability_id"):
        actor["session"] = {"uid": record["capability_id"]}
    api: dict[str, Any] = {
        "operation": record["activity_type"],
        "service": {"name": record["tool_server"]},
        # The decision this outcome follows; a gate failure has none: the outcome itself.
        "request": {"uid": record["decision_receipt_id"] or record["outcome_id"]},
    }
    if error_type:
        api["response"] = {"error": error_type}
    run = f"{record['workflow_id']}/{record['run_id']}"
    duration_us = int(record["duration_us"])
    event.update(
        {
            "status_id": status_id,
            "status": status_name,
            "status_code": status,
            "status_detail": _status_detail(status, error_type),
            "message": (
                f"{status} {record['tool_server']}/{record['tool']} "
                f"attempt {record['attempt']} after {duration_us} µs"
            ),
            "start_time": _ms(record["started_at"]),
            "end_time": _ms(record["ended_at"]),
            "duration": duration_us // 1000,
            "src_endpoint": _worker_endpoint(str(record["worker_identity"])),
            "actor": actor,
            "api": api,
            "resources": [{"name": record["tool"], "type": "tool"}],
            "metadata": _metadata(str(record["outcome_id"]), run, "chio.receipts.outcomes"),
            "unmapped": {
                "namespace": record["namespace"],
                "workflow_id": record["workflow_id"],
                "run_id": record["run_id"],
                "workflow_type": record["workflow_type"],
                "task_queue": record["task_queue"],
                "activity_id": record["activity_id"],
                "attempt": record["attempt"],
                "is_local": record["is_local"],
                "outcome_status": status,
                "error_type": error_type,
                "duration_us": duration_us,
                "result_digest": record.get("result_digest") or "",
                "result_key_id": record.get("result_key_id") or "",
                "decision_receipt_id": record["decision_receipt_id"],
                "decision_chio_id": record.get("decision_chio_id") or "",
                "worker_identity": record["worker_identity"],
                "signed": bool(record.get("chio_receipt")),
            },
        }
    )
    trace_id = str(record.get("trace_id") or "")
    span_id = str(record.get("span_id") or "")
    span = None
    if span_id:
        span = {
            "uid": span_id,
            "operation": record["activity_type"],
            "start_time": event["start_time"],
            "end_time": event["end_time"],
            "duration": event["duration"],
            "status_code": status,
        }
    _trace(event, trace_id, span)
    if span_id and not trace_id:
        event["unmapped"]["span_id"] = span_id
    receipt = _receipt(record)
    if receipt:
        event["unmapped"]["chio_receipt_id"] = str(receipt.get("id") or "")
        event["unmapped"]["kernel_key"] = str(receipt.get("kernel_key") or "")
        event["enrichments"] = [
            {
                "name": "chio_receipt",
                "value": str(receipt.get("id") or ""),
                "type": "chio_kernel_receipt",
                "provider": "chio",
                "data": {
                    "receipt_kind": str(receipt.get("receipt_kind") or ""),
                    "kernel_key": str(receipt.get("kernel_key") or ""),
                    "decision_chio_id": record.get("decision_chio_id") or "",
                },
            }
        ]
    return event


def _receipt(record: Mapping[str, Any]) -> dict[str, Any] | None:
    text = record.get("chio_receipt")
    if not text:
        return None
    try:
        receipt = json.loads(text)
    except ValueError:
        return None
    return receipt if isinstance(receipt, dict) else None


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
                "trace_ids": _distinct(steps, "trace_id"),
                "outcomes": _counts(record.get("outcomes") or (), "status"),
                "attempts": _counts(record.get("attempts") or (), "account"),
                "attempt_outcomes": _attempt_outcomes(record),
            },
        }
    )
    return event


def _counts(items: Sequence[Mapping[str, Any]], name: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[str(item[name])] = counts.get(str(item[name]), 0) + 1
    return dict(sorted(counts.items()))


def _key(item: Mapping[str, Any]) -> tuple[str, int]:
    return (str(item["activity_id"]), int(item["attempt"]))


def _by_attempt(items: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], Mapping[str, Any]]:
    """The last item of each (activity_id, attempt) (items come in that order)."""
    return {_key(item): item for item in items}


def _attempt_outcomes(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per attempt of the envelope: its account, decision and outcome joined by
    (activity_id, attempt), in that order. Attempts come from the accounts, and from the steps
    and outcomes of an envelope written without accounts."""
    steps = _by_attempt(list(record.get("steps") or ()))
    outcomes = _by_attempt(list(record.get("outcomes") or ()))
    accounts = _by_attempt(list(record.get("attempts") or ()))
    joined: list[dict[str, Any]] = []
    for key in sorted(set(steps) | set(outcomes) | set(accounts)):
        step, outcome, account = steps.get(key), outcomes.get(key), accounts.get(key)
        entry: dict[str, Any] = {"activity_id": key[0], "attempt": key[1]}
        if account is not None:
            entry["account"] = str(account["account"])
            if account.get("reason"):
                entry["reason"] = account["reason"]
        if step is not None:
            entry["receipt_id"] = str(step["receipt_id"])
            entry["verdict"] = str(step["verdict"])
        if outcome is not None:
            entry["status"] = str(outcome["status"])
            entry["error_type"] = outcome.get("error_type") or ""
            entry["duration_us"] = int(outcome["duration_us"])
            entry["result_digest"] = outcome.get("result_digest") or ""
            entry["outcome_id"] = str(outcome["outcome_id"])
        elif account is not None and str(account.get("outcome") or "UNKNOWN") != "UNKNOWN":
            entry["status"] = str(account["outcome"])
        joined.append(entry)
    return joined


def attempt_events(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One OCSF event per attempt account of an envelope record that is not RECEIPTED: gate
    failures, workers lost, real gaps (MISSING) and unknown accounts (see the module
    docstring). Empty for an envelope whose every attempt has its receipts."""
    meta = dict(record["metadata"])
    steps = _by_attempt(list(record.get("steps") or ()))
    outcomes = _by_attempt(list(record.get("outcomes") or ()))
    run = f"{record['workflow_id']}/{record['run_id']}"
    revision = meta.get("revision", "1")
    time_us = record["completed_at"] if record["completed_at"] is not None else record["started_at"]
    events: list[dict[str, Any]] = []
    for account in record.get("attempts") or ():
        state = str(account["account"])
        if state == _RECEIPTED:
            continue
        key = _key(account)
        step, outcome = steps.get(key), outcomes.get(key)
        reason = str(account.get("reason") or "")
        event = _base("attempt", _ms(time_us), True)
        if state == "GATE_FAILED":
            _control(event, 2, 27, 3)
            status_id, status = _FAILURE, "Failure"
        elif state == _MISSING:
            _control(event, 0, 0, 4)
            status_id, status = _FAILURE, "Failure"
        else:  # WORKER_LOST, UNKNOWN: the call's end is not known
            allowed = step is None or str(step["verdict"]) == "ALLOW"
            if step is None:
                _control(event, 0, 0, 2)
            else:
                _control(event, 1 if allowed else 2, 1 if allowed else 2, 2)
            status_id, status = _UNKNOWN, "Unknown"
        source = step or outcome
        worker = str(source["worker_identity"]) if source is not None else ""
        src: dict[str, Any] = _worker_endpoint(worker) if worker else {"svc_name": "temporal"}
        if not worker and meta.get("namespace"):
            src["name"] = meta["namespace"]
        subject = str(step["subject"]) if step is not None and step.get("subject") else None
        tool_server = str(source["tool_server"]) if source is not None else ""
        tool = str(source["tool"]) if source is not None else ""
        attempt_uid = f"{run}/{key[0]}/{key[1]}"
        event.update(
            {
                "status_id": status_id,
                "status": status,
                "status_code": state,
                "status_detail": _status_detail(state, reason),
                "message": (
                    f"attempt {key[1]} of {account['activity_type']} ({key[0]}): "
                    f"{state.lower()}{': ' + reason if reason else ''}"
                ),
                "src_endpoint": src,
                "actor": _actor(subject, meta.get("workflow_type", ""), str(record["workflow_id"])),
                "api": {
                    "operation": str(account["activity_type"]),
                    "service": {"name": tool_server or "temporal"},
                    "request": {
                        "uid": str(step["receipt_id"]) if step is not None else attempt_uid
                    },
                },
                "resources": [{"name": tool or str(account["activity_type"]), "type": "tool"}],
                "metadata": _metadata(
                    f"{run}/{revision}/{key[0]}/{key[1]}", run, "chio.receipts.attempts"
                ),
                "unmapped": {
                    "namespace": meta.get("namespace"),
                    "workflow_id": record["workflow_id"],
                    "run_id": record["run_id"],
                    "activity_id": key[0],
                    "attempt": key[1],
                    "is_local": account["is_local"],
                    "account": state,
                    "reason": reason,
                    "outcome_status": str(account.get("outcome") or "UNKNOWN"),
                    "revision": revision,
                    "complete": meta.get("complete"),
                },
            }
        )
        trace_id = str(source.get("trace_id") or "") if source is not None else ""
        _trace(event, trace_id)
        events.append(event)
    return events
