"""A short atheris run of the decode paths under a memory limit, and the fuzzer's findings."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import fastavro
import pytest

import chio_receipts.schemas as schemas

REPO = Path(__file__).resolve().parents[2]
SHORT_RUN_S = int(os.environ.get("CHIO_FUZZ_SECONDS", "20"))


@pytest.mark.unit
@pytest.mark.timeout(SHORT_RUN_S + 60)
def test_short_fuzz_run_finds_only_typed_errors(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_decode",
            f"--max-total-time={SHORT_RUN_S}",
            "--memory-mb=2048",
            str(corpus),
        ],
        cwd=tmp_path,  # crash artifacts land here, never in the repository
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=SHORT_RUN_S + 45,
        check=False,
    )
    tail = "\n".join(proc.stderr.splitlines()[-40:])
    assert proc.returncode == 0, f"the fuzzer found a failing input:\n{tail}"
    assert "Done " in proc.stderr, tail
    runs = int(proc.stderr.rsplit("Done ", 1)[1].split()[0])
    assert runs > 1000, f"the fuzzer ran only {runs} inputs:\n{tail}"
    assert any(corpus.iterdir()), "the seed corpus was not written"


@pytest.mark.unit
def test_fuzz_target_rejects_its_seeds_only_with_typed_errors() -> None:
    """The seeds decode; every truncation of them decodes or raises DecodeError."""
    from tests.fuzz import fuzz_decode

    for seed in fuzz_decode.seed_inputs():
        fuzz_decode.test_one_input(seed)
        for cut in range(len(seed)):
            fuzz_decode.test_one_input(seed[:cut])


def _overlong_int_completion() -> bytes:
    """A RunCompletion whose ``expected_steps`` (Avro ``int``) is written as a 64-bit varint."""
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
        expected_steps=1,
    )
    name = "dev.chio.receipts.v1.RunCompletion"
    body = schemas.encode_body(name, completion.to_avro())
    small = io.BytesIO()
    fastavro.schemaless_writer(small, {"type": "int"}, 1)
    huge = io.BytesIO()
    fastavro.schemaless_writer(huge, {"type": "long"}, 2**63 - 1)
    # expected_steps is the union ["null", "int"]: branch 1 (0x02) then the int.
    marker = b"\x02" + small.getvalue()
    assert body.count(marker) >= 1
    at = body.rindex(marker)
    return schemas.frame(name, body[:at] + b"\x02" + huge.getvalue() + body[at + len(marker) :])


@pytest.mark.unit
def test_int_fields_outside_int32_are_a_decode_error() -> None:
    with pytest.raises(schemas.DecodeError):
        schemas.decode(_overlong_int_completion())


@pytest.mark.unit
def test_the_builders_reader_also_rejects_ints_outside_int32() -> None:
    from chio_receipts.consumers._wire import decode_plain

    with pytest.raises(schemas.DecodeError):
        decode_plain(_overlong_int_completion())
