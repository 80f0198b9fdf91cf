"""The builder's step verification before and after the Chio check moved into compiled code.

Both variants verify the same poll batch of steps our in-process sidecar signed (each with its
Avro signature and its Chio receipt, 2,000 in the full size), as ``_verify_all`` does:

* ``python_check_verify_batch`` (before): the former pure-Python check of each step
  (``StepReceipt.from_avro``, ``json.loads`` twice, the parameter hash's canonical JSON, the
  request id, the comparisons; kept as the tests' oracle in ``tests/native/_oracle_check.py``),
  every Ed25519 signature of the batch then settled by one native ``verify_batch``;
* ``native_check_steps`` (after): today's ``_verify_all``, one ``check_steps`` call that does all
  of it in Rust, the signatures in the same batch equation;
* ``verify_batch_only`` (the floor): one ``verify_batch`` of the same signatures (two a step),
  nothing else; the difference to it is what the rest of the check costs.

Figures are steps per CPU-second of the process and per wall-clock second, medians over rounds
that run the two variants in turn (so a change of load hits both alike), with their ratio.

    python -m bench.native_check [--size small|full]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import chio_receipts_native as native

from bench._common import Size, machine
from bench._env import Env
from bench.native import race, signed_steps
from chio_receipts import schemas
from chio_receipts.consumers._consumer import _verify_all
from tests.native import _oracle_check

__all__ = ["run"]

SIZES = {"small": 500, "full": 2_000}


def run(size: str = "full", rounds: int = 9) -> dict[str, Any]:
    """Steps per second of the builder's verification, before and after, on ``size`` steps."""
    n = SIZES[size]
    checks, trusted = signed_steps(n)

    def before() -> None:
        if any(v is not None for v in _oracle_check.verify_all(checks, trusted)):
            raise AssertionError("the Python check refused a valid step")

    def after() -> None:
        if any(v is not None for v in _verify_all(checks, trusted)):
            raise AssertionError("the native check refused a valid step")

    triples = [(key, *parts) for plain, key in checks if (parts := schemas.signed_body(plain.body))]
    records = [(plain.record, None) for plain, _ in checks]
    deferred = native.check_steps(records, trusted, defer=True)
    triples += [triple for _, triple in deferred if triple is not None]
    if len(triples) != 2 * n:
        raise AssertionError("every step has two signatures")

    def floor() -> None:
        if not all(native.verify_batch(triples)):
            raise AssertionError("a valid signature did not verify")

    rates = race(
        {
            "python_check_verify_batch": before,
            "native_check_steps": after,
            "verify_batch_only": floor,
        },
        n,
        rounds,
    )
    cpu, wall = rates["per_cpu_second"], rates["per_second"]
    return {
        "steps": n,
        "signatures_per_step": 2,
        "rounds": rounds,
        **rates,
        "us_per_step_cpu": {k: 1e6 / v for k, v in cpu.items()},
        "ratio_cpu": cpu["native_check_steps"] / cpu["python_check_verify_batch"],
        "ratio_wall": wall["native_check_steps"] / wall["python_check_verify_batch"],
        "native_vs_floor_cpu": cpu["native_check_steps"] / cpu["verify_batch_only"],
    }


async def section(size: Size, env: Env | None) -> dict[str, Any]:
    """:func:`run` with the signature of a ``bench.run`` section (no services)."""
    del env
    return await asyncio.to_thread(run, size.name)


def main() -> None:
    """``python -m bench.native_check``: print the figures as JSON, with the machine."""
    parser = argparse.ArgumentParser(prog="python -m bench.native_check", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    doc = {"machine": machine(), "native_check": run(args.size, args.rounds)}
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
