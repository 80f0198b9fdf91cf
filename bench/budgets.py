"""What a budget costs a decision: in process, and over HTTP at 500 evaluations/s.

Two capabilities with one grant each on the same tool: the *baseline* grant has no budget (and
the sidecar has no guard), the *budget* grant has ``max_invocations``,
``max_cost_per_invocation`` and ``max_total_cost`` (limits far above what the run uses, so
every call is allowed and charged: one hold per decision, committed to the store before the
answer). Both are decided on the kernel-shaped mediated ``POST /v1/evaluate``.

1. **In process**: ``LocalSidecar.chio_evaluate`` on a file-backed store (the served sidecar's
   durability: a hold is committed with ``synchronous=FULL``), ``decisions`` calls per block,
   blocks of the two capabilities interleaved over ``reps`` repetitions; the median time of a
   decision (µs) and its ratio to the baseline.
2. **HTTP**: our sidecar served as a child process (``chio-receipts sidecar serve``, durable
   data directory), an open-loop client sending 500 evaluations/s (one request every 2 ms,
   each on its own task; latency counted from the request's scheduled time, so a slow answer
   delays nothing and is not hidden), blocks of the two capabilities interleaved; p50/p99 (ms)
   and their ratios to the baseline. The same at 100/s, below what one served sidecar
   sustains on a small machine, so the budget's own cost is seen apart from queueing.

The Chio kernel's sidecar is not measured here: its mint route takes scope strings, which
cannot carry a budget, so it cannot be given a budgeted grant over HTTP.

    python -m bench.budgets [--size small|full] [--out FILE] [--in-process-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench._common import Size, machine, percentiles
from bench._env import Env
from bench.sidecar import PARAMETERS, TOKEN, TOOL, TOOL_SERVER, _verdict, serve_ours
from chio_receipts.sidecar import LocalSidecar, SidecarStore

__all__ = ["RATE", "UNSATURATED_RATE", "run"]

RATE = 500
"""Evaluations per second of the HTTP blocks (the issue's figure)."""
UNSATURATED_RATE = 100
"""A second rate, under what one served sidecar sustains on a small machine, so the budget's
cost is seen apart from queueing."""

_BIG = 10**15
BASELINE_GRANT: dict[str, Any] = {
    "server_id": TOOL_SERVER,
    "tool_name": TOOL,
    "operations": ["invoke"],
}
BUDGET_GRANT: dict[str, Any] = {
    **BASELINE_GRANT,
    "max_invocations": 2**32 - 1,
    "max_cost_per_invocation": {"units": 125, "currency": "EUR"},
    "max_total_cost": {"units": _BIG, "currency": "EUR"},
}


def _ratio(value: float, baseline: float) -> float:
    return round(value / baseline, 3) if baseline else float("nan")


# -- in process ----------------------------------------------------------------------------------


def bench_in_process(size: Size, scratch: Path | None) -> dict[str, Any]:
    """Median µs per mediated decision, baseline vs budget, on a file-backed store (in
    ``scratch``) or, with ``scratch`` None, on SQLite's ``:memory:`` (no fsync: what the
    budget costs besides the durable commit of its hold)."""
    store = SidecarStore(scratch / "in-process.db" if scratch is not None else ":memory:")
    side = LocalSidecar(store=store)
    tokens = {
        "baseline": side.chio_mint("svc-bench", {"grants": [BASELINE_GRANT]}, 3600),
        "budget": side.chio_mint("svc-bench", {"grants": [BUDGET_GRANT]}, 3600),
    }
    n = max(size.decisions, 50)
    per_rep: dict[str, list[float]] = {name: [] for name in tokens}
    mix: dict[str, Counter[str]] = {name: Counter() for name in tokens}

    def block(name: str, count: int) -> float:
        token = tokens[name]
        t0 = time.perf_counter_ns()
        for _ in range(count):
            decision = side.chio_evaluate(
                token=token, tool_server=TOOL_SERVER, tool_name=TOOL, parameters=PARAMETERS
            )
            mix[name]["allow" if decision.allowed else "deny"] += 1
        return (time.perf_counter_ns() - t0) / count / 1000

    for name in tokens:  # warm-up
        block(name, 20)
    for name in tokens:
        mix[name].clear()
    for _ in range(3):
        for name in tokens:
            per_rep[name].append(block(name, n))
    store.close()
    median = {name: statistics.median(v) for name, v in per_rep.items()}
    return {
        "decisions_per_block": n,
        "decision_us": {name: round(v, 1) for name, v in median.items()},
        "decision_us_per_rep": per_rep,
        "ratio_budget_to_baseline": _ratio(median["budget"], median["baseline"]),
        "mix": {name: dict(c) for name, c in mix.items()},
    }


# -- over HTTP -------------------------------------------------------------------------------------


def _http(url: str) -> httpx.AsyncClient:
    # An open loop may have a few requests in flight: more connections than bench.sidecar's 8.
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    transport = httpx.AsyncHTTPTransport(
        limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    )
    # The credential on every request: where evaluations need one, both blocks present it.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.AsyncClient(base_url=url, timeout=30, transport=transport, headers=headers)


async def _mint(http: httpx.AsyncClient, grant: dict[str, Any]) -> dict[str, Any]:
    """A kernel-format token with ``grant`` (chio-sdk-python's mint body: a scope object)."""
    answer = await http.post(
        "/v1/capabilities",
        json={"subject": "svc-bench", "scope": {"grants": [grant]}, "ttl_seconds": 3600},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    answer.raise_for_status()
    token: dict[str, Any] = answer.json()
    return token


async def _open_loop(
    http: httpx.AsyncClient, body: dict[str, Any], rate: int, seconds: float
) -> tuple[list[float], Counter[str], float]:
    """``rate`` requests/s for ``seconds``: latencies (ms, from each scheduled send), verdicts,
    and the rate achieved."""
    interval = 1.0 / rate
    n = int(rate * seconds)
    latencies: list[float] = []
    mix: Counter[str] = Counter()
    perf = time.perf_counter

    async def one(scheduled: float) -> None:
        for attempt in (1, 2):
            try:
                answer = await http.post("/v1/evaluate", json=body)
                break
            except (httpx.ReadError, httpx.RemoteProtocolError):
                # A kept-alive connection the server closed (uvicorn's keep-alive timeout)
                # between two requests: the request never reached it, send it again.
                if attempt == 2:
                    mix["transport_error"] += 1
                    return
        latencies.append((perf() - scheduled) * 1000)
        mix[_verdict(answer)] += 1

    tasks = []
    start = perf()
    for i in range(n):
        scheduled = start + i * interval
        delay = scheduled - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    return latencies, mix, n / (perf() - start)


async def bench_http(size: Size, scratch: Path, rate: int = RATE) -> dict[str, Any]:
    """p50/p99 of the mediated evaluate at ``rate``/s, baseline vs budget, on a served
    sidecar (a fresh one per rate)."""
    seconds = 4.0 if size.name == "full" else 1.0
    reps = 3 if size.name == "full" else 2
    async with serve_ours(scratch / f"served-{rate}") as url, _http(url) as http:
        bodies = {}
        for name, grant in (("baseline", BASELINE_GRANT), ("budget", BUDGET_GRANT)):
            token = await _mint(http, grant)
            bodies[name] = {
                "capability": token,
                "tool_server": TOOL_SERVER,
                "tool_name": TOOL,
                "parameters": PARAMETERS,
            }
        for body in bodies.values():  # warm-up
            await _open_loop(http, body, RATE, 0.4)
        samples: dict[str, list[float]] = {name: [] for name in bodies}
        rates: dict[str, list[float]] = {name: [] for name in bodies}
        mix: dict[str, Counter[str]] = {name: Counter() for name in bodies}
        for _ in range(reps):
            for name, body in bodies.items():
                lat, got, achieved = await _open_loop(http, body, rate, seconds)
                samples[name].extend(lat)
                mix[name].update(got)
                rates[name].append(round(achieved, 1))
    pct = {name: percentiles(lat) for name, lat in samples.items()}
    return {
        "rate_per_s": rate,
        "seconds_per_block": seconds,
        "reps": reps,
        "latency_ms": pct,
        "achieved_rate_per_s": rates,
        "ratio_budget_to_baseline": {
            "p50": _ratio(pct["budget"]["p50"], pct["baseline"]["p50"]),
            "p99": _ratio(pct["budget"]["p99"], pct["baseline"]["p99"]),
        },
        "mix": {name: dict(c) for name, c in mix.items()},
    }


async def run(size: Size, env: Env | None, *, in_process_only: bool = False) -> dict[str, Any]:
    """Both blocks (no stack needed: the sidecar is started here)."""
    async with contextlib.AsyncExitStack() as stack:
        if env is not None:
            scratch = env.directory("budgets")
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-bu-")))
        out: dict[str, Any] = {
            "in_process": bench_in_process(size, scratch),
            "in_process_memory_store": bench_in_process(size, None),
        }
        if not in_process_only:
            out["http"] = await bench_http(size, scratch, RATE)
            out[f"http_{UNSATURATED_RATE}"] = await bench_http(size, scratch, UNSATURATED_RATE)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="full", choices=["small", "full"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--in-process-only", action="store_true", help="skip the HTTP blocks")
    args = parser.parse_args()
    size = Size.of(args.size)
    found = asyncio.run(run(size, None, in_process_only=args.in_process_only))
    result = {"machine": machine(), "budgets": found}
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
