"""Prototypes of optimisations proposed for packages this benchmark suite does not own.

    python -m bench.prototypes [--n 20000] [--reps 5]

Each prototype is checked to give the same result as the current code, then both are timed in
the same run. The numbers back the proposals in ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import temporalio.converter

from bench._common import median_rate, signed_batch
from chio_receipts.interceptor import ArgumentKey, argument_digest, canonical_arguments
from chio_receipts.schemas import KeyPair, verify_body

__all__ = ["fast_argument_digest", "fast_canonical_arguments", "fast_uuid_format", "main"]

_PLAIN = (str, int, float, bool, list, dict, tuple)


def _frame(out: bytearray, part: bytes) -> None:
    out += len(part).to_bytes(4, "big")
    out += part


def _no_default(value: Any) -> Any:
    raise TypeError(type(value).__name__)


def fast_canonical_arguments(
    args: Sequence[Any], converter: temporalio.converter.PayloadConverter | None = None
) -> bytes:
    """``canonical_arguments`` without the payload converter for plain JSON arguments.

    Temporal's default converter encodes a plain JSON value (not None, not bytes, no custom
    types) as ``json.dumps(value, separators=(",", ":"), sort_keys=True)`` with metadata
    ``encoding=json/plain``; that framing is produced here directly. Anything else (or any value
    ``json`` refuses) takes the converter path, so the bytes never differ.
    """
    out = bytearray(b"chio-args-v1")
    _frame(out, len(args).to_bytes(4, "big"))
    for arg in args:
        if not isinstance(arg, _PLAIN):
            return canonical_arguments(args, converter)
        try:
            data = json.dumps(
                arg, separators=(",", ":"), sort_keys=True, default=_no_default
            ).encode()
        except (TypeError, ValueError):
            return canonical_arguments(args, converter)
        _frame(out, b"encoding")
        _frame(out, b"json/plain")
        _frame(out, b"")
        _frame(out, data)
    return bytes(out)


def fast_argument_digest(key: ArgumentKey, args: Sequence[Any]) -> str:
    """``argument_digest`` over :func:`fast_canonical_arguments`."""
    return hmac.new(key.secret, fast_canonical_arguments(args), hashlib.sha256).hexdigest()


def fast_uuid_format(value: int) -> str:
    """``str(uuid.UUID(int=value))`` without building a UUID object."""
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_SAMPLES: list[list[Any]] = [
    [{"order_id": "o-123456", "amount_cents": 12_500, "currency": "EUR", "items": [1, 2, 3]}],
    ["plain", 1, 2.5, True, [1, "x"], {"b": 1, "a": {"z": None, "é": "ü"}}],
    [],
    [None],
    [b"raw-bytes"],
    [("tuple", 1)],
    [{"nested": [{"k": float("inf")}]}],
]


def _digest_prototype(n: int, reps: int) -> dict[str, Any]:
    conv = temporalio.converter.default().payload_converter
    key = ArgumentKey("args-proto", bytes(range(32)))
    for sample in _SAMPLES:
        assert fast_canonical_arguments(sample, conv) == canonical_arguments(sample, conv), sample
        assert fast_argument_digest(key, sample) == argument_digest(key, sample, conv)
    args = _SAMPLES[0]
    before = median_rate(lambda: argument_digest(key, args, conv), n, reps)
    after = median_rate(lambda: fast_argument_digest(key, args), n, reps)
    return {
        "target": "interceptor/_digest.py canonical_arguments",
        "before_us": 1e6 / before,
        "after_us": 1e6 / after,
        "saved_us_per_attempt": 1e6 / before - 1e6 / after,
        "speedup": after / before,
    }


def _uuid_prototype(n: int, reps: int) -> dict[str, Any]:
    value = int.from_bytes(os.urandom(16), "big")
    assert fast_uuid_format(value) == str(uuid.UUID(int=value))
    before = median_rate(lambda: str(uuid.UUID(int=value)), n, reps)
    after = median_rate(lambda: fast_uuid_format(value), n, reps)
    return {
        "target": "interceptor/_model.py uuid7 (string formatting)",
        "before_us": 1e6 / before,
        "after_us": 1e6 / after,
        "saved_us_per_attempt": 1e6 / before - 1e6 / after,
        "speedup": after / before,
    }


def _verify_threads_prototype(n: int, reps: int) -> dict[str, Any]:
    key = KeyPair.generate("proto")
    bodies = [b for _, b in signed_batch(min(n, 4_000), key)]
    pub = key.public_key

    def chunk(part: list[bytes]) -> bool:
        return all(verify_body(b, pub) for b in part)

    serial: list[float] = []
    threaded: list[float] = []
    half = len(bodies) // 2
    with ThreadPoolExecutor(2) as pool:
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            assert chunk(bodies)
            serial.append(len(bodies) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            assert all(pool.map(chunk, [bodies[:half], bodies[half:]]))
            threaded.append(len(bodies) / (time.perf_counter() - t0))
    return {
        "target": "consumers/_consumer.py _verified (verify in 2 threads; PyNaCl releases the GIL)",
        "serial_per_s": statistics.median(serial),
        "two_threads_per_s": statistics.median(threaded),
        "speedup": statistics.median(threaded) / statistics.median(serial),
    }


async def _insert_prototype(reps: int) -> dict[str, Any]:
    """One chDB insert per poll batch vs one per partition (6), same 5,000 rows."""
    from chio_receipts.consumers import ClickHouseConfig, ClickHouseSink
    from chio_receipts.consumers._rows import step_row
    from chio_receipts.consumers._wire import decode_plain
    from chio_receipts.schemas import STEP_SCHEMA, frame

    key = KeyPair.generate("proto")
    values = [frame(STEP_SCHEMA, b) for _, b in signed_batch(5_000, key)]
    rows = [step_row(decode_plain(v).record, v, i % 6, i) for i, v in enumerate(values)]
    per_partition = [rows[p::6] for p in range(6)]
    with tempfile.TemporaryDirectory() as tmp:
        sink = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{tmp}/ch", apply_roles=False))
        await sink.start()
        try:
            six: list[float] = []
            one: list[float] = []
            for r in range(max(1, reps)):
                t0 = time.perf_counter()
                for p, part in enumerate(per_partition):
                    await sink.insert_steps(part, f"six-{r}-{p}")
                six.append(len(rows) / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                await sink.insert_steps(rows, f"one-{r}")
                one.append(len(rows) / (time.perf_counter() - t0))
        finally:
            await sink.close()
    return {
        "target": "consumers/_consumer.py _process (one step insert per poll batch)",
        "rows": len(rows),
        "six_inserts_rows_per_s": statistics.median(six),
        "one_insert_rows_per_s": statistics.median(one),
        "speedup": statistics.median(one) / statistics.median(six),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the prototypes and print JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.prototypes")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    out = {
        "argument_digest": _digest_prototype(args.n, args.reps),
        "uuid7_format": _uuid_prototype(args.n, args.reps),
        "verify_threads": _verify_threads_prototype(args.n, args.reps),
        "one_insert_per_batch": asyncio.run(_insert_prototype(args.reps)),
        "loadavg": os.getloadavg(),
    }
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
