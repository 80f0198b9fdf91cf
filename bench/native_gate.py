"""The gate with the native encode-and-sign, against the yardstick of issue 19, same run.

Gate CPU per attempt: thread CPU time of ``ChioActivityInterceptor.before_attempt`` with the
in-process ``LocalSidecar`` and a no-op sink, activity body excluded (``bench.interceptor``'s
method), median over every attempt of every repetition. Yardstick: one PyNaCl (libsodium) Ed25519
signature of the same receipt bytes (the signed Avro body of a receipt the gate made), measured
in the same process just before. The ratio is the figure the issue's target (at most 2x) reads.

Also, per call: the step body's encode (``_stepcodec.encode_step``: Python before, native now)
and fastavro's for reference, ``sign_receipt`` (encode + sign + signed copy), and the canonical
JSON of the Chio receipt body the sidecar signs (``schemas.canonical_json``).

"Before" figures: with ``--before DIR`` (or ``CHIO_BENCH_BEFORE``), DIR is a checkout of the code
before the native path (e.g. ``git worktree add DIR main``); the same measurement runs there in a
child process (this file, the DIR's ``chio_receipts`` and ``bench``), interleaved with this tree's
repetitions so load changes hit both alike.

    python -m bench.native_gate [--size small|full] [--before DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import nacl.signing

from bench._common import Size, machine
from bench._env import Env
from bench.interceptor import NullSink, _gate_samples, _interceptor
from chio_receipts import schemas
from chio_receipts.interceptor import WorkflowGrant
from chio_receipts.schemas import RunCompletion, StepReceipt
from chio_receipts.schemas._avro import encode_body
from chio_receipts.schemas._stepcodec import encode_step
from chio_receipts.sidecar import LocalSidecar

__all__ = ["run"]

_BEFORE_ENV = "CHIO_BENCH_BEFORE"


class _Capture(NullSink):
    """Keeps the first signed receipt and body the gate hands on."""

    def __init__(self) -> None:
        self.first: tuple[StepReceipt, bytes] | None = None

    async def publish_step(self, receipt: StepReceipt, body: bytes) -> None:
        """Keep the first receipt."""
        if self.first is None:
            self.first = (receipt, body)

    async def publish_completion(self, event: RunCompletion) -> None:
        """Drop the event."""

    async def publish_envelope(self, envelope: Mapping[str, Any]) -> None:
        """Drop the envelope."""


def _per_call_us(fn: Callable[[], object], n: int, blocks: int = 5) -> float:
    """Median over ``blocks`` of the thread CPU microseconds per call of ``fn``."""
    fn()
    out = []
    for _ in range(blocks):
        t0 = time.thread_time_ns()
        for _ in range(n):
            fn()
        out.append((time.thread_time_ns() - t0) / n / 1000)
    return statistics.median(out)


async def _measure(size: Size) -> dict[str, Any]:
    """One repetition in this process: yardstick, gate CPU per attempt, the parts alone."""
    sidecar = LocalSidecar()
    token = sidecar.mint("svc-orders", ["charge_card", "refund_card"], 3600)
    grant = WorkflowGrant(workflow_id="*", token=token)
    capture = _Capture()
    await _gate_samples(_interceptor(sidecar, grant, capture), min(200, size.attempts))  # warm-up
    assert capture.first is not None
    receipt, body = capture.first
    parts = schemas.signed_body(body)
    assert parts is not None
    signed_bytes = parts[0]
    nacl_key = nacl.signing.SigningKey(bytes(range(32)))
    n = max(200, size.crypto_n * 5)
    yardstick = _per_call_us(lambda: nacl_key.sign(signed_bytes), n)
    wall, cpu, _ = await _gate_samples(_interceptor(sidecar, grant, NullSink()), size.attempts)
    key = schemas.KeyPair.from_seed("bench", bytes(range(32)))
    record = receipt.to_avro()
    chio_body = json.loads(receipt.chio_receipt)
    chio_body.pop("signature", None)
    chio_body.pop("id", None)
    return {
        "receipt_body_bytes": len(body),
        "yardstick_pynacl_sign_us": yardstick,
        "gate_cpu_us_median": statistics.median(cpu),
        "gate_wall_us_median": statistics.median(wall),
        "gate_ratio_vs_yardstick": statistics.median(cpu) / yardstick,
        "encode_step_us": _per_call_us(lambda: encode_step(receipt, "bench", b""), n),
        "encode_fastavro_us": _per_call_us(lambda: encode_body(schemas.STEP_SCHEMA, record), n),
        "sign_receipt_us": _per_call_us(lambda: schemas.sign_receipt(receipt, key), n),
        "canonical_chio_body_us": _per_call_us(lambda: schemas.canonical_json(chio_body), n),
    }


def _child(before: Path, size: Size) -> dict[str, Any]:
    """One repetition of :func:`_measure` in ``before``'s code, in a child process."""
    env = {**os.environ, "PYTHONPATH": str(before)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--size", size.name, "--child"],
        cwd=before,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _summary(reps: list[dict[str, Any]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in reps) for k in reps[0]}


def run(size: Size, before: str | None = None) -> dict[str, Any]:
    """Gate CPU per attempt and its parts, this tree (and ``before``'s, when given)."""
    before = before or os.environ.get(_BEFORE_ENV) or None
    after_reps: list[dict[str, Any]] = []
    before_reps: list[dict[str, Any]] = []
    for _ in range(max(1, size.reps)):
        if before is not None:
            before_reps.append(_child(Path(before), size))
        after_reps.append(asyncio.run(_measure(size)))
    out: dict[str, Any] = {
        "attempts_per_rep": size.attempts,
        "reps": len(after_reps),
        "after": _summary(after_reps),
        "after_per_rep": after_reps,
        "target_gate_ratio": 2.0,
    }
    out["target_met"] = out["after"]["gate_ratio_vs_yardstick"] <= 2.0
    if before_reps:
        out["before"] = _summary(before_reps)
        out["before_per_rep"] = before_reps
        out["before_vs_after"] = {
            k: out["before"][k] / out["after"][k]
            for k in ("gate_cpu_us_median", "encode_step_us", "sign_receipt_us")
            if out["after"][k]
        }
    return out


async def section(size: Size, env: Env | None) -> dict[str, Any]:
    """:func:`run` with the signature of a ``bench.run`` section (no services; it runs its own
    event loops, so on a worker thread)."""
    del env
    return await asyncio.to_thread(run, size)


def main() -> None:
    """Print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("small", "full"))
    parser.add_argument("--before", default=None, help="checkout of the code before")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = Size.of(args.size)
    if args.child:
        print(json.dumps(asyncio.run(_measure(size))))
        return
    started = machine()
    result = run(size, args.before)
    print(
        json.dumps(
            {
                "machine": started,
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                **result,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
