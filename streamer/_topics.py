"""Create the pipeline's topics (idempotent) and check co-partitioning."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from chio_receipts.streamer._config import TopicsConfig
from chio_receipts.streamer._errors import TopicError, TopicMismatch

__all__ = ["TopicState", "describe_topics", "ensure_topics"]

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicState:
    """One topic as the broker reports it."""

    name: str
    partitions: int
    created: bool = False


async def describe_topics(
    bootstrap: str, names: list[str], *, timeout_s: float = 30.0
) -> dict[str, int]:
    """Partition count of each existing topic in ``names`` (missing topics are left out)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        described = await asyncio.wait_for(admin.describe_topics(names), timeout_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        raise TopicError(f"cannot describe topics on {bootstrap}: {exc}") from exc
    finally:
        await _close(admin)
    out: dict[str, int] = {}
    for t in described:
        if t.get("error_code", 0) == 0 and t.get("partitions"):
            out[t["topic"]] = len(t["partitions"])
    return out


async def ensure_topics(
    bootstrap: str, config: TopicsConfig, *, timeout_s: float = 30.0
) -> dict[str, TopicState]:
    """Create missing topics with ``config``'s settings; check that steps and runs match.

    Existing topics are left as they are (their configs are not altered). Raises
    :class:`TopicMismatch` when the steps and runs topics end up with different partition counts.
    """
    settings = config.settings()
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    created: set[str] = set()
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        existing = set(await asyncio.wait_for(admin.list_topics(), timeout_s))
        new = [
            NewTopic(
                name=name,
                num_partitions=s.partitions,
                replication_factor=s.replication_factor,
                topic_configs=s.configs(),
            )
            for name, s in settings.items()
            if name not in existing
        ]
        if new:
            response = await asyncio.wait_for(
                admin.create_topics(new, timeout_ms=int(timeout_s * 1000)), timeout_s
            )
            for name, code, *rest in response.topic_errors:
                if code == 0:
                    created.add(name)
                    log.info("created topic %s", name)
                elif code != _TOPIC_ALREADY_EXISTS:
                    message = rest[0] if rest else ""
                    raise TopicError(f"cannot create topic {name}: error {code} {message}")
    except (TimeoutError, KafkaError, OSError) as exc:
        raise TopicError(f"cannot ensure topics on {bootstrap}: {exc}") from exc
    finally:
        await _close(admin)
    counts = await _wait_described(bootstrap, list(settings), timeout_s)
    if counts[config.steps] != counts[config.runs]:
        raise TopicMismatch(
            f"{config.steps} has {counts[config.steps]} partitions but {config.runs} has "
            f"{counts[config.runs]}: both are keyed by run key and must be co-partitioned"
        )
    return {n: TopicState(name=n, partitions=counts[n], created=n in created) for n in settings}


async def _wait_described(bootstrap: str, names: list[str], timeout_s: float) -> dict[str, int]:
    # Metadata of a just-created topic can lag behind the create response for a moment.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        counts = await describe_topics(bootstrap, names, timeout_s=timeout_s)
        missing = [n for n in names if n not in counts]
        if not missing:
            return counts
        if loop.time() > deadline:
            raise TopicError(f"topics not visible after creation: {', '.join(missing)}")
        await asyncio.sleep(0.2)


async def _close(admin: AIOKafkaAdminClient) -> None:
    try:
        await asyncio.wait_for(admin.close(), 5.0)
    except (TimeoutError, KafkaError, OSError) as exc:
        log.debug("admin client close: %s", exc)
