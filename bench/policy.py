"""What the sidecar's guards cost a decision: constraints, a 50-policy Cedar set, (a budget).

Every figure is a ratio to the same run's baseline: the same sidecar with no guard deciding the
same in-scope call (``tool_server``, ``tool_name``, ``parameters`` as in ``bench.sidecar``).

1. In process: the guards alone (``run_guards`` on one call) and a whole mediated decision
   (``LocalSidecar.chio_evaluate``: token checks, scope, guards, one Ed25519 signature), in µs,
   medians of interleaved repetitions.
2. Over HTTP at a fixed 500 evaluations/s (open loop: each request is sent on its schedule
   whether or not the earlier ones were answered, so a slow server shows as latency, not as a
   lower rate): p50/p99 of the mediated ``POST /v1/evaluate`` against a served sidecar, one
   child process per configuration, repetitions interleaved; at full size also at 100/s, below
   the rate our served sidecar saturates at on a 2-core machine, where the ratios are the
   guards' cost rather than queueing. The load is sent by a minimal HTTP/1.1 client on raw
   asyncio streams (``httpx`` costs the sending process too much CPU to hold 500/s here).
   Where ``make kernel`` built the Chio kernel's sidecar (``chio-kernel-sidecar
   --ephemeral-receipts``), it is measured in the same run at the same rates, same body.

Configurations: ``baseline`` (no guard), ``constraints`` (the constraints guard; the grant
carries five constraints, all satisfied: ``max_length``, ``regex_match``, ``max_args_size``,
``memory_write_deny_patterns``, ``custom``), ``cedar_50`` (the Cedar guard with 50 forbid
policies over principal, resource, context and arguments, none applying), and ``budget`` (left
for the budget guard: reported as skipped until it exists). Every call is allowed in every
configuration; the allow/deny mix is reported.

``python -m bench.policy serve CONFIG PORT`` is the served sidecar of one configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from bench._common import Size, percentiles
from bench._env import Env
from bench.sidecar import (
    PARAMETERS,
    TOOL,
    TOOL_SERVER,
    kernel_binary,
    serve_kernel,
    serve_on_free_port,
)

__all__ = ["CONFIGS", "run"]

RATE = 500  # evaluations per second, open loop: the rate
REFERENCE_RATE = 100  # below what our served sidecar saturates at on the 2-core VM
_KEEPALIVE_REUSE_S = 3.0  # uvicorn's keep-alive timeout is 5 s (sidecar._server)
CONFIGS = ("baseline", "constraints", "cedar_50")
CONSTRAINTS = [
    {"type": "max_length", "value": 64},
    {"type": "regex_match", "value": "^o-[0-9]+$"},
    {"type": "max_args_size", "value": 4096},
    {"type": "memory_write_deny_patterns", "value": ["^forbidden"]},
    {"type": "custom", "value": ["currency", "EUR"]},
]


def cedar_policies(n: int = 50) -> str:
    """``n`` forbid policies, spread over the request's parts, none applying to the call."""
    shapes = (
        'principal.task_queue == "quarantine-{i}" && context.attempt > {i}',
        'resource.server == "blocked-{i}" || resource.name == "blocked_tool_{i}"',
        'context.args.hasTag("order_id") && context.args.getTag("order_id") like "blocked-{i}*"',
        'context.numbers.hasTag("amount_cents") && context.numbers.getTag("amount_cents") > {big}',
        'principal.workflow_type == "Forbidden{i}" && context.is_local',
    )
    out = []
    for i in range(n):
        cond = shapes[i % len(shapes)].format(i=i, big=10_000_000 + i)
        out.append(f'@id("bench-{i}")\nforbid(principal, action, resource) when {{ {cond} }};\n')
    return "".join(out)


def _guards(config: str, scratch: Path) -> tuple[list[Any], str]:
    from chio_receipts.sidecar import CedarGuard, CedarPolicySet, ConstraintGuard, policy_hash

    guards: list[Any] = []
    if config == "constraints":
        guards = [ConstraintGuard()]
    elif config == "cedar_50":
        path = scratch / "bench-50.cedar"
        path.write_text(cedar_policies(50))
        guards = [CedarGuard(CedarPolicySet.load(path))]
    elif config != "baseline":
        raise ValueError(f"unknown configuration {config!r}")
    return guards, policy_hash(guards)


def _scope(config: str) -> dict[str, Any]:
    grant: dict[str, Any] = {"server_id": TOOL_SERVER, "tool_name": TOOL, "operations": ["invoke"]}
    if config == "constraints":
        grant["constraints"] = CONSTRAINTS
    return {"grants": [grant]}


# -- in process -------------------------------------------------------------------------------


def _time_us(fn: Callable[[], object], n: int) -> float:
    perf = time.perf_counter_ns
    t0 = perf()
    for _ in range(n):
        fn()
    return (perf() - t0) / n / 1000


def bench_in_process(size: Size, scratch: Path) -> dict[str, Any]:
    """µs per guard check and per whole decision, per configuration (medians of reps)."""
    from chio_receipts.sidecar import LocalSidecar
    from chio_receipts.sidecar._guards import CallContext, run_guards

    n = max(200, size.decisions)
    reps = max(3, min(size.reps, 5))
    setups: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
    mixes: dict[str, Counter[str]] = {}
    for config in CONFIGS:
        guards, digest = _guards(config, scratch)
        side = LocalSidecar(guards=guards, policy_hash=digest)
        token = side.chio_mint("svc-bench", _scope(config), 3600)
        grant = token["scope"]["grants"][0]
        call = CallContext(
            capability_id=token["id"],
            tool_server=TOOL_SERVER,
            tool=TOOL,
            parameters=PARAMETERS,
            grant=grant,
            grant_index=0,
            token=token,
            request_id="bench-request",
        )
        mix: Counter[str] = Counter()

        def decide(side: LocalSidecar = side, token: dict[str, Any] = token) -> object:
            return side.chio_evaluate(
                token=token, tool_server=TOOL_SERVER, tool_name=TOOL, parameters=PARAMETERS
            )

        def check(guards: list[Any] = guards, call: CallContext = call) -> object:
            return run_guards(guards, call)

        first = side.chio_evaluate(
            token=token, tool_server=TOOL_SERVER, tool_name=TOOL, parameters=PARAMETERS
        )
        mix["allow" if first.allowed else "deny"] += 1
        mixes[config] = mix
        setups[config] = (check, decide)
        for _ in range(50):  # warm up
            check()
            decide()
    guards_us: dict[str, list[float]] = {c: [] for c in CONFIGS}
    decision_us: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(reps):  # interleaved
        for config, (check_fn, decide_fn) in setups.items():
            guards_us[config].append(_time_us(check_fn, n))
            decision_us[config].append(_time_us(decide_fn, max(50, n // 4)))
    out: dict[str, Any] = {"calls_per_rep": n, "reps": reps}
    out["cedar_50_parse"] = _parse_cost(scratch, max(50, n // 4))
    base = statistics.median(decision_us["baseline"])
    for config in CONFIGS:
        g = statistics.median(guards_us[config])
        d = statistics.median(decision_us[config])
        out[config] = {
            "guards_us": g,
            "decision_us": d,
            "decision_ratio": d / base,
            "first_verdict": dict(mixes[config]),
        }
    return out


def _parse_cost(scratch: Path, n: int) -> dict[str, float]:
    """µs per Cedar authorization of one call with the 50-policy set parsed once (the guard's
    way) and with its text parsed on every call (``is_authorized`` given the text)."""
    import cedarpy

    from chio_receipts.sidecar._cedar import CedarPolicySet, cedar_request
    from chio_receipts.sidecar._guards import CallContext

    text = (scratch / "bench-50.cedar").read_text()
    parsed = CedarPolicySet.load(scratch / "bench-50.cedar").policies
    call = CallContext(capability_id="c", tool_server=TOOL_SERVER, tool=TOOL, parameters=PARAMETERS)
    request, entities = cedar_request(call)
    whole = "permit(principal, action, resource);\n" + text
    once = _time_us(lambda: cedarpy.is_authorized(request, parsed, entities), n)
    every = _time_us(lambda: cedarpy.is_authorized(request, whole, entities), n)
    return {"parsed_once_us": once, "parsed_every_call_us": every, "ratio": every / once}


# -- over HTTP --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_config(config: str, scratch: Path) -> AsyncIterator[str]:
    """One configuration's sidecar as a child process on a free loopback port."""

    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "bench.policy", "serve", config, str(port), str(scratch)]

    log_path = scratch / f"policy-{config}.log"
    async with serve_on_free_port(argv, log_path, f"the {config} sidecar") as url:
        yield url


class _RawClient:
    """A minimal HTTP/1.1 keep-alive client for the open loop (``httpx`` costs this process
    more CPU per request than the 2 ms a request may take at 500/s on a 2-core machine): the
    request bytes are built once, a response is read by its ``Content-Length``."""

    def __init__(self, url: str, path: str, body: dict[str, Any]) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        payload = json.dumps(body, separators=(",", ":")).encode()
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.opened: list[asyncio.StreamWriter] = []

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.idle:
            reader, writer, since = self.idle.pop()
            # The server closes a keep-alive connection idle for 5 s: never reuse one near that.
            if time.monotonic() - since < _KEEPALIVE_REUSE_S:
                return reader, writer
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened.append(writer)
        return reader, writer

    async def evaluate(self) -> str:
        """One request: ``allow``, ``deny`` or ``http_<status>``."""
        reader, writer = await self._connection()
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await reader.readexactly(length)
        self.idle.append((reader, writer, time.monotonic()))
        if status != 200:
            return f"http_{status}"
        if b'"status":"authorized"' in body:
            return "allow"
        return "deny" if b'"status":"deny"' in body else "other"

    async def reset(self) -> None:
        """Close every connection (the server drops keep-alive connections idle for 5 s)."""
        await self.aclose()
        self.idle, self.opened = [], []

    async def aclose(self) -> None:
        for writer in self.opened:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _paced(
    client: _RawClient, seconds: float, rate: int = RATE
) -> tuple[list[float], float, Counter[str], int]:
    """``rate`` evaluations/s for ``seconds``, open loop: latencies (ms), the rate achieved,
    the verdicts, and how many sends started more than 5 ms late."""
    n = max(1, int(rate * seconds))
    latencies: list[float] = []
    mix: Counter[str] = Counter()
    late = 0
    perf = time.perf_counter
    await client.reset()

    async def one() -> None:
        t0 = perf()
        try:
            mix[await client.evaluate()] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            mix[type(exc).__name__] += 1
        latencies.append((perf() - t0) * 1000)

    tasks = []
    start = perf()
    for i in range(n):
        due = start + i / rate
        delay = due - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            late += 1
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    elapsed = perf() - start
    return latencies, n / elapsed, mix, late


async def _mint_token(http: httpx.AsyncClient, config: str) -> dict[str, Any]:
    if config == "kernel":
        answer = await http.post(
            "/v1/capabilities/mint",
            json={
                "subject": "svc-bench",
                "scopes": [f"tool:{TOOL_SERVER}:{TOOL}:invoke"],
                "ttl_seconds": 3600,
            },
            headers={"Authorization": "Bearer bench-sidecar-control-token"},
        )
        answer.raise_for_status()
        token: dict[str, Any] = answer.json()["capability"]
        return token
    answer = await http.post(
        "/v1/capabilities",
        json={"subject": "svc-bench", "scope": _scope(config), "ttl_seconds": 3600},
    )
    answer.raise_for_status()
    minted: dict[str, Any] = answer.json()
    return minted


async def bench_http(size: Size, scratch: Path) -> dict[str, Any]:
    """p50/p99 at ``RATE``/s (and, full size, at ``REFERENCE_RATE``/s) per configuration and
    the kernel, ratios to the baseline at the same rate."""
    seconds = 2.0 if size.name == "small" else 10.0
    reps = max(1, min(size.reps, 3))
    rates = (RATE,) if size.name == "small" else (RATE, REFERENCE_RATE)
    out: dict[str, Any] = {
        "route": "POST /v1/evaluate, kernel body (capability token, tool_server, tool_name, "
        "parameters), in scope",
        "rates_per_s": list(rates),
        "seconds_per_block": seconds,
        "reps": reps,
        "client": "open loop, raw HTTP/1.1 keep-alive connections over loopback, TCP_NODELAY",
    }
    binary = kernel_binary()
    kernel_reason = None if os.access(binary, os.X_OK) else "chio-kernel-sidecar is not built"
    blocks: dict[tuple[int, str], list[dict[str, Any]]] = {}
    mixes: dict[tuple[int, str], Counter[str]] = {}
    async with contextlib.AsyncExitStack() as stack:
        targets: dict[str, _RawClient] = {}
        names: list[str] = list(CONFIGS)
        if kernel_reason is None:
            names.append("kernel")
        for name in names:
            if name == "kernel":
                try:
                    url = await stack.enter_async_context(
                        serve_kernel(scratch / "policy-kernel", ephemeral=True)
                    )
                except (RuntimeError, TimeoutError, OSError) as exc:
                    kernel_reason = f"the kernel's sidecar did not start: {exc}"
                    continue
            else:
                url = await stack.enter_async_context(serve_config(name, scratch))
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                token = await _mint_token(http, name)
            body = {
                "capability": token,
                "tool_server": TOOL_SERVER,
                "tool_name": TOOL,
                "parameters": PARAMETERS,
            }
            client = _RawClient(url, "/v1/evaluate", body)
            stack.push_async_callback(client.aclose)
            await _paced(client, 0.5)  # warm up
            targets[name] = client
        for _ in range(reps):  # interleaved: load from elsewhere hits every server alike
            for target_rate in rates:
                for name, client in targets.items():
                    lat, achieved, mix, late = await _paced(client, seconds, target_rate)
                    p = percentiles(lat)
                    blocks.setdefault((target_rate, name), []).append(
                        {
                            "p50": p["p50"],
                            "p99": p["p99"],
                            "rate_per_s": achieved,
                            "late_sends": late,
                        }
                    )
                    mixes.setdefault((target_rate, name), Counter()).update(mix)

    def median(key: tuple[int, str], field: str) -> float:
        return float(statistics.median(float(b[field]) for b in blocks[key]))

    for target_rate in rates:
        section: dict[str, Any] = {}
        base = (target_rate, "baseline")
        for name in targets:
            key = (target_rate, name)
            section[name] = {
                "p50_ms": median(key, "p50"),
                "p99_ms": median(key, "p99"),
                "p50_ratio": median(key, "p50") / median(base, "p50"),
                "p99_ratio": median(key, "p99") / median(base, "p99"),
                "achieved_rate_per_s": median(key, "rate_per_s"),
                "blocks": blocks[key],
                "mix": dict(mixes[key]),
                "all_allow": set(mixes[key]) == {"allow"},
            }
        if kernel_reason is not None:
            section["kernel"] = {"skipped": kernel_reason}
        out[f"at_{target_rate}_per_s"] = section
    return out


async def run(size: Size, env: Env | None) -> dict[str, Any]:
    """The policy benchmark (needs no stack)."""
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
        scratch = Path(tmp)
        return {
            "in_process": bench_in_process(size, scratch),
            "http": await bench_http(size, scratch),
            "budget": {"skipped": "measured by the budgets section (bench/budgets.py)"},
        }


def _serve(config: str, port: int, scratch: Path) -> None:
    from chio_receipts.sidecar import LocalSidecar, serve_sidecar

    guards, digest = _guards(config, scratch)
    side = LocalSidecar(guards=guards, policy_hash=digest)
    asyncio.run(serve_sidecar(side, host="127.0.0.1", port=port, log_level="warning"))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        _serve(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        from bench._common import Size as _Size

        doc = asyncio.run(run(_Size.of(sys.argv[1] if len(sys.argv) > 1 else "small"), None))
        print(json.dumps(doc, indent=2, default=str))
