"""A Temporal worker process for the fault suite: interceptor + streamer + oracle, assembled here.

``python -m tests.support.faults.worker_proc --config CONFIG.json``. It writes
``status.json`` (records not yet acknowledged by Kafka, connection state) every 200 ms so
the harness can see the spool drain, and on SIGTERM shuts the worker down gracefully, then
stops the streamer (drain, or persist to the spool).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from chio_receipts.interceptor import (
    ArgumentKey,
    ChioActivityInterceptor,
    Evaluator,
    HttpSidecar,
    WorkflowGrant,
)
from chio_receipts.schemas import KafkaConnection, KeyPair
from chio_receipts.sidecar import LocalSidecar
from chio_receipts.streamer import ReceiptStreamer, StreamerConfig, TopicsConfig
from tests.support.faults.oracle import OracleSink
from tests.support.faults.workload import ACTIVITIES, SCOPE, FaultWorkflow

log = logging.getLogger("harness.worker")


def _write_status(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


async def _connect(address: str, deadline_s: float) -> Client:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return await Client.connect(address)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def main(cfg: dict[str, object]) -> None:
    """Run the worker until SIGTERM."""
    work = Path(str(cfg["dir"]))
    key = KeyPair.from_seed(str(cfg["key_id"]), bytes.fromhex(str(cfg["key_seed"])))
    remote: HttpSidecar | None = None
    sidecar: Evaluator
    if cfg.get("sidecar_url"):
        # The served sidecar decides and signs; its capability was minted by the harness.
        remote = HttpSidecar(str(cfg["sidecar_url"]))
        sidecar = remote
        token = await remote.get_capability(str(cfg["capability_id"]))
    else:
        local = LocalSidecar(key)
        sidecar = local
        token = local.mint("agent:fault-suite", SCOPE, 24 * 3600)
    streamer = ReceiptStreamer(
        StreamerConfig(
            kafka=KafkaConnection(bootstrap_servers=str(cfg["bootstrap"])),
            spool_dir=str(work / "spool"),
            topics=TopicsConfig(prefix=str(cfg["prefix"]), partitions=int(str(cfg["partitions"]))),
            durability=str(cfg.get("durability", "before_execute")),  # type: ignore[arg-type]
            delivery_timeout_s=float(str(cfg.get("delivery_timeout_s", 15.0))),
            request_timeout_ms=int(str(cfg.get("request_timeout_ms", 10_000))),
            stop_timeout_s=float(str(cfg.get("stop_timeout_s", 10.0))),
            spool_max_bytes=int(str(cfg.get("spool_max_bytes", 1 << 30))),
            max_request_size=int(str(cfg.get("max_request_size", 4 << 20))),
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    status = work / "status.json"
    await streamer.start()
    sink = OracleSink(streamer, work / "oracle.log")
    interceptor = ChioActivityInterceptor(
        evaluator=sidecar,
        default_tool_server="faults",
        receipt_sink=sink,
        argument_key=ArgumentKey.from_hex("args-faults", str(cfg["argument_key"])),
        grant_resolver=lambda info: WorkflowGrant(
            workflow_id=info.workflow_id or "unknown", token=token, tool_server="faults"
        ),
        identity=f"fault-worker-{os.getpid()}",
        redact_parameters=bool(cfg.get("redact_parameters", False)),
    )
    client = await _connect(str(cfg["temporal"]), 120.0)
    worker = Worker(
        client,
        task_queue=str(cfg["task_queue"]),
        workflows=[FaultWorkflow],
        activities=ACTIVITIES,
        interceptors=[interceptor],
        max_concurrent_activities=int(str(cfg.get("max_concurrent_activities", 20))),
        graceful_shutdown_timeout=timedelta(seconds=5),
    )

    async def report() -> None:
        while True:
            _write_status(
                status,
                {
                    "pid": os.getpid(),
                    "pending": streamer.pending,
                    "connected": streamer.connected,
                    "time": time.time(),
                },
            )
            await asyncio.sleep(0.2)

    reporter = asyncio.create_task(report())
    runner = asyncio.create_task(worker.run())
    await asyncio.wait({runner, asyncio.create_task(stop.wait())}, return_when="FIRST_COMPLETED")
    t0 = time.monotonic()
    if not runner.done():
        await worker.shutdown()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await interceptor.aclose()  # drain queued outcome records into the streamer
    await streamer.stop()
    if remote is not None:
        await remote.aclose()
    reporter.cancel()
    _write_status(
        status,
        {
            "pid": os.getpid(),
            "pending": streamer.pending,
            "connected": streamer.connected,
            "time": time.time(),
            "stopped": True,
            "shutdown_s": time.monotonic() - t0,
        },
    )
    sink.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    config = json.loads(Path(args.config).read_text())
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(main(config))
