"""The builder's decode of a poll batch, fastavro vs native, and its step insert into chDB, rows vs
columns, same run.

Decode: 20,000 single-object step messages signed like our sidecar's (each with its Chio
receipt), in polls of 5,000 whose results are kept until the poll is done (as the runner keeps
them): read one at a time with ``decode_plain`` (fastavro, what the builder did) and per poll
with ``decode_plain_batch`` (the native ``PlainDecoder``, what it does now). Insert: the
``step_receipts`` rows of the same steps into an embedded chDB database through
clickhouse-connect, row-oriented (as the sink does) and column-oriented (the same rows
transposed), in batches of 5,000 (the builder's ``max_batch``), and what building the rows
(``step_row``) costs. The variants run in turn, round after round; figures are medians, per
CPU-second of this process and per wall-second.

    python -m bench.native_decode [--size small|full]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

from bench._common import Size, machine, signed_batch
from bench._env import Env
from bench.native import race
from chio_receipts import schemas
from chio_receipts.consumers._clickhouse import _COLUMNS, ClickHouseConfig, ClickHouseSink
from chio_receipts.consumers._rows import StepRow, step_row
from chio_receipts.consumers._wire import Plain, decode_plain, decode_plain_batch

__all__ = ["run", "section"]

MESSAGES = 20_000
INSERT_BATCH = 5_000


def _race(variants: dict[str, Callable[[], Any]], items: int, reps: int) -> dict[str, Any]:
    """:func:`bench.native.race`, rounded, with the CPU µs per item."""
    rates = race(variants, items, reps)
    return {
        "per_second": {name: round(v) for name, v in rates["per_second"].items()},
        "per_cpu_second": {name: round(v) for name, v in rates["per_cpu_second"].items()},
        "us_per_item_cpu": {name: round(1e6 / v, 2) for name, v in rates["per_cpu_second"].items()},
    }


def _messages(n: int) -> list[bytes]:
    key = schemas.KeyPair.generate("bench-decode")
    return [schemas.frame(schemas.STEP_SCHEMA, body) for _, body in signed_batch(n, key)]


def _decode(values: list[bytes], reps: int) -> dict[str, Any]:
    expected = [decode_plain(v) for v in values]
    got = decode_plain_batch(values)
    if [p.record for p in expected] != [p.record for p in got if isinstance(p, Plain)]:
        raise AssertionError("the native decoder disagrees with fastavro")

    # Both keep what they decode, as the runner keeps a poll batch (``max_batch`` messages).
    polls = [values[i : i + INSERT_BATCH] for i in range(0, len(values), INSERT_BATCH)]

    def fastavro_each() -> None:
        for poll in polls:
            kept = [decode_plain(value) for value in poll]
            del kept

    def native_batch() -> None:
        for poll in polls:
            kept = decode_plain_batch(poll)
            del kept

    rates = _race({"fastavro": fastavro_each, "native": native_batch}, len(values), reps)
    cpu = rates["per_cpu_second"]
    return {
        "messages": len(values),
        "message_bytes": round(statistics.mean(len(v) for v in values)),
        **rates,
        "ratio_cpu": round(cpu["native"] / cpu["fastavro"], 2),
    }


def _insert(values: list[bytes], reps: int) -> dict[str, Any]:
    records = [decode_plain(value).record for value in values]
    rows: list[StepRow] = [
        step_row(rec, value, 0, i)
        for i, (rec, value) in enumerate(zip(records, values, strict=True))
    ]

    def build_rows() -> None:
        for i, (rec, value) in enumerate(zip(records, values, strict=True)):
            step_row(rec, value, 0, i)

    # What building the rows costs (an upper bound of what columns built without a per-step
    # object could save besides the insert itself).
    building = _race({"step_row": build_rows}, len(rows), reps)
    batches = [rows[i : i + INSERT_BATCH] for i in range(0, len(rows), INSERT_BATCH)]
    tokens = count()
    with tempfile.TemporaryDirectory(prefix="bench-insert-") as tmp:
        sink = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{tmp}/db"))
        loop = asyncio.new_event_loop()
        loop.run_until_complete(sink.start())
        client = sink.client
        columns = _COLUMNS["step_receipts"]
        types = sink._types["step_receipts"]

        def insert(data: Any, oriented: bool) -> None:
            client.insert(
                "step_receipts",
                data,
                column_names=columns,
                column_types=types,
                column_oriented=oriented,
                settings={"insert_deduplication_token": f"bench:{next(tokens)}"},
            )

        def rows_oriented() -> None:
            for batch in batches:
                insert([row.values() for row in batch], False)

        def columns_oriented() -> None:
            for batch in batches:
                insert(list(zip(*(row.values() for row in batch), strict=True)), True)

        try:
            rates = _race({"rows": rows_oriented, "columns": columns_oriented}, len(rows), reps)
        finally:
            loop.run_until_complete(sink.close())
            loop.close()
    cpu = rates["per_cpu_second"]
    return {
        "rows": len(rows),
        "rows_per_insert": INSERT_BATCH,
        **rates,
        "ratio_cpu": round(cpu["columns"] / cpu["rows"], 2),
        "step_row_us_per_row_cpu": building["us_per_item_cpu"]["step_row"],
    }


def run(size: Size | str = "small") -> dict[str, Any]:
    """The decode and insert races (no services: chDB is embedded)."""
    size = Size.of(size) if isinstance(size, str) else size
    reps = 5 if size.name == "small" else 10
    values = _messages(MESSAGES)
    return {
        "decode": _decode(values, reps),
        "insert": _insert(values, max(3, reps // 2)),
    }


_REPO = str(Path(__file__).resolve().parent.parent)


async def section(size: Size, env: Env | None) -> dict[str, Any]:
    """The same as :func:`run`, with the signature of a ``bench.run`` section (no services).

    It runs in a child process: chDB opens one data path per process, and the consumer's
    section of the same run holds another."""
    del env
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.native_decode",
        "--size",
        size.name,
        stdout=asyncio.subprocess.PIPE,
        cwd=_REPO,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.native_decode exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out)["native_decode"]
    return result


def main() -> None:
    """``python -m bench.native_decode``: print the figures as JSON, with the machine."""
    parser = argparse.ArgumentParser(prog="python -m bench.native_decode", description=__doc__)
    parser.add_argument("--size", choices=("small", "full"), default="small")
    args = parser.parse_args()
    print(json.dumps({"machine": machine(), "native_decode": run(args.size)}, indent=2))


if __name__ == "__main__":
    main()
