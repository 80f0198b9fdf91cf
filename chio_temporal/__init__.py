"""``chio_temporal``: the seed's import path for the Temporal activity interceptor.

A thin facade over :mod:`chio_receipts.interceptor`, re-exporting exactly the seed's public
surface::

    from chio_sdk import ChioClient
    from chio_temporal import ChioActivityInterceptor, WorkflowGrant, build_chio_worker

``chio_client=`` takes the seed's ``chio_sdk.ChioClient`` (or the project's own client);
``WorkflowGrant.token`` takes what ``ChioClient.create_capability`` returns; ``scope_for``
builds the ``chio_sdk.models.ChioScope`` of a list of activity types. Everything else
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
    "scope_for",
]
