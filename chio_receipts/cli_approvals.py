"""``chio-receipts approve|reject WORKFLOW_ID --receipt RECEIPT_ID [--reason ...]``.

Answers a pending approval through the sidecar's ``POST /approvals/{id}/respond`` (the
credential given, ``--sidecar-token`` / ``CHIO_SIDECAR_TOKEN``, names the approver; the sidecar
signs the decision) and sends the signed decision to the waiting workflow as the
``chio_approval`` Temporal signal. The sidecar signals the workflow itself when it was started
with a Temporal address; a second signal for the same approval is ignored by the workflow, so
both paths may run.

``RECEIPT_ID`` is the held attempt's receipt id (the step's ``receipt_id`` or its Chio receipt
id, as ``verify`` and the report print them) or the approval id.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from chio_receipts._temporal import TemporalConnection
from chio_receipts._temporal_options import temporal_options
from chio_receipts.schemas import APPROVAL_SIGNAL

__all__ = ["ApprovalAnswer", "ApprovalError", "answer_approval", "register"]

console = Console()
err = Console(stderr=True)


class ApprovalError(Exception):
    """The approval could not be answered (not found, already answered, refused)."""


@dataclass(frozen=True, slots=True)
class ApprovalAnswer:
    """What answering an approval did."""

    approval_id: str
    outcome: str
    approver: str
    receipt_id: str
    workflow_id: str
    run_id: str
    signalled_by_sidecar: bool
    signalled: bool


async def _find(http: httpx.AsyncClient, workflow_id: str, receipt_id: str) -> str:
    answer = await http.get("/approvals/pending", params={"receipt_id": receipt_id})
    if answer.status_code != 200:
        raise ApprovalError(_why(answer))
    # A request made on the kernel's own routes has no workflow: its receipt alone names it.
    found = [
        a
        for a in answer.json().get("approvals", [])
        if a.get("workflow", {}).get("workflow_id") in (workflow_id, "")
    ]
    if not found:
        raise ApprovalError(
            f"no pending approval for receipt {receipt_id} of workflow {workflow_id}"
        )
    return str(found[0]["approval_id"])


def _why(answer: httpx.Response) -> str:
    try:
        body = answer.json()
        message = body.get("message") or body.get("reason") or body.get("error")
    except ValueError:
        message = answer.text[:200]
    return f"the sidecar answered {answer.status_code}: {message}"


async def answer_approval(
    *,
    sidecar_url: str,
    credential: str | None,
    workflow_id: str,
    receipt_id: str,
    approve: bool,
    reason: str = "",
    temporal: TemporalConnection | None = None,
    temporal_client: Any = None,
) -> ApprovalAnswer:
    """Answer the pending approval of ``receipt_id`` in ``workflow_id`` and signal the workflow
    (with ``temporal_client``, else a client of ``temporal``; neither: the sidecar's own signal
    is the only one)."""
    headers = {"authorization": f"Bearer {credential}"} if credential else {}
    async with httpx.AsyncClient(base_url=sidecar_url, headers=headers, timeout=10) as http:
        approval_id = await _find(http, workflow_id, receipt_id)
        body: dict[str, Any] = {"outcome": "approved" if approve else "denied"}
        if reason:
            body["reason"] = reason
        answer = await http.post(f"/approvals/{approval_id}/respond", json=body)
        if answer.status_code != 200:
            raise ApprovalError(_why(answer))
        answered = answer.json()
    payload = {
        "approval_id": answered["approval_id"],
        "outcome": answered["outcome"],
        "approver": answered["approver"],
        "reason": reason,
        "receipt": answered["receipt"],
    }
    signalled = False
    client = temporal_client
    if client is None and temporal is not None:
        client = await temporal.connect()
    if client is not None:
        handle = client.get_workflow_handle(workflow_id, run_id=answered.get("run_id") or None)
        await handle.signal(APPROVAL_SIGNAL, payload)
        signalled = True
    return ApprovalAnswer(
        approval_id=str(answered["approval_id"]),
        outcome=str(answered["outcome"]),
        approver=str(answered["approver"]),
        receipt_id=str(answered["receipt"].get("id", "")),
        workflow_id=workflow_id,
        run_id=str(answered.get("run_id", "")),
        signalled_by_sidecar=bool(answered.get("signalled")),
        signalled=signalled,
    )


SidecarUrl = Annotated[str, typer.Option(envvar="CHIO_SIDECAR_URL", help="Policy sidecar URL.")]
Credential = Annotated[
    str | None,
    typer.Option(
        "--sidecar-token",
        "--credential",
        envvar="CHIO_SIDECAR_TOKEN",
        help="The operator credential's secret, sent as 'Authorization: Bearer' "
        "(CHIO_SIDECAR_TOKEN); the credential's name is recorded as the approver.",
        show_default=False,
    ),
]
Receipt = Annotated[
    str,
    typer.Option(
        "--receipt", help="The held attempt's receipt id (step or Chio receipt id) or approval id."
    ),
]
Reason = Annotated[str, typer.Option(help="Why (recorded in the signed decision).")]


def _run(
    approve: bool,
    workflow_id: str,
    receipt: str,
    reason: str,
    sidecar_url: str,
    credential: str | None,
    temporal: TemporalConnection,
) -> None:
    try:
        done = asyncio.run(
            answer_approval(
                sidecar_url=sidecar_url,
                credential=credential,
                workflow_id=workflow_id,
                receipt_id=receipt,
                approve=approve,
                reason=reason,
                temporal=temporal,
            )
        )
    except (ApprovalError, httpx.HTTPError) as exc:
        err.print(f"error: {exc}")
        raise typer.Exit(1) from None
    console.print(
        f"{done.outcome} {done.approval_id} (workflow {done.workflow_id}) by {done.approver}; "
        f"decision receipt {done.receipt_id}; workflow signalled"
    )


def register(app: typer.Typer) -> None:
    """Add ``approve`` and ``reject`` to the root command."""

    @app.command("approve")
    @temporal_options
    def approve(
        workflow_id: Annotated[str, typer.Argument(help="The waiting workflow's id.")],
        *,
        receipt: Receipt,
        temporal: TemporalConnection,
        reason: Reason = "",
        sidecar_url: SidecarUrl = "http://127.0.0.1:9090",
        credential: Credential = None,
    ) -> None:
        """Approve a held activity: the sidecar signs the decision, the workflow resumes."""
        _run(True, workflow_id, receipt, reason, sidecar_url, credential, temporal)

    @app.command("reject")
    @temporal_options
    def reject(
        workflow_id: Annotated[str, typer.Argument(help="The waiting workflow's id.")],
        *,
        receipt: Receipt,
        temporal: TemporalConnection,
        reason: Reason = "",
        sidecar_url: SidecarUrl = "http://127.0.0.1:9090",
        credential: Credential = None,
    ) -> None:
        """Reject a held activity: it fails with ChioCapabilityDenied naming the approver."""
        _run(False, workflow_id, receipt, reason, sidecar_url, credential, temporal)
