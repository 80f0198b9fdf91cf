"""``chio_temporal``: the seed's import path for the Temporal activity interceptor.

A thin facade over :mod:`chio_receipts.interceptor`, re-exporting the seed's public surface
(and its roadmap's ``reverse_budget_charge``)::

    from chio_sdk import ChioClient
    from chio_temporal import ChioActivityInterceptor, WorkflowGrant, build_chio_worker

``chio_client=`` takes the seed's ``chio_sdk.ChioClient`` (or the project's own client);
``WorkflowGrant.token`` takes what ``ChioClient.create_capability`` returns; ``scope_for``
builds the ``chio_sdk.models.ChioScope`` of a list of activity types. ``reverse_budget_charge``
is the seed roadmap's activity for saga compensation: it refunds the budget charge of a
decision (``current_receipt_id()`` in the charged activity) exactly once. Everything else
(sidecars, receipt sinks, the evaluator protocol) is imported from ``chio_receipts``.
"""

from __future__ import annotations

from chio_receipts.interceptor import (
    DENIED_ERROR_TYPE,
    ActivityGrantOverride,
    ChioActivityInterceptor,
    ChioTemporalConfigError,
    ChioTemporalError,
    WorkflowGrant,
    WorkflowReceipt,
    WorkflowStepReceipt,
    build_chio_worker,
    current_receipt_id,
    reverse_budget_charge,
    scope_for,
)

__all__ = [
    "DENIED_ERROR_TYPE",
    "ActivityGrantOverride",
    "ChioActivityInterceptor",
    "ChioTemporalConfigError",
    "ChioTemporalError",
    "WorkflowGrant",
    "WorkflowReceipt",
    "WorkflowStepReceipt",
    "build_chio_worker",
    "current_receipt_id",
    "reverse_budget_charge",
    "scope_for",
]
