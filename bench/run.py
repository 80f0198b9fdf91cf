"""Run the benchmarks against the real local stack and write JSON (and the markdown table).

    python -m bench.run [--size small|full] [--only NAME] [--out bench/results/latest.json]

NAME is one of: micro, native, interceptor, outcomes, producer, consumer, memory, e2e, sidecar,
watcher, policy, budgets. The stack (a real Kafka broker and a real Temporal dev server) is
started in a temporary directory and stopped at the end. A full run of everything also rewrites
the generated part of ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._common import Size, machine
from bench._env import Env

__all__ = ["SECTIONS", "main", "run_all"]

_log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parent.parent

Section = Callable[[Size, Env | None], Awaitable[dict[str, Any]]]


# name: needs the stack (each is the module bench.<name> with ``async def run(size, env)``, or
# ``async def section(size, env)`` when its ``run`` is a plain function)
SECTIONS: dict[str, bool] = {
    "micro": False,
    "native": False,
    "interceptor": True,
    "outcomes": True,
    "producer": True,
    "consumer": True,
    "memory": True,
    "e2e": True,
    "sidecar": True,
    "watcher": True,
    "policy": False,
    "budgets": False,
    "native_check": False,
    "native_decode": False,
    "native_gate": False,
}


def _section(name: str) -> Section:
    module = importlib.import_module(f"bench.{name}")
    # A module whose ``run`` is a plain function gives its section as ``section``.
    fn: Section = getattr(module, "section", module.run)
    return fn


@contextlib.asynccontextmanager
async def _stack(scratch: Path) -> AsyncIterator[Env]:
    from temporalio.client import Client

    from chio_receipts.stack import LocalStack, StackConfig, StackError

    for attempt in range(3):
        stack = LocalStack(
            StackConfig(data_dir=scratch / f"stack{attempt}", cache_dir=REPO / ".cache")
        )
        try:
            await stack.start()
            break
        except StackError:
            # Free ports are picked then bound: another process on a shared machine can take
            # one in between. Try again with fresh ports; give up after three attempts.
            stack.stop()
            if attempt == 2:
                raise
            _log.warning("the local stack did not start; retrying with fresh ports")
    try:
        client = await asyncio.wait_for(Client.connect(stack.temporal_address), 60)
        yield Env(kafka_bootstrap=stack.kafka_bootstrap, temporal_client=client, scratch=scratch)
    finally:
        stack.stop()


async def run_all(
    size: Size, names: list[str], *, env: Env | None = None, scratch: Path | None = None
) -> dict[str, Any]:
    """Run ``names`` and return the results document. With ``env`` None and a section that
    needs services, a stack is started under ``scratch``."""
    doc: dict[str, Any] = {
        "size": size.name,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "note": (
            "Medians of repetitions on a shared machine; every figure has its baseline from the "
            "same run."
        ),
        "results": {},
        "errors": {},
    }
    need_stack = any(SECTIONS[n] for n in names)
    async with contextlib.AsyncExitStack() as stack:
        if env is None and need_stack:
            if scratch is None:
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
            env = await stack.enter_async_context(_stack(scratch))
        for name in names:
            fn = _section(name)
            _log.info("benchmark %s (%s)", name, size.name)
            t0 = time.perf_counter()
            try:
                doc["results"][name] = await fn(size, env)
            except Exception as exc:
                _log.exception("benchmark %s failed", name)
                doc["errors"][name] = f"{type(exc).__name__}: {exc}"
            _log.info("benchmark %s done in %.1fs", name, time.perf_counter() - t0)
    doc["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return doc


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--size", choices=("small", "full"), default="small")
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="rewrite the generated table in this file (default: docs/BENCHMARKS.md after a "
        "full run of every benchmark)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("aiokafka", "temporalio", "kafka", "streamer", "chio_receipts", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    names = args.only or list(SECTIONS)
    doc = asyncio.run(run_all(Size.of(args.size), names))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    _log.info("results written to %s", args.out)
    markdown = args.markdown
    if markdown is None and args.size == "full" and args.only is None:
        markdown = REPO / "docs" / "BENCHMARKS.md"
    if markdown is not None:
        from bench.report import update_markdown

        update_markdown(markdown, doc)
        _log.info("table written to %s", markdown)
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
