"""The native core (``chio_receipts_native``, Rust) against the Python it replaces, same run.

Ed25519 verification of distinct 420-byte messages under one key (what the builder does: a
handful of keys, every message different): PyNaCl (libsodium) one at a time, the native
``verify`` one at a time, the native ``verify_batch`` in batches of 64 and 256, and batches of 256
on two threads (the GIL is released while verifying). Also signing, the kernel's receipt
verifier and canonical JSON of a receipt, native vs the project's Python. Figures are per second,
medians of ``size.reps`` repetitions, with their ratio to the Python baseline measured here.

    python -m bench.native [--size small|full]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import chio_receipts_native as native
import nacl.exceptions
import nacl.signing

from bench._common import Size, machine
from bench._env import Env
from chio_receipts import schemas
from chio_receipts.consumers._chio import chio_refusal
from chio_receipts.consumers._consumer import _verify_all
from chio_receipts.consumers._wire import Plain, decode_plain
from chio_receipts.sidecar import LocalSidecar

__all__ = ["run"]

MESSAGE_BYTES = 420


def _triples(n: int) -> tuple[nacl.signing.SigningKey, list[tuple[bytes, bytes, bytes]]]:
    key = nacl.signing.SigningKey(bytes(range(32)))
    public_key = bytes(key.verify_key)
    out = []
    for i in range(n):
        message = os.urandom(MESSAGE_BYTES - 8) + i.to_bytes(8, "big")
        out.append((public_key, message, key.sign(message).signature))
    return key, out


def race(variants: dict[str, Any], items: int, reps: int) -> dict[str, dict[str, float]]:
    """Items per second of each ``variants[name]()`` (each handles ``items`` items): medians over
    ``reps`` rounds that run every variant in turn, so a change of load hits all of them alike.
    ``per_cpu_second`` divides by the process's CPU time (steadier on a shared machine; for a
    variant on two threads it counts both), ``per_second`` by the wall clock."""
    for fn in variants.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(max(1, reps)):
        for name, fn in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            w1, c1 = time.perf_counter(), time.process_time()
            wall[name].append(items / (w1 - w0))
            cpu[name].append(items / max(c1 - c0, 1e-9))
    return {
        "per_second": {name: statistics.median(v) for name, v in wall.items()},
        "per_cpu_second": {name: statistics.median(v) for name, v in cpu.items()},
    }


def _verify(size: Size) -> dict[str, Any]:
    n = max(512, size.crypto_n * 4)
    n -= n % 512
    _, triples = _triples(n)
    verify_key = nacl.signing.VerifyKey(triples[0][0])
    reps = max(5, size.reps * 2)

    def nacl_each() -> None:
        for _, message, signature in triples:
            verify_key.verify(message, signature)

    def native_each() -> None:
        for public_key, message, signature in triples:
            if not native.verify(public_key, message, signature):
                raise AssertionError("a valid signature did not verify")

    def batches(size_: int) -> Any:
        chunks = [triples[i : i + size_] for i in range(0, n, size_)]

        def go() -> None:
            for chunk in chunks:
                if not all(native.verify_batch(chunk, chunk=size_)):
                    raise AssertionError("a valid signature did not verify")

        return go

    pool = ThreadPoolExecutor(2)
    halves = [triples[: n // 2], triples[n // 2 :]]

    def two_threads() -> None:
        results = list(pool.map(lambda part: native.verify_batch(part, chunk=256), halves))
        if not all(all(r) for r in results):
            raise AssertionError("a valid signature did not verify")

    # One bad signature in every batch of 256: the bisection's cost.
    spoiled = list(triples)
    for i in range(0, n, 256):
        public_key, message, signature = spoiled[i + 100]
        spoiled[i + 100] = (public_key, message + b"!", signature)

    def one_bad_per_256() -> None:
        for i in range(0, n, 256):
            verdicts = native.verify_batch(spoiled[i : i + 256], chunk=256)
            if verdicts.count(False) != 1:
                raise AssertionError("the bad signature was not named")

    try:
        rates = race(
            {
                "pynacl_one_at_a_time": nacl_each,
                "native_one_at_a_time": native_each,
                "native_batch_64": batches(64),
                "native_batch_256": batches(256),
                "native_batch_256_two_threads": two_threads,
                "native_batch_256_one_bad": one_bad_per_256,
            },
            n,
            reps,
        )
    finally:
        pool.shutdown()
    base = rates["per_cpu_second"]["pynacl_one_at_a_time"]
    wall_base = rates["per_second"]["pynacl_one_at_a_time"]
    return {
        "messages": n,
        "message_bytes": MESSAGE_BYTES,
        **rates,
        "ratio_to_pynacl_cpu": {k: v / base for k, v in rates["per_cpu_second"].items()},
        "ratio_to_pynacl_wall": {k: v / wall_base for k, v in rates["per_second"].items()},
    }


def _sign(size: Size) -> dict[str, Any]:
    seed = bytes(range(32))
    message = b"\x01" * MESSAGE_BYTES
    pair = schemas.KeyPair.from_seed("bench", seed)
    signer = native.Signer(seed)
    n = size.crypto_n * 2

    def py() -> None:
        for _ in range(n):
            pair.sign(message)

    def nat() -> None:
        for _ in range(n):
            signer.sign(message)

    rates = race({"pynacl": py, "native": nat}, n, max(5, size.reps * 2))
    cpu = rates["per_cpu_second"]
    return {**rates, "ratio_cpu": cpu["native"] / cpu["pynacl"]}


def _request(cap_id: str, i: int) -> schemas.EvaluationRequest:
    return schemas.EvaluationRequest(
        capability_id=cap_id,
        tool_server="payments",
        tool="charge",
        namespace="ns",
        workflow_id=f"wf-bench-{i // 5}",
        run_id="run-1",
        workflow_type="Pay",
        task_queue="q",
        activity_id=str(i % 5),
        activity_type="charge",
        attempt=1,
        argument_digest="d" * 64,
        argument_key_id="args-1",
        scheduled_at=1_700_000_000_000_000,
        started_at=1_700_000_000_000_100,
        worker_identity="w@h",
        prev_hash=bytes(32),
        parameters={"args": [{"order": {"card": "tok_4242", "amount": 12.5, "items": [1, 2, 3]}}]},
    )


def signed_steps(n: int) -> tuple[list[tuple[Plain, bytes | None]], frozenset[str]]:
    """``n`` steps signed by an in-process sidecar (Avro signature and Chio receipt), decoded as
    the builder receives them, with the sidecar's public key; and the trusted kernel keys."""
    side = LocalSidecar()
    cap = side.mint("agent:bench", ["charge"], 3600)
    trusted = frozenset(side.trusted_keys())
    public_key = bytes.fromhex(next(iter(trusted)))
    checks: list[tuple[Plain, bytes | None]] = []
    for i in range(n):
        body = side.evaluate_now(_request(cap.id, i)).body
        checks.append((decode_plain(schemas.frame(schemas.STEP_SCHEMA, body)), public_key))
    return checks, trusted


def _builder_verify(size: Size) -> dict[str, Any]:
    """The builder's verification of a poll batch of steps our sidecar signed (each with its Avro
    signature and its Chio receipt): today's ``_verify_all`` (one native ``verify_batch`` for
    the batch) against the same checks one step at a time with PyNaCl, as the builder did before
    (``verify_body``, then ``chio_refusal`` verifying with PyNaCl)."""
    n = 2_000 if size.name == "full" else 500
    checks, trusted = signed_steps(n)
    public_key = bytes.fromhex(next(iter(trusted)))
    verify_key = nacl.signing.VerifyKey(public_key)
    keys: dict[bytes, nacl.signing.VerifyKey] = {public_key: verify_key}

    def nacl_check(pub: bytes, message: bytes, signature: bytes) -> bool:
        try:
            keys.setdefault(pub, nacl.signing.VerifyKey(pub)).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError):
            return False
        return True

    def one_by_one_pynacl() -> None:
        for plain, pub in checks:
            parts = schemas.signed_body(plain.body)
            if parts is None or pub is None or not nacl_check(pub, *parts):
                raise AssertionError("a valid step did not verify")
            if chio_refusal(plain.record, trusted, nacl_check) is not None:
                raise AssertionError("a valid receipt was refused")

    def batch_native() -> None:
        if any(v is not None for v in _verify_all(checks, trusted)):
            raise AssertionError("a valid step was refused")

    rates = race(
        {"pynacl_one_step_at_a_time": one_by_one_pynacl, "native_verify_batch": batch_native},
        n,
        max(5, size.reps * 2),
    )
    cpu = rates["per_cpu_second"]
    return {
        "steps": n,
        "signatures_per_step": 2,
        **rates,
        "us_per_step_cpu": {k: 1e6 / v for k, v in cpu.items()},
        "ratio_cpu": cpu["native_verify_batch"] / cpu["pynacl_one_step_at_a_time"],
    }


def _receipts(size: Size) -> dict[str, Any]:
    """The kernel's receipt verifier and canonical JSON, on a receipt our sidecar signs."""
    side = LocalSidecar()
    cap = side.mint("agent:bench", ["charge"], 3600)
    step = side.evaluate_now(_request(cap.id, 0)).receipt
    text = step.chio_receipt
    receipt = json.loads(text)
    trusted = sorted(side.trusted_keys())
    if not native.verify_kernel_receipt(text, trusted)[0]:
        raise AssertionError("the sidecar's receipt does not verify natively")
    n = size.crypto_n
    reps = max(5, size.reps * 2)

    def py_verify() -> None:
        for _ in range(n):
            schemas.verify_kernel_receipt(json.loads(text), trusted_keys=trusted)

    def nat_verify() -> None:
        for _ in range(n):
            native.verify_kernel_receipt(text, trusted)

    def py_jcs() -> None:
        for _ in range(n):
            schemas.canonical_json(json.loads(text))

    def nat_jcs() -> None:
        for _ in range(n):
            native.canonical_json(text)

    verify = race({"python": py_verify, "native": nat_verify}, n, reps)
    jcs = race({"python_parse_and_canonicalize": py_jcs, "native": nat_jcs}, n, reps)
    return {
        "receipt_bytes": len(text.encode()),
        "receipt_fields": len(receipt),
        "verify_kernel_receipt": {
            **verify,
            "ratio_cpu": verify["per_cpu_second"]["native"] / verify["per_cpu_second"]["python"],
        },
        "canonical_json": {
            **jcs,
            "ratio_cpu": jcs["per_cpu_second"]["native"]
            / jcs["per_cpu_second"]["python_parse_and_canonicalize"],
        },
    }


async def run(size: Size, env: Env | None) -> dict[str, Any]:
    """The section of ``bench.run``: pure CPU, no services."""
    del env
    return {
        "verify": _verify(size),
        "builder_verify": _builder_verify(size),
        "sign": _sign(size),
        "receipts": _receipts(size),
    }


def main() -> None:
    """``python -m bench.native``: print the section as JSON, with the machine."""
    import asyncio

    parser = argparse.ArgumentParser(prog="python -m bench.native", description=__doc__)
    parser.add_argument("--size", choices=("small", "full"), default="small")
    args = parser.parse_args()
    doc = {"machine": machine(), "native": asyncio.run(run(Size.of(args.size), None))}
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
