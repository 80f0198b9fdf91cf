"""Sidecar rows on the session stack: the workers decide through the served sidecar (a child
process, ``python -m chio_receipts sidecar serve`` on a data directory) and the builder fetches
its keys from ``/v1/keys``. F23 the sidecar unreachable for 30 s mid-run; F24 ``kill -9`` of
the sidecar and a restart on the same data directory; F25 ``sidecar keys rotate`` while load
runs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import time
from collections.abc import Callable

import pytest
import typer

from chio_receipts import cli_consumers
from tests.support.faults.pipeline import Pipeline
from tests.support.faults.scenario import Outcome, finish
from tests.support.faults.workload import FaultInput
from tests.support.helpers import eventually

pytestmark = [pytest.mark.e2e]


def _receipt_key_ids(p: Pipeline) -> set[str]:
    client = p.clickhouse()
    try:
        rows = client.query(
            "SELECT DISTINCT key_id FROM step_receipts WHERE workflow_id LIKE {p:String}",
            parameters={"p": f"{p.name}-%"},
        ).result_rows
    finally:
        client.close()
    return {str(r[0]) for r in rows}


def _verify_cli(p: Pipeline, workflow_ids: set[str]) -> list[str]:
    """``chio-receipts verify --key-url <sidecar>`` on every workflow; the failures' output."""
    builder_file = p.root / "builder-key.json"
    builder_file.write_text(
        json.dumps({"key_id": p.builder_key.key_id, "seed": p._builder_seed.hex()})
    )
    failures = []
    for wf in sorted(workflow_ids):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                cli_consumers.verify(
                    workflow_id=wf,
                    dsn=p.dsn,
                    key_url=p.sidecar_url,
                    builder_key_file=builder_file,
                )
                code = 0
            except typer.Exit as exc:
                code = exc.exit_code
        if code != 0 or not out.getvalue().startswith("OK"):
            failures.append(f"{wf}: {out.getvalue().strip()}")
    return failures


def gate_failed_attempts(p: Pipeline) -> list[tuple[str, str, str, int, str]]:
    """(workflow, run, activity, attempt, reason) of every GATE_FAILED outcome record stored."""
    client = p.clickhouse()
    try:
        rows = client.query(
            "SELECT workflow_id, run_id, activity_id, attempt, error_type FROM step_outcomes "
            "FINAL WHERE workflow_id LIKE {p:String} AND status = 'GATE_FAILED'",
            parameters={"p": f"{p.name}-%"},
        ).result_rows
    finally:
        client.close()
    return [(str(a), str(b), str(c), int(d), str(e)) for a, b, c, d, e in rows]


def _no_dead_letters(out: Outcome) -> None:
    assert not out.snap.dead_letters, [(d.reason, d.error_class) for d in out.snap.dead_letters[:5]]


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_f23_sidecar_unreachable_for_30s_mid_run(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """The served sidecar goes away for 30 s while runs execute, then comes back on its data
    directory: attempts in the gap fail retryably (never an allow, the body never runs), each
    refused attempt is accounted for in its run's envelope with the reason, and every envelope
    ends complete."""
    p = make_pipeline(grace_seconds=5.0)
    await p.start_sidecar()
    await p.start()
    await p.start_runs(6, FaultInput(steps=6, step_sleep_s=0.5))
    await eventually(lambda: len(p.oracle().accepted) >= 6, 120)
    assert p.sidecar is not None
    await p.sidecar.kill9()
    await asyncio.sleep(30.0)
    t0 = time.monotonic()
    await p.start_sidecar()
    out = await finish(
        p, "F23", "sidecar unreachable 30 s mid-run", recovery_from=t0, run_timeout=300
    )
    _no_dead_letters(out)
    gate_failed = gate_failed_attempts(p)
    assert gate_failed, "no attempt was refused while the sidecar was away"
    assert {reason for *_, reason in gate_failed} == {"sidecar_unreachable"}
    incomplete = [e for e in out.snap.envelopes if not e.complete]
    assert not incomplete, incomplete


@pytest.mark.timeout(400)
async def test_f24_sidecar_killed_and_restarted_on_its_data_dir(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """kill -9 of the served sidecar mid-run, restarted on the same data directory: the
    capability and the signing key survive; attempts in the gap fail retryably (never an
    allow); no receipt is dead-lettered; every run completes."""
    # Attempts refused while the sidecar is down have no receipt; their GATE_FAILED records
    # account for them. A short grace period all the same, should one be late.
    p = make_pipeline(grace_seconds=5.0)
    await p.start_sidecar()
    key_before = dict(p.sidecar_keys)
    await p.start()
    await p.start_runs(6, FaultInput(steps=4, step_sleep_s=0.3))
    await eventually(lambda: len(p.oracle().accepted) >= 6, 120)
    assert p.sidecar is not None
    await p.sidecar.kill9()
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    await p.start_sidecar()
    assert p.sidecar_keys == key_before, "the signing key changed across the restart"
    out = await finish(
        p, "F24", "sidecar kill -9 mid-run, restart on its data dir", recovery_from=t0
    )
    _no_dead_letters(out)
    assert _receipt_key_ids(p) == set(key_before)
    log = (p.root / "sidecar.log").read_text()
    assert "Traceback" not in log


@pytest.mark.timeout(400)
async def test_f25_signing_key_rotated_while_load_runs(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """``sidecar keys rotate`` (SIGHUP to the served sidecar) mid-stream: receipts signed before
    and after verify in the builder and with ``verify``; none is dead-lettered."""
    p = make_pipeline()
    await p.start_sidecar()
    (old_key,) = p.sidecar_keys
    await p.start()
    await p.start_runs(6, FaultInput(steps=6, step_sleep_s=0.5))
    await eventually(lambda: len(p.oracle().accepted) >= 6, 120)
    t0 = time.monotonic()
    rotate = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chio_receipts",
        "sidecar",
        "keys",
        "rotate",
        "--data-dir",
        str(p.sidecar_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    said, _ = await asyncio.wait_for(rotate.communicate(), 60)
    assert rotate.returncode == 0, said.decode()
    assert b"SIGHUP" in said

    async def rotated() -> bool:
        return len(await p.refresh_sidecar_keys()) == 2

    await eventually(rotated, 10)
    accepted_at_rotation = len(p.oracle().accepted)
    await p.start_runs(3, FaultInput(steps=3))  # wholly after the rotation
    out = await finish(p, "F25", "signing-key rotation mid-stream", recovery_from=t0)
    _no_dead_letters(out)
    assert len(out.oracle.accepted) > accepted_at_rotation, "no receipt after the rotation"
    assert _receipt_key_ids(p) == set(p.sidecar_keys), "both keys sign some receipts"
    assert old_key in p.sidecar_keys
    failures = await asyncio.to_thread(_verify_cli, p, {s.workflow_id for s in out.snap.steps})
    assert not failures, failures
