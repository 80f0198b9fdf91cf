"""Create the pipeline's topics (idempotent) and check co-partitioning (``schemas`` contract)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

import chio_receipts.schemas as schemas
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


class _NotVisibleYet(TopicError):
    """Created topics missing from the metadata: it lags the create response for a moment."""

    retriable = True


def _admin(kafka: schemas.KafkaConnection, timeout_s: float) -> AIOKafkaAdminClient:
    kwargs: dict[str, Any] = kafka.client_kwargs()
    kwargs["request_timeout_ms"] = int(timeout_s * 1000)
    return AIOKafkaAdminClient(**kwargs)


async def describe_topics(
    kafka: schemas.KafkaConnection, names: list[str], *, timeout_s: float = 30.0
) -> dict[str, int]:
    """Partition count of each existing topic in ``names`` (missing topics are left out)."""
    admin = _admin(kafka, timeout_s)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        described = await asyncio.wait_for(admin.describe_topics(names), timeout_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        raise TopicError(f"cannot describe topics on {kafka.bootstrap_servers}: {exc}") from exc
    finally:
        await _close(admin)
    out: dict[str, int] = {}
    for t in described:
        if t.get("error_code", 0) == 0 and t.get("partitions"):
            out[t["topic"]] = len(t["partitions"])
    return out


async def ensure_topics(
    kafka: schemas.KafkaConnection, config: TopicsConfig, *, timeout_s: float = 30.0
) -> dict[str, TopicState]:
    """Create missing topics with ``config``'s settings; check that steps and runs match.

    Existing topics are left as they are (their configs are not altered). Raises
    :class:`TopicMismatch` when the steps and runs topics end up with different partition counts
    (``schemas.check_copartitioned``).
    """
    settings = config.settings()
    admin = _admin(kafka, timeout_s)
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
        raise TopicError(f"cannot ensure topics on {kafka.bootstrap_servers}: {exc}") from exc
    finally:
        await _close(admin)
    counts = await _described(kafka, list(settings), timeout_s)
    try:
        schemas.check_copartitioned(counts, config.steps, config.runs)
    except schemas.ContractError as exc:
        raise TopicMismatch(str(exc)) from exc
    return {n: TopicState(name=n, partitions=counts[n], created=n in created) for n in settings}


async def _described(
    kafka: schemas.KafkaConnection, names: list[str], timeout_s: float
) -> dict[str, int]:
    """Partition counts of ``names`` once every one of them is in the metadata."""

    async def all_visible() -> dict[str, int]:
        counts = await describe_topics(kafka, names, timeout_s=timeout_s)
        missing = [n for n in names if n not in counts]
        if missing:
            raise _NotVisibleYet(f"topics not visible after creation: {', '.join(missing)}")
        return counts

    return await schemas.retry_async(
        all_visible,
        policy=schemas.RetryPolicy(
            initial_seconds=0.1,
            maximum_seconds=1.0,
            deadline_seconds=timeout_s,
            describe="topic metadata after create",
        ),
    )


async def _close(admin: AIOKafkaAdminClient) -> None:
    try:
        await asyncio.wait_for(admin.close(), 5.0)
    except (TimeoutError, KafkaError, OSError) as exc:
        log.debug("admin client close: %s", exc)
