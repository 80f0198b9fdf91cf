"""Sidecar decisions over HTTP, and what a served sidecar costs a Temporal worker.

1. Decision latency of the kernel-shaped mediated ``POST /v1/evaluate`` (body: the capability
   token, ``tool_server``, ``tool_name``, ``parameters``) over loopback HTTP, one pooled
   ``httpx.AsyncClient`` (TCP_NODELAY), after a warm-up: ``decisions`` sequential requests, then
   the same number from 8 concurrent callers, repetitions interleaved between the servers.
   Servers, each a child process:

   - ours: ``python -m chio_receipts sidecar serve --data-dir DIR`` (durable receipt log);
   - the Chio kernel's sidecar binary (``$CHIO_CACHE_DIR/kernel/bin/chio-kernel-sidecar``, built
     by ``make kernel``) with ``--ephemeral-receipts``: with a durable receipt store the kernel
     0.1.2 denies every side-effecting evaluation (durable admission without an atomic admission
     participant, see docs/CHIO_PROTOCOL.md), so only the ephemeral mode has an allow path. The
     durable mode is measured too, sequentially, as its deny path. Absent binary: skipped.

   Every request is in scope, so the headline figures are all allows; the allow/deny mix is
   reported per block.
2. Activities/s on the real Temporal dev server: the interceptor benchmark's workflows on a worker
   whose interceptor decides through ``HttpSidecar`` to our served sidecar (the no-op sink, so
   Kafka is out of the picture), vs the same workflows on a worker with no interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from temporalio.worker import Worker

from bench._common import Size, percentiles
from bench._env import Env
from bench._workflows import BenchWorkflow, bench_step
from bench.interceptor import NullSink, _interceptor, _run_workflows
from chio_receipts.interceptor import ChioActivityInterceptor, HttpSidecar, WorkflowGrant

__all__ = ["kernel_binary", "run"]

REPO = Path(__file__).resolve().parent.parent
# A throwaway bearer token for child processes bound to loopback for the run.
TOKEN = "bench-sidecar-control-token"  # noqa: S105
TOOL_SERVER = "temporal"
TOOL = "charge_card"
PARAMETERS = {"order_id": "o-123456", "amount_cents": 12_500, "currency": "EUR", "items": [1, 2]}
CONCURRENCY = 8
START_TIMEOUT_S = 60.0


def kernel_binary() -> Path:
    """Where ``make kernel`` puts the kernel's sidecar (``$CHIO_CACHE_DIR``, default .cache)."""
    cache = Path(os.environ.get("CHIO_CACHE_DIR", REPO / ".cache"))
    return cache / "kernel" / "bin" / "chio-kernel-sidecar"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _wait_ready(url: str, proc: asyncio.subprocess.Process) -> bool:
    """Poll ``/chio/live`` until it answers 200 (True) or the process exits (False)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(base_url=url, timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/chio/live")).status_code == 200:
                    return True
            await asyncio.sleep(0.1)
    raise TimeoutError(f"the sidecar at {url} did not become live in {START_TIMEOUT_S:.0f}s")


@contextlib.asynccontextmanager
async def serve_on_free_port(
    argv_for: Callable[[int], list[str]], log_path: Path, what: str
) -> AsyncIterator[str]:
    """A sidecar child process (``argv_for(port)``) on a free loopback port, its output
    appended to ``log_path``; yields its base URL once it is live, stops it on exit."""
    log = log_path.open("ab")
    try:
        for attempt in range(3):
            port = _free_port()
            proc = await asyncio.create_subprocess_exec(
                *argv_for(port),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                if await _wait_ready(url, proc):
                    yield url
                    return
            finally:
                await _stop(proc)
            # The port was picked then bound: another process may have taken it in between.
            if attempt == 2:
                raise RuntimeError(f"{what} did not start (exit {proc.returncode})")
    finally:
        log.close()


@contextlib.asynccontextmanager
async def serve_ours(data_dir: Path) -> AsyncIterator[str]:
    """Our sidecar as a child process on a free loopback port; yields its base URL."""

    def argv(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "chio_receipts",
            "sidecar",
            "serve",
            "--data-dir",
            str(data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--token",
            TOKEN,
            "--log-level",
            "warning",
        ]

    log_path = data_dir.parent / f"{data_dir.name}.log"
    async with serve_on_free_port(argv, log_path, "our sidecar") as url:
        yield url


@contextlib.asynccontextmanager
async def serve_kernel(state_dir: Path, *, ephemeral: bool) -> AsyncIterator[str]:
    """The kernel's sidecar binary as a child process (it picks its port); yields its URL."""
    log = (state_dir.parent / f"{state_dir.name}.log").open("ab")
    proc = await asyncio.create_subprocess_exec(
        str(kernel_binary()),
        "--state-dir",
        str(state_dir),
        "--listen",
        "127.0.0.1:0",
        "--ephemeral-receipts" if ephemeral else "--durable-receipts",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        env={**os.environ, "CHIO_SIDECAR_CONTROL_TOKEN": TOKEN},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)).decode()
        if "listening on " not in line:
            raise RuntimeError(f"the kernel's sidecar did not start: {line!r}")
        url = line.rsplit("listening on ", 1)[1].strip()
        if not await _wait_ready(url, proc):
            raise RuntimeError(f"the kernel's sidecar exited ({proc.returncode})")
        yield url
    finally:
        await _stop(proc)
        log.close()


def _client(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    transport = httpx.AsyncHTTPTransport(
        limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    )
    # Our sidecar takes evaluations from a credential only (the kernel ignores the header there).
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.AsyncClient(base_url=url, timeout=30, transport=transport, headers=headers)


async def _mint(http: httpx.AsyncClient) -> dict[str, Any]:
    answer = await http.post(
        "/v1/capabilities/mint",
        json={
            "subject": "svc-bench",
            "scopes": [f"tool:{TOOL_SERVER}:{TOOL}:invoke"],
            "ttl_seconds": 3600,
        },
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    answer.raise_for_status()
    token: dict[str, Any] = answer.json()["capability"]
    return token


def _verdict(answer: httpx.Response) -> str:
    if answer.status_code != 200:
        return f"http_{answer.status_code}"
    status = answer.json().get("status")
    return {"authorized": "allow", "deny": "deny"}.get(status, f"status_{status}")


async def _block(
    http: httpx.AsyncClient, body: dict[str, Any], n: int, concurrency: int
) -> tuple[list[float], float, Counter[str]]:
    """``n`` evaluations from ``concurrency`` sequential callers: latencies (ms), requests/s
    over the block, and the verdicts."""
    latencies: list[float] = []
    mix: Counter[str] = Counter()
    perf = time.perf_counter_ns

    async def caller(count: int) -> None:
        for _ in range(count):
            t0 = perf()
            answer = await http.post("/v1/evaluate", json=body)
            verdict = _verdict(answer)
            latencies.append((perf() - t0) / 1e6)
            mix[verdict] += 1

    per = max(1, n // concurrency)
    t0 = time.perf_counter()
    await asyncio.gather(*(caller(per) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return latencies, per * concurrency / elapsed, mix


class _Target:
    """One served sidecar under measurement: its client, body, and the samples so far."""

    def __init__(self, url: str) -> None:
        self.http = _client(url)
        self.body: dict[str, Any] = {}
        self.samples: dict[int, list[float]] = {}
        self.rates: dict[int, list[float]] = {}
        self.mix: dict[int, Counter[str]] = {}

    async def prepare(self, warmup: int) -> None:
        token = await _mint(self.http)
        self.body = {
            "capability": token,
            "tool_server": TOOL_SERVER,
            "tool_name": TOOL,
            "parameters": PARAMETERS,
        }
        await _block(self.http, self.body, warmup, 1)

    async def measure(self, n: int, concurrency: int) -> None:
        lat, rate, mix = await _block(self.http, self.body, n, concurrency)
        self.samples.setdefault(concurrency, []).extend(lat)
        self.rates.setdefault(concurrency, []).append(rate)
        self.mix.setdefault(concurrency, Counter()).update(mix)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c, lat in self.samples.items():
            name = "sequential" if c == 1 else f"concurrency_{c}"
            out[name] = {
                "latency_ms": {**percentiles(lat), "mean": statistics.fmean(lat)},
                "requests_per_s": statistics.median(self.rates[c]),
                "requests_per_s_per_rep": self.rates[c],
                "mix": dict(self.mix[c]),
                "all_allow": set(self.mix[c]) == {"allow"},
            }
        return out


async def bench_decisions(size: Size, scratch: Path) -> dict[str, Any]:
    """Latency and requests/s of the mediated evaluate, ours vs the kernel's binary."""
    n = size.decisions
    warmup = min(200, n)
    reps = max(1, min(size.reps, 3))
    out: dict[str, Any] = {
        "route": "POST /v1/evaluate, kernel body (capability token, tool_server, tool_name, "
        "parameters), in scope",
        "client": "one pooled httpx.AsyncClient over loopback, TCP_NODELAY",
        "requests_per_block": n,
        "warmup": warmup,
        "reps": reps,
        "concurrency": [1, CONCURRENCY],
    }
    binary = kernel_binary()
    kernel_reason = None if os.access(binary, os.X_OK) else "chio-kernel-sidecar is not built"
    async with contextlib.AsyncExitStack() as stack:
        targets: dict[str, _Target] = {}
        url = await stack.enter_async_context(serve_ours(scratch / "ours"))
        targets["ours"] = _Target(url)
        if kernel_reason is None:
            try:
                url = await stack.enter_async_context(
                    serve_kernel(scratch / "kernel", ephemeral=True)
                )
                targets["kernel"] = _Target(url)
            except (RuntimeError, TimeoutError, OSError) as exc:
                kernel_reason = f"the kernel's sidecar did not start: {exc}"
        for target in targets.values():
            stack.push_async_callback(target.http.aclose)
            await target.prepare(warmup)
        for _ in range(reps):  # interleaved: load from elsewhere hits both servers alike
            for concurrency in (1, CONCURRENCY):
                for target in targets.values():
                    await target.measure(n, concurrency)
        out["ours"] = {
            "server": "python -m chio_receipts sidecar serve --data-dir (durable receipt log)",
            **targets["ours"].report(),
        }
        if "kernel" in targets:
            out["kernel"] = {
                "server": "chio-kernel-sidecar --ephemeral-receipts",
                **targets["kernel"].report(),
            }
    if kernel_reason is not None:
        out["kernel"] = {"skipped": kernel_reason}
        out["kernel_durable"] = {"skipped": kernel_reason}
        return out
    # The kernel's default (durable) mode: its deny path, sequential, one repetition.
    async with serve_kernel(scratch / "kernel-durable", ephemeral=False) as url:
        durable = _Target(url)
        try:
            await durable.prepare(warmup)
            await durable.measure(n, 1)
        finally:
            await durable.http.aclose()
    out["kernel_durable"] = {
        "server": "chio-kernel-sidecar (durable receipts, its default)",
        "note": "0.1.2 denies every side-effecting evaluation with a durable receipt store",
        **durable.report(),
    }
    ours_p50 = out["ours"]["sequential"]["latency_ms"]["p50"]
    out["ratio_p50_ours_vs_kernel"] = ours_p50 / out["kernel"]["sequential"]["latency_ms"]["p50"]
    return out


async def _worker_rate(env: Env, size: Size, gate: ChioActivityInterceptor | None) -> float:
    task_queue = env.unique("bench-sc-tq")
    async with Worker(
        env.temporal_client,
        task_queue=task_queue,
        workflows=[BenchWorkflow],
        activities=[bench_step],
        interceptors=[gate] if gate is not None else [],
        max_concurrent_activities=200,
    ):
        return await _run_workflows(env, task_queue, size)


async def bench_worker_throughput(size: Size, env: Env, url: str) -> dict[str, Any]:
    """Activities/s with the interceptor deciding through HttpSidecar vs no interceptor."""
    async with HttpSidecar(url, token=TOKEN) as sidecar:
        token = await sidecar.create_capability("svc-bench", ["bench_step"], 3600)
        grant = WorkflowGrant(workflow_id="*", token=token)

        def make() -> ChioActivityInterceptor:
            return _interceptor(sidecar, grant, NullSink())

        small = Size.of("small")
        await _worker_rate(env, small, None)  # warm the server, the worker code, the pool
        await _worker_rate(env, small, make())
        rates: dict[str, list[float]] = {"without_interceptor": [], "http_sidecar": []}
        allowed = 0
        for _ in range(max(1, min(size.reps, 3))):  # interleaved
            rates["without_interceptor"].append(await _worker_rate(env, size, None))
            gate = make()
            rates["http_sidecar"].append(await _worker_rate(env, size, gate))
            allowed = gate.stats.allowed
    base = statistics.median(rates["without_interceptor"])
    ours = statistics.median(rates["http_sidecar"])
    return {
        "workflows": size.workflows,
        "activities_per_workflow": size.activities_per_workflow,
        "sidecar": "HttpSidecar to our served sidecar (child process, durable receipt log)",
        "sink": "no-op (NullSink): receipts are dropped, Kafka is not involved",
        "activities_per_s": {"without_interceptor": base, "http_sidecar": ours},
        "runs": rates,
        "receipts_allowed_last_rep": allowed,
        "ratio_vs_without": ours / base,
        "target_ratio": 0.9,
        "target_met": ours / base >= 0.9,
    }


async def run(size: Size, env: Env | None) -> dict[str, Any]:
    """Both sidecar benchmarks (the Temporal one only with a stack)."""
    async with contextlib.AsyncExitStack() as stack:
        if env is not None:
            scratch = env.directory("sidecar")
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sc-")))
        out: dict[str, Any] = {"decisions": await bench_decisions(size, scratch)}
        if env is not None:
            async with serve_ours(scratch / "worker") as url:
                out["worker_throughput"] = await bench_worker_throughput(size, env, url)
        return out
