"""The receipt builder as a child process of the fault suite.

``python -m tests.support.faults.consumer_proc --config CONFIG.json``; SIGTERM stops it
cleanly (what is not committed is re-read by the next one). Failpoints of the consumers package
(``consumer.after_insert_before_commit``, ``clickhouse.insert``...) are armed by the
``CHIO_FAILPOINT`` environment variable of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ConsumerError,
    ReceiptBuilderService,
)
from chio_receipts.schemas import KafkaConnection, KeyPair, TopicNames

log = logging.getLogger("harness.consumer")


async def main(cfg: dict[str, object]) -> int:
    """Run the builder until SIGTERM; exit code 0 on a clean stop, 3 when it failed."""
    prefix = str(cfg["prefix"])
    keys = {str(k): bytes.fromhex(str(v)) for k, v in dict(cfg["keys"]).items()}  # type: ignore[call-overload]
    config = BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=str(cfg["bootstrap"])),
        clickhouse=ClickHouseConfig(dsn=str(cfg["dsn"])),
        builder_key=KeyPair.from_seed(
            str(cfg["builder_key_id"]), bytes.fromhex(str(cfg["builder_seed"]))
        ),
        public_keys=keys,
        key_url=str(cfg["key_url"]) if cfg.get("key_url") else None,
        registry_url=str(cfg["registry_url"]) if cfg.get("registry_url") else None,
        topics=TopicNames.with_prefix(prefix),
        group_id=str(cfg["group"]),
        grace_seconds=float(str(cfg.get("grace_seconds", 20.0))),
        poll_timeout_ms=100,
        max_message_bytes=int(str(cfg.get("max_message_bytes", 1_048_576))),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        async with ReceiptBuilderService(config) as service:
            await service.run(stop)
    except ConsumerError:
        log.exception("the receipt builder failed")
        return 3
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    sys.exit(asyncio.run(main(json.loads(Path(args.config).read_text()))))
