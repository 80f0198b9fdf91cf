"""Coverage-guided fuzzing (atheris / libFuzzer) of every decode path a consumer runs.

Targets, for every input:

- ``schemas.decode`` (Avro single-object frame, writer resolved by fingerprint);
- ``schemas.Codec.decode`` with Confluent-framed input (schema ids 1..3 cached for the three
  current schemas, so bodies after a known id are read; other ids must be ``UnknownSchema``);
- the consumer's hot-path reader ``consumers._wire.decode_plain`` when that package is present.

Each may return a record or raise ``schemas.DecodeError``; anything else (another exception
type, a crash) is a finding; with ``--strict-records`` so is a decoded record that cannot be
encoded again with its own schema. The process puts itself under
a memory limit (``RLIMIT_AS``) before fuzzing, so an input that makes a decoder allocate without
bound fails the run instead of the machine.

Usage (a long run)::

    python -m tests.fuzz.fuzz_decode --max-total-time 600 [--runs N] [--memory-mb 2048]
        [--strict-records] [CORPUS_DIR ...]

Extra arguments starting with ``-`` after ``--`` go to libFuzzer unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris
import fastavro  # compiled (Cython): libFuzzer sees its coverage only through our code
import nacl.signing  # noqa: F401 - imported before instrumentation so it is not instrumented

# Instrument only the project's decode code: instrumenting every dependency costs half a minute
# of start-up on a small machine and adds no useful coverage feedback.
with atheris.instrument_imports(include=["chio_receipts.schemas", "chio_receipts.consumers"]):
    import chio_receipts.schemas as schemas

    try:
        from chio_receipts.consumers._wire import decode_plain as _decode_plain
    except ImportError:  # the consumers package is optional for this target
        _decode_plain = None


_NAMES = list(schemas.SCHEMA_FILES)


class _CachedRegistry:
    """A registry that knows ids 1..3 (the current schemas); enough for ``Codec`` to cache them."""

    def __init__(self) -> None:
        self._ids = {name: i + 1 for i, name in enumerate(_NAMES)}

    def subject(self, topic: str, record_name: str) -> str:
        return f"{topic}-{record_name}"

    async def register(self, subject: str, schema: Any) -> int:
        return self._ids[subject.rpartition("-")[2]]


def _codec() -> schemas.Codec:
    codec = schemas.Codec(_CachedRegistry(), wire_format="confluent")  # type: ignore[arg-type]

    async def prime() -> None:
        for name in _NAMES:
            await codec.schema_id(name, "fuzz")

    asyncio.run(prime())
    return codec


_CODEC = _codec()


def _reencode(name: str, record: dict[str, Any]) -> None:
    """A decoded record must be encodable again with the reader schema."""
    fastavro.schemaless_writer(io.BytesIO(), schemas.parsed_schema(name), record)


_STRICT_RECORDS = False


def _check(fn: Callable[[bytes], Any], data: bytes) -> None:
    try:
        out = fn(data)
    except schemas.DecodeError:
        return
    if _STRICT_RECORDS:
        _reencode(out.schema_name, out.record)


def test_one_input(data: bytes) -> None:
    """The fuzz entry point: every decoder accepts or raises the codec's own error."""
    _check(schemas.decode, data)
    _check(_CODEC.decode, data)
    if data:
        # The same bytes as the body of a Confluent frame with a cached schema id, so the fuzzer
        # reaches the Avro readers behind the Confluent header without having to guess an id.
        _check(_CODEC.decode, schemas.confluent_frame(data[0] % 4, data[1:]))
    if _decode_plain is not None:
        with contextlib.suppress(schemas.DecodeError):
            _decode_plain(data)


def seed_inputs() -> list[bytes]:
    """Valid messages of every schema in both frames (a starting corpus)."""
    import tests.support.avro_strategies as avro_strategies

    step = avro_strategies.sample_step()
    body = schemas.step_body(step)
    seeds = [schemas.frame(schemas.STEP_SCHEMA, body), schemas.confluent_frame(1, body)]
    completion = schemas.RunCompletion(
        event_id="0190f3b0-0000-7000-8000-000000000001",
        namespace="default",
        workflow_id="wf",
        run_id="run",
        workflow_type="W",
        task_queue="q",
        outcome=schemas.Outcome.SUCCESS,
        started_at=1,
        closed_at=2,
        expected_steps=3,
    )
    name = "dev.chio.receipts.v1.RunCompletion"
    cbody = schemas.encode_body(name, completion.to_avro())
    seeds += [schemas.frame(name, cbody), schemas.confluent_frame(2, cbody)]
    return seeds


def main(argv: list[str] | None = None) -> None:
    """Parse our options, apply the memory limit, write seeds, hand the rest to libFuzzer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=0, help="stop after N inputs (0: no limit)")
    parser.add_argument("--max-total-time", type=int, default=0, help="stop after S seconds")
    parser.add_argument("--memory-mb", type=int, default=2048, help="RLIMIT_AS of this process")
    parser.add_argument(
        "--strict-records",
        action="store_true",
        help="also require every decoded record to re-encode with its schema (finds values "
        "outside a field's type, e.g. an int field decoded from an overlong varint)",
    )
    parser.add_argument("corpus", nargs="*", help="corpus directories (seeded when empty)")
    args, rest = parser.parse_known_args(argv)
    global _STRICT_RECORDS
    _STRICT_RECORDS = args.strict_records
    limit = args.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for directory in map(Path, args.corpus):
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.iterdir()):
            for i, seed in enumerate(seed_inputs()):
                (directory / f"seed-{i}").write_bytes(seed)
    lib_args = [sys.argv[0], *rest, *args.corpus]
    if args.runs:
        lib_args.append(f"-runs={args.runs}")
    if args.max_total_time:
        lib_args.append(f"-max_total_time={args.max_total_time}")
    # libFuzzer's own RSS limit stays off: RLIMIT_AS is the limit, enforced by the kernel.
    lib_args.append("-rss_limit_mb=0")
    atheris.Setup(lib_args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
