"""Load test of the HTTP server `python -m nlprnn.serve`: batching on against batching off.

    .venv/bin/python scripts/load_test.py /tmp/bundle-movie --out docs/
    .venv/bin/python scripts/load_test.py BUNDLE --quick --scenarios closed,sigterm --json /tmp/load.json
    .venv/bin/python scripts/load_test.py BUNDLE --texts_per_request 1-8 -- --max_wait_ms 5

writes docs/serving.json, docs/serving.md and docs/serving.png with --out; flags after `--` go to every
server started. Each configuration gets a fresh server, started here as a child process on a free port and
stopped with SIGTERM (it must exit 0): **batching on** (the server's defaults) and **batching off**
(`--max_batch_size 1`), one after the other, never at once. The scenarios, each bounded in time:

1. closed: N clients (`--clients`, a list), each on its own keep-alive connection, send one request, await
   its answer, repeat, for `--duration` seconds after an uncounted warm-up. Texts per request are fixed or
   drawn uniformly from a range (`--texts_per_request 1-8`); texts are drawn (seeded) from the test split of
   `--dataset` or from `--input`. The server's `nlprnn_batch_size` histogram, scraped from /metrics before
   and after, gives the mean batch size of the run.
2. open: Poisson arrivals at fixed rates (`--rates`, requests/s; `auto`: fractions of the batching server's
   closed-loop throughput) for `--duration` seconds each, every arrival an independent request on a pool of
   keep-alive connections that grows up to `--max_connections`; an arrival that finds the pool exhausted is
   counted as client_overflow. Latency runs from the scheduled arrival, so a late client shows up in it.
3. overload (batching server): 0.5x the sustainable rate (its closed-loop throughput) for
   `--baseline_seconds`, 2x for `--overload_seconds`, then 0.5x for `--recovery_seconds`, as one arrival
   stream, sampling the server's RSS every second. Every response must be 200 or 503 and none lost
   (timeouts, resets and closes are lost); it recovered when every request arriving in the second half of
   the recovery (and after the overload's last answer) got 200 and their p99 is back within 2x the
   baseline's.
4. sigterm: closed-loop load, SIGTERM to the server half-way; every request's outcome, the requests in flight
   at the signal, closes without a response (requests the server never read; a client stops using a closed
   connection), the exit code, and the server's final "answered N classify requests" against the client's
   count of 200 responses (they must be equal).

Latency percentiles are over 200 responses; throughput counts the 200 responses that completed inside the
measured window. Every request has a client-side timeout; each HTTP status and each way of getting no
response (timeout, reset, closed, truncated, connect errors) is counted separately. The client is one
single-threaded asyncio process with raw HTTP/1.1 and request bodies encoded up front, so it costs the
shared CPUs little (0.1-0.2 of a core); the server gets `--server_threads` threads (default: every core; its
model threads run one call each and never spin-wait, so the operating system shares the cores with the client
rather than the two fighting over them). The script exits 1 when a correctness check fails (lost or hung
requests, a status other than 200 or 503 under overload, no recovery, a non-zero exit, counts that differ).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASSIFY_PATH = "/v1/classify"
READY_LINE = re.compile(r"nlprnn\.serve: ready on http://(\[[^\]]+\]|[^\s/:]+):(\d+)")
STOPPED_LINE = re.compile(r"nlprnn\.serve: stopped; answered (\d+) classify requests \((\d+) texts\)")
CONFIGS = {"batching_on": [], "batching_off": ["--max_batch_size", "1"]}
CONFIG_TITLES = {"batching_on": "batching on", "batching_off": "batching off"}
SCENARIOS = ("closed", "open", "overload", "sigterm")
# Ways a request can end without a response; each is counted on its own, all of them are "lost".
LOST = ("timeout", "reset", "closed", "truncated", "bad_response", "socket_error", "connect_refused", "connect_error")
AUTO_RATES = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.2)  # fractions of the batching server's closed-loop req/s
QUICK_RATES = (0.25, 0.75)
OVERLOAD_FACTOR, RECOVERY_FACTOR = 2.0, 0.5
RECOVERED_P99_FACTOR, RECOVERED_P99_SLACK_MS = 2.0, 5.0  # recovered: p99 <= 2x the baseline's + 5 ms
# A server needs seconds after an overload to work off its backlog: even the quick run gives it some.
QUICK = {"duration": 2.0, "warmup": 0.5, "baseline_seconds": 2.0, "overload_seconds": 3.0, "recovery_seconds": 8.0}
DEFAULTS = {"duration": 10.0, "warmup": 2.0, "baseline_seconds": 10.0, "overload_seconds": 60.0, "recovery_seconds": 20.0}
REQUEST_POOL = 4096  # request bodies encoded up front, cycled by the clients

Record = tuple[float, float, "int | str", int]  # (start, end, HTTP status or error kind, texts)


# --- statistics -----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile of ascending values, interpolated linearly between ranks (numpy's default)."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def latency_ms(seconds: Iterable[float]) -> dict | None:
    values = sorted(1e3 * s for s in seconds)
    if not values:
        return None
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "max": values[-1], "mean": sum(values) / len(values)}


def summarize(records: Sequence[Record], t0: float, t1: float) -> dict:
    """Requests that started in [t0, t1): their outcomes and latency; throughput from 200s completed in it."""
    window = [r for r in records if t0 <= r[0] < t1]
    outcomes = Counter(str(r[2]) for r in window)
    done = [r for r in records if r[2] == 200 and t0 <= r[1] <= t1]
    seconds = t1 - t0
    ok = [r for r in window if r[2] == 200]
    return {
        "seconds": seconds,
        "requests": len(window),
        "texts": sum(r[3] for r in window),
        "ok_requests": len(ok),
        "ok_texts": sum(r[3] for r in ok),
        "throughput_requests_per_s": len(done) / seconds if seconds > 0 else 0.0,
        "throughput_texts_per_s": sum(r[3] for r in done) / seconds if seconds > 0 else 0.0,
        "latency_ms": latency_ms(r[1] - r[0] for r in ok),
        "rejected_latency_ms": latency_ms(r[1] - r[0] for r in window if r[2] == 503),  # how fast a 503 comes
        "outcomes": dict(sorted(outcomes.items())),
        "lost": sum(outcomes[kind] for kind in LOST),
        "timeouts": outcomes["timeout"],
        "client_overflow": outcomes["client_overflow"],
    }


def metric_totals(text: str) -> dict[str, float]:
    """Prometheus text format: each metric's value, summed over its label sets."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if "{" in line:  # name{label="value",...} value [timestamp]
            name, rest = line[: line.index("{")], line[line.rindex("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if fields:
            with contextlib.suppress(ValueError):
                totals[name.strip()] = totals.get(name.strip(), 0.0) + float(fields[0])
    return totals


def mean_batch_size(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """Mean of `nlprnn_batch_size` over the run: the histogram's growth in _sum over its growth in _count."""
    if not after or "nlprnn_batch_size_count" not in after:
        return None
    before = before or {}
    count = after["nlprnn_batch_size_count"] - before.get("nlprnn_batch_size_count", 0.0)
    total = after.get("nlprnn_batch_size_sum", 0.0) - before.get("nlprnn_batch_size_sum", 0.0)
    return total / count if count > 0 else None


# --- HTTP/1.1 client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def connect_host(self) -> str:
        return self.host.strip("[]")


@dataclass(frozen=True, slots=True)
class Request:
    data: bytes  # the whole request: line, headers and body
    texts: int


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes
    keep_alive: bool


class ResponseError(Exception):
    """No whole response came: `kind` is closed (nothing before the end), truncated or bad_response."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def post_request(target: Target, path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


def get_request(target: Target, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nConnection: close\r\n\r\n".encode("ascii")


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One response: status line and headers up to the blank line, then a Content-Length (or chunked) body."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        raise ResponseError("truncated" if err.partial else "closed") from None
    except asyncio.LimitOverrunError:
        raise ResponseError("bad_response") from None
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    try:
        version, status = parts[0], int(parts[1])
    except (IndexError, ValueError):
        raise ResponseError("bad_response") from None
    if not version.startswith(b"HTTP/1."):
        raise ResponseError("bad_response")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ResponseError("bad_response")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == b"HTTP/1.1" else connection == "keep-alive"
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await read_chunked(reader)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:  # no length given: the body runs to the end of the connection
            body, keep_alive = await reader.read(), False
    except asyncio.IncompleteReadError:
        raise ResponseError("truncated") from None
    except (ValueError, asyncio.LimitOverrunError):
        raise ResponseError("bad_response") from None
    return Response(status, headers, body, keep_alive)


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


class Connection:
    """One keep-alive connection: requests are written whole, then their response read, one at a time."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, target: Target) -> Connection:
        return cls(*await asyncio.open_connection(target.connect_host, target.port))

    @property
    def closed_by_server(self) -> bool:
        """The server ended the connection while it sat idle: no request may go on it."""
        return self.reader.at_eof() or self.writer.transport.is_closing()

    async def exchange(self, data: bytes) -> Response:
        self.writer.write(data)
        await self.writer.drain()
        return await read_response(self.reader)

    def close(self) -> None:
        self.writer.close()


async def connect(target: Target, timeout: float) -> tuple[Connection | None, str]:
    """A new connection, or None and how it failed (connect_refused or connect_error)."""
    try:
        async with asyncio.timeout(timeout):
            return await Connection.open(target), ""
    except ConnectionRefusedError:
        return None, "connect_refused"
    except (OSError, TimeoutError):
        return None, "connect_error"


async def http_get(target: Target, path: str, timeout: float = 5.0) -> Response:
    connection = await Connection.open(target)
    try:
        async with asyncio.timeout(timeout):
            return await connection.exchange(get_request(target, path))
    finally:
        connection.close()


class Recorder:
    """Every request's outcome as (start, end, status or error kind, texts), and what error responses said."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.error_messages: Counter[tuple[int, str]] = Counter()
        self.missing_retry_after = 0  # 503s without a Retry-After header
        self.malformed_errors = 0  # error responses whose body is not {"error": "one line"}

    def add(self, start: float, end: float, outcome: int | str, texts: int) -> None:
        self.records.append((start, end, outcome, texts))

    def note_error(self, response: Response) -> None:
        if response.status == 503 and "retry-after" not in response.headers:
            self.missing_retry_after += 1
        try:
            message = json.loads(response.body)["error"]
        except (ValueError, KeyError, TypeError):
            message = None
        if not isinstance(message, str) or "\n" in message:
            self.malformed_errors += 1
            message = repr(response.body[:120])
        key = (response.status, message[:200])
        if key in self.error_messages or len(self.error_messages) < 50:
            self.error_messages[key] += 1

    def errors_summary(self) -> dict:
        return {"messages": [{"status": s, "error": m, "count": c} for (s, m), c in self.error_messages.most_common()],
                "missing_retry_after": self.missing_retry_after, "malformed_error_bodies": self.malformed_errors}


async def classify(connection: Connection, request: Request, timeout: float, recorder: Recorder) -> tuple[int | str, bool]:
    """Send one classify request: (status or error kind, whether the connection may carry another)."""
    try:
        async with asyncio.timeout(timeout):
            response = await connection.exchange(request.data)
    except TimeoutError:
        return "timeout", False
    except ResponseError as err:
        return err.kind, False
    except BrokenPipeError:  # the server had closed the connection: the request was never read
        return "closed", False
    except ConnectionResetError:
        return "reset", False
    except OSError:
        return "socket_error", False
    if response.status == 200:
        # one result per text; counting labels in the raw body keeps JSON parsing off the client's CPU
        if response.body.count(b'"label"') != request.texts:
            return "bad_results", response.keep_alive
    else:
        recorder.note_error(response)
    return response.status, response.keep_alive


def make_requests(target: Target, texts: Sequence[str], count: int, low: int, high: int, seed: int) -> list[Request]:
    """`count` classify requests of `low`..`high` texts each (uniform), the texts drawn from `texts`."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        chosen = rng.choices(texts, k=rng.randint(low, high))
        body = json.dumps({"texts": chosen}, ensure_ascii=False).encode("utf-8")
        requests.append(Request(post_request(target, CLASSIFY_PATH, body), len(chosen)))
    return requests


# --- load patterns --------------------------------------------------------------------------------


@dataclass
class LoopControl:
    deadline: float  # no request starts after this
    signalled_at: float | None = None  # once set, a client whose connection is gone stops instead of reconnecting


async def closed_client(target: Target, requests: Sequence[Request], first: int, stride: int, control: LoopControl,
                        timeout: float, recorder: Recorder) -> None:
    """One client: send, await the answer, repeat until the deadline; reconnect when the server closes."""
    connection: Connection | None = None
    index = first
    try:
        while time.perf_counter() < control.deadline:
            if connection is not None and connection.closed_by_server:
                connection.close()
                connection = None
            request = requests[index % len(requests)]
            if connection is None:
                if control.signalled_at is not None:
                    return
                connection, failure = await connect(target, timeout)
                if connection is None:
                    now = time.perf_counter()
                    recorder.add(now, now, failure, request.texts)
                    await asyncio.sleep(0.1)  # no tight loop against a server that is gone
                    continue
            index += stride
            start = time.perf_counter()
            outcome, keep = await classify(connection, request, timeout, recorder)
            recorder.add(start, time.perf_counter(), outcome, request.texts)
            if not keep:
                connection.close()
                connection = None
    finally:
        if connection is not None:
            connection.close()


async def closed_loop(target: Target, requests: Sequence[Request], clients: int, warmup: float, duration: float,
                      timeout: float, recorder: Recorder) -> tuple[float, float]:
    """`clients` closed-loop clients for warmup + duration seconds; returns the measured window."""
    t0 = time.perf_counter() + warmup
    control = LoopControl(deadline=t0 + duration)
    await asyncio.gather(*(closed_client(target, requests, i, clients, control, timeout, recorder)
                           for i in range(clients)))
    return t0, t0 + duration


class ConnectionPool:
    """Keep-alive connections for independent arrivals: an idle one if any, else a new one, up to `limit`."""

    def __init__(self, target: Target, limit: int) -> None:
        self.target, self.limit = target, limit
        self.idle: list[Connection] = []
        self.open = 0  # idle + busy + being opened
        self.peak = 0

    def take(self) -> tuple[bool, Connection | None]:
        """(False, None): the pool is exhausted; (True, None): open a new connection; else an idle one."""
        while self.idle:
            connection = self.idle.pop()  # the most recently used: the fewest connections stay warm
            if not connection.closed_by_server:
                return True, connection
            connection.close()
            self.open -= 1
        if self.open >= self.limit:
            return False, None
        self.open += 1
        self.peak = max(self.peak, self.open)
        return True, None

    async def send(self, connection: Connection | None, request: Request, arrival: float, timeout: float,
                   recorder: Recorder) -> None:
        if connection is None:
            connection, failure = await connect(self.target, timeout)
            if connection is None:
                self.open -= 1
                recorder.add(arrival, time.perf_counter(), failure, request.texts)
                return
        outcome, keep = await classify(connection, request, timeout, recorder)
        recorder.add(arrival, time.perf_counter(), outcome, request.texts)
        if keep:
            self.idle.append(connection)
        else:
            connection.close()
            self.open -= 1

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.open -= len(self.idle)
        self.idle.clear()


@dataclass
class OpenLoopStats:
    arrivals: int = 0
    late: list[tuple[float, float]] = field(default_factory=list)  # (arrival, lag) dispatched over 10 ms late

    def lag(self, t0: float = -math.inf, t1: float = math.inf) -> dict:
        """How late the client dispatched the arrivals of [t0, t1): its own delay, part of their latency."""
        lags = [lag for when, lag in self.late if t0 <= when < t1]
        return {"late_arrivals": len(lags), "max_ms": 1e3 * max(lags, default=0.0)}


async def open_loop(pool: ConnectionPool, requests: Sequence[Request], phases: Sequence[tuple[float, float]],
                    timeout: float, recorder: Recorder, seed: int, stats: OpenLoopStats | None = None,
                    first: int = 0) -> list[tuple[float, float]]:
    """Poisson arrivals, phase after phase ((requests/s, seconds) each, one unbroken stream), each arrival an
    independent request; waits for every answer and returns each phase's window."""
    rng = random.Random(seed)
    stats = stats if stats is not None else OpenLoopStats()
    pending: set[asyncio.Task] = set()
    windows = []
    index = first
    t = time.perf_counter()
    for rate, seconds in phases:
        begin, end = t, t + seconds
        windows.append((begin, end))
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= end:
                break
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = time.perf_counter() - t
            if lag > 0.01:
                stats.late.append((t, lag))
            stats.arrivals += 1
            request = requests[index % len(requests)]
            index += 1
            available, connection = pool.take()
            if not available:
                recorder.add(t, t, "client_overflow", request.texts)
                continue
            task = asyncio.create_task(pool.send(connection, request, t, timeout, recorder))
            pending.add(task)
            task.add_done_callback(pending.discard)
        t = end
    delay = t - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    while pending:
        await asyncio.gather(*list(pending))
    return windows


# --- the server -----------------------------------------------------------------------------------


class ServerError(RuntimeError):
    """The server did not start or did not get ready."""


class ServerProcess:
    """The server as a child process: its output in a log file, its URL from the ready line."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command, self.env, self.log_path = command, env, log_path
        self.process: subprocess.Popen | None = None
        self.signalled_at: float | None = None
        self.startup_s: float | None = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def start(self, timeout: float = 180.0) -> Target:
        started = time.perf_counter()
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=ROOT)
        while time.perf_counter() - started < timeout:
            match = READY_LINE.search(self.log_text())
            if match:
                self.startup_s = time.perf_counter() - started
                return Target(match.group(1), int(match.group(2)))
            if self.process.poll() is not None:
                raise ServerError(f"the server exited with {self.process.returncode} before it was ready; "
                                   f"{shlex.join(self.command)}:\n{self.log_tail()}")
            time.sleep(0.05)
        self.kill()
        raise ServerError(f"the server printed no ready line within {timeout:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float | None:
        """Resident memory (VmRSS) of the server process, in MB."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return None

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) the server process has used."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return None

    def terminate(self) -> None:
        if self.process.poll() is None and self.signalled_at is None:
            self.signalled_at = time.perf_counter()
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def stop(self, timeout: float) -> dict:
        """SIGTERM (unless sent already), then wait up to `timeout` s; a server still running is killed."""
        self.terminate()
        deadline = time.perf_counter() + timeout
        while self.process.poll() is None and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        killed = self.process.poll() is None
        self.kill()
        match = STOPPED_LINE.search(self.log_text())
        return {
            "exit_code": self.process.returncode,
            "killed_after_s": timeout if killed else None,
            "stop_s": None if killed or self.signalled_at is None else time.perf_counter() - self.signalled_at,
            "answered_requests": int(match.group(1)) if match else None,
            "answered_texts": int(match.group(2)) if match else None,
            "log_tail": self.log_tail(8),
        }


async def wait_ready(target: Target, timeout: float = 60.0) -> float:
    """Seconds until GET /readyz answers 200."""
    started = time.perf_counter()
    while True:
        with contextlib.suppress(OSError, TimeoutError, ResponseError):
            if (await http_get(target, "/readyz")).status == 200:
                return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            raise ServerError(f"{target.url}/readyz did not answer 200 within {timeout:.0f} s")
        await asyncio.sleep(0.1)


async def scrape_metrics(target: Target) -> dict[str, float] | None:
    with contextlib.suppress(OSError, TimeoutError, ResponseError):
        response = await http_get(target, "/metrics")
        if response.status == 200:
            return metric_totals(response.body.decode("utf-8", errors="replace"))
    return None


class Usage:
    """CPU used by the client and the server between construction and `done()`, in cores."""

    def __init__(self, server: ServerProcess) -> None:
        gc.collect()  # between measurements, never during one (the collector is off while loads run)
        self.server = server
        self.wall, self.client, self.server_cpu = time.perf_counter(), time.process_time(), server.cpu_s()

    def done(self) -> dict:
        wall = time.perf_counter() - self.wall
        server_cpu = self.server.cpu_s()
        return {"client_cores": (time.process_time() - self.client) / wall,
                "server_cores": (server_cpu - self.server_cpu) / wall
                if server_cpu is not None and self.server_cpu is not None else None}


# --- scenarios ------------------------------------------------------------------------------------


@dataclass
class Settings:
    duration: float
    warmup: float
    baseline_seconds: float
    overload_seconds: float
    recovery_seconds: float
    timeout: float
    max_connections: int
    sigterm_grace: float
    stop_timeout: float
    texts_per_request: tuple[int, int]
    seed: int


@dataclass
class ServerRun:
    """One server's life: its process and every recorder used against it (for the answered-count check)."""

    server: ServerProcess
    target: Target
    requests: list[Request]
    recorders: list[Recorder] = field(default_factory=list)

    def recorder(self) -> Recorder:
        recorder = Recorder()
        self.recorders.append(recorder)
        return recorder

    def client_counts(self) -> dict:
        outcomes = Counter(r[2] for recorder in self.recorders for r in recorder.records)
        ok_texts = sum(r[3] for recorder in self.recorders for r in recorder.records if r[2] == 200)
        responses = sum(count for outcome, count in outcomes.items() if isinstance(outcome, int) or outcome == "bad_results")
        return {"ok_requests": outcomes[200], "ok_texts": ok_texts, "http_responses": responses}


async def scenario_closed(run: ServerRun, clients: int, settings: Settings) -> dict:
    before = await scrape_metrics(run.target)
    recorder = run.recorder()
    usage = Usage(run.server)
    t0, t1 = await closed_loop(run.target, run.requests, clients, settings.warmup, settings.duration,
                               settings.timeout, recorder)
    cpu = usage.done()
    after = await scrape_metrics(run.target)
    warmup = [r for r in recorder.records if r[0] < t0]
    return {"clients": clients, **summarize(recorder.records, t0, t1),
            "warmup_outcomes": dict(Counter(str(r[2]) for r in warmup)),
            "mean_batch_size": mean_batch_size(before, after), "metrics_scraped": after is not None,
            "cpu": cpu, "errors": recorder.errors_summary()}


async def scenario_open(run: ServerRun, rate: float, settings: Settings, pool: ConnectionPool, seed: int) -> dict:
    recorder = run.recorder()
    stats = OpenLoopStats()
    usage = Usage(run.server)
    (t0, t1), = await open_loop(pool, run.requests, [(rate, settings.duration)], settings.timeout, recorder,
                                seed, stats, first=seed)
    return {"target_rate": rate, "offered_rate": stats.arrivals / settings.duration,
            **summarize(recorder.records, t0, t1), "client_lag": stats.lag(), "connections_peak": pool.peak,
            "cpu": usage.done(),
            "errors": recorder.errors_summary()}


async def sample_rss(server: ServerProcess, samples: list[tuple[float, float]], every: float = 1.0) -> None:
    while True:
        rss = server.rss_mb()
        if rss is not None:
            samples.append((time.perf_counter(), rss))
        await asyncio.sleep(every)


def sample_at(samples: Sequence[tuple[float, float]], t: float) -> float | None:
    """The last sample taken at or before `t` (else the first)."""
    before = [rss for when, rss in samples if when <= t]
    return before[-1] if before else (samples[0][1] if samples else None)


async def scenario_overload(run: ServerRun, sustainable_rps: float, settings: Settings, pool: ConnectionPool) -> dict:
    """Baseline at 0.5x, overload at 2x, recovery at 0.5x the sustainable rate, as one arrival stream."""
    recorder = run.recorder()
    low, high = RECOVERY_FACTOR * sustainable_rps, OVERLOAD_FACTOR * sustainable_rps
    baseline_s = settings.baseline_seconds
    phases = [(low, baseline_s), (high, settings.overload_seconds), (low, settings.recovery_seconds)]
    samples: list[tuple[float, float]] = []
    sampler = asyncio.create_task(sample_rss(run.server, samples))
    stats = OpenLoopStats()
    usage = Usage(run.server)
    try:
        windows = await open_loop(pool, run.requests, phases, settings.timeout, recorder, settings.seed + 7, stats)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    records = recorder.records
    (b0, b1), (o0, o1), (r0, r1) = windows
    # the overload is over once the server has answered everything that arrived before the recovery phase;
    # recovery-phase arrivals queued behind that backlog need a while longer, so it is judged on the second
    # half of the phase (or what follows the last overload answer, if that came later)
    drained_at = max((r[1] for r in records if r[0] < r0), default=r0)
    settled_from = max(drained_at, r0 + (r1 - r0) / 2)
    baseline = summarize(records, b0, b1)
    settled = summarize(records, settled_from, r1)
    base_p99 = (baseline["latency_ms"] or {}).get("p99")
    settled_p99 = (settled["latency_ms"] or {}).get("p99")
    recovered = (settled["requests"] > 0 and settled["outcomes"].keys() <= {"200"} and base_p99 is not None
                 and settled_p99 is not None
                 and settled_p99 <= RECOVERED_P99_FACTOR * base_p99 + RECOVERED_P99_SLACK_MS)
    overall = Counter(str(r[2]) for r in records)
    rss = [mb for _, mb in samples]
    rss_start = sample_at(samples, o0)
    return {
        "sustainable_rps": sustainable_rps,
        "rates": {"baseline": low, "overload": high, "recovery": low},
        "seconds": {"baseline": baseline_s, "overload": settings.overload_seconds, "recovery": settings.recovery_seconds},
        "baseline": baseline,
        "overload": summarize(records, o0, o1),
        "recovery": summarize(records, r0, r1),
        "recovery_settled": settled,
        "drain_s": max(0.0, drained_at - o1),
        "recovery_settled_after_s": settled_from - r0,
        "recovered": recovered,
        "outcomes": dict(sorted(overall.items())),
        "only_200_or_503": overall.keys() - {"client_overflow"} <= {"200", "503"},
        "lost": sum(overall[kind] for kind in LOST),
        "timeouts": overall["timeout"],
        "client_overflow": overall["client_overflow"],
        "connections_peak": pool.peak,
        "client_lag": {"baseline": stats.lag(b0, b1), "overload": stats.lag(o0, o1), "recovery": stats.lag(r0, r1),
                       "recovery_settled": stats.lag(settled_from, r1)},
        "rss_mb": {"start": rss_start, "max": max(rss) if rss else None, "end": rss[-1] if rss else None,
                   "growth": rss[-1] - rss_start if rss and rss_start is not None else None,
                   "samples": [(round(when - o0, 2), round(mb, 1)) for when, mb in samples]},
        "cpu": usage.done(),
        "errors": recorder.errors_summary(),
    }


async def scenario_sigterm(run: ServerRun, clients: int, settings: Settings) -> dict:
    """Closed-loop load; SIGTERM half-way; every outcome, and the server's count against the client's."""
    gc.collect()
    recorder = run.recorder()
    started = time.perf_counter()
    control = LoopControl(deadline=math.inf)
    tasks = [asyncio.create_task(closed_client(run.target, run.requests, i, clients, control, settings.timeout, recorder))
             for i in range(clients)]
    await asyncio.sleep(settings.warmup + settings.duration / 2)
    run.server.terminate()
    signalled = run.server.signalled_at
    control.signalled_at = signalled
    control.deadline = signalled + settings.sigterm_grace  # a server that keeps serving must not keep us here
    await asyncio.gather(*tasks)
    clients_done = time.perf_counter()
    exit_info = await run.server.stop(settings.stop_timeout)
    records = recorder.records
    in_flight = [r for r in records if r[0] <= signalled < r[1]]
    after = [r for r in records if r[0] > signalled]
    outcomes = Counter(str(r[2]) for r in records)
    counts = run.client_counts()
    return {
        "clients": clients,
        "signal_after_s": signalled - started,
        "requests": len(records),
        "outcomes": dict(sorted(outcomes.items())),
        "in_flight_at_signal": len(in_flight),
        "in_flight_outcomes": dict(Counter(str(r[2]) for r in in_flight)),
        "sent_after_signal": len(after),
        "after_signal_outcomes": dict(Counter(str(r[2]) for r in after)),
        "ok_requests": counts["ok_requests"],
        "ok_texts": counts["ok_texts"],
        "non_200_responses": {k: v for k, v in outcomes.items() if k.isdigit() and k != "200"},
        # the connection ended before any byte of an answer: a request the server never read
        "closed_without_response": outcomes["closed"] + outcomes["reset"],
        "resets": outcomes["reset"],
        "truncated": outcomes["truncated"],
        "timeouts": outcomes["timeout"],
        "clients_done_after_signal_s": clients_done - signalled,
        "server": exit_info,
        "answered_matches_ok": exit_info["answered_requests"] == counts["ok_requests"],
        "answered_texts_match": exit_info["answered_texts"] == counts["ok_texts"],
        "errors": recorder.errors_summary(),
    }


# --- running it all -------------------------------------------------------------------------------


def server_env(threads: int) -> dict[str, str]:
    """The server's thread pools sized to its share of the cores; the client keeps the rest."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false"}


def server_command(options: argparse.Namespace, config: str) -> list[str]:
    return [*options.server_command, str(options.bundle), "--port", "0", "--threads", str(options.server_threads),
            *options.server_args, *CONFIGS[config]]


def pick_clients(clients: Sequence[int]) -> int:
    """The clients count the summary and the overload's sustainable rate use: 64 if measured, else the most."""
    return 64 if 64 in clients else max(clients)


async def start_run(options: argparse.Namespace, config: str, texts: Sequence[str], settings: Settings,
                    workdir: Path, label: str) -> ServerRun:
    server = ServerProcess(server_command(options, config), server_env(options.server_threads),
                           workdir / f"{config}-{label}.log")
    log(f"  starting: {shlex.join(server.command)}")
    target = server.start()
    try:
        ready_s = await wait_ready(target)
    except BaseException:
        server.kill()
        raise
    low, high = settings.texts_per_request
    requests = make_requests(target, texts, REQUEST_POOL, low, high, settings.seed)
    log(f"  ready on {target.url} after {server.startup_s + ready_s:.1f} s")
    return ServerRun(server, target, requests)


async def finish_run(run: ServerRun, settings: Settings) -> dict:
    """Stop the server with SIGTERM and compare its count of answered requests with the client's."""
    counts = run.client_counts()
    exit_info = await run.server.stop(settings.stop_timeout)
    return {**exit_info, "client": counts, "startup_s": run.server.startup_s,
            "answered_matches_ok": exit_info["answered_requests"] == counts["ok_requests"]}


async def sustainable_rate(run: ServerRun, clients: int, settings: Settings, closed: list[dict]) -> float:
    """Closed-loop requests/s of this server at `clients` clients: measured already, or measured now."""
    for row in closed:
        if row["clients"] == clients:
            return row["throughput_requests_per_s"]
    log(f"  measuring the sustainable rate: {clients} closed-loop clients")
    row = await scenario_closed(run, clients, settings)
    return row["throughput_requests_per_s"]


async def run_config(options: argparse.Namespace, config: str, texts: Sequence[str], settings: Settings,
                     workdir: Path, results: dict) -> dict:
    scenarios = options.scenarios
    out: dict = {"server_command": server_command(options, config)}
    load_scenarios = [s for s in ("closed", "open", "overload") if s in scenarios
                      and (s != "overload" or config == "batching_on")]
    if load_scenarios:
        run = await start_run(options, config, texts, settings, workdir, "load")
        try:
            if "closed" in scenarios:
                out["closed"] = []
                for clients in options.clients:
                    log(f"  closed loop, {clients} clients, {settings.duration:g} s")
                    row = await scenario_closed(run, clients, settings)
                    out["closed"].append(row)
                    log(f"    {describe(row)}")
            needs_rate = ("open" in scenarios and options.rates is None) or "overload" in load_scenarios
            if needs_rate and "sustainable_rps" not in results:
                rate = await sustainable_rate(run, pick_clients(options.clients), settings, out.get("closed", []))
                results["sustainable_rps"] = rate
                log(f"  sustainable rate: {rate:,.1f} requests/s")
            pool = ConnectionPool(run.target, options.max_connections)
            if "open" in scenarios:
                rates = options.rates or [round(f * results["sustainable_rps"], 1) for f in options.rate_fractions]
                out["open"] = []
                for i, rate in enumerate(rates):
                    log(f"  open loop, {rate:g} requests/s, {settings.duration:g} s")
                    row = await scenario_open(run, rate, settings, pool, settings.seed + 100 + i)
                    out["open"].append(row)
                    log(f"    {describe(row)}")
            if "overload" in load_scenarios:
                log(f"  overload: {OVERLOAD_FACTOR:g}x {results['sustainable_rps']:,.1f} requests/s for "
                    f"{settings.overload_seconds:g} s, then {RECOVERY_FACTOR:g}x for {settings.recovery_seconds:g} s")
                out["overload"] = await scenario_overload(run, results["sustainable_rps"], settings, pool)
                o = out["overload"]
                log(f"    outcomes {o['outcomes']}, RSS {fmt(o['rss_mb']['start'], '.0f')} -> max "
                    f"{fmt(o['rss_mb']['max'], '.0f')} -> {fmt(o['rss_mb']['end'], '.0f')} MB, recovered: {o['recovered']}")
            pool.close()
        finally:
            out["server"] = await finish_run(run, settings)
        log(f"  stopped: exit {out['server']['exit_code']}, answered {out['server']['answered_requests']}, "
            f"client got {out['server']['client']['ok_requests']} 200s")
    if "sigterm" in scenarios:
        clients = pick_clients(options.clients)
        log(f"  sigterm under {clients} closed-loop clients")
        run = await start_run(options, config, texts, settings, workdir, "sigterm")
        try:
            out["sigterm"] = await scenario_sigterm(run, clients, settings)
        finally:
            run.server.kill()
        s = out["sigterm"]
        log(f"    {s['in_flight_at_signal']} in flight, outcomes {s['outcomes']}, exit {s['server']['exit_code']}, "
            f"answered {s['server']['answered_requests']} vs {s['ok_requests']} 200s")
    return out


def checks(results: dict) -> dict[str, dict]:
    """Correctness checks: {name: {"ok": bool, "detail": str}}."""
    found: dict[str, dict] = {}

    def check(name: str, ok: bool, detail: str) -> None:
        found[name] = {"ok": bool(ok), "detail": detail}

    for config, out in results["configs"].items():
        for row in out.get("closed", []):
            check(f"{config}: closed loop, {row['clients']} clients, nothing lost", row["lost"] == 0
                  and set(row["outcomes"]) <= {"200"}, f"outcomes {row['outcomes']}")
        for row in out.get("open", []):
            check(f"{config}: open loop {row['target_rate']:g}/s, no lost request", row["lost"] == 0,
                  f"outcomes {row['outcomes']}")
        if "overload" in out:
            o = out["overload"]
            check(f"{config}: overload, only 200 or 503", o["only_200_or_503"], f"outcomes {o['outcomes']}")
            check(f"{config}: overload, none lost or hung", o["lost"] == 0, f"lost {o['lost']}, timeouts {o['timeouts']}")
            check(f"{config}: overload, recovered", o["recovered"],
                  f"settled p99 {fmt(p99(o['recovery_settled']), '.1f')} ms vs baseline {fmt(p99(o['baseline']), '.1f')} ms, "
                  f"outcomes after the drain {o['recovery_settled']['outcomes']}")
            check(f"{config}: overload, every 503 has Retry-After", o["errors"]["missing_retry_after"] == 0,
                  f"{o['errors']['missing_retry_after']} without")
        if "server" in out:
            s = out["server"]
            check(f"{config}: server exits 0 on SIGTERM", s["exit_code"] == 0, f"exit code {s['exit_code']}")
            check(f"{config}: server's answered count = client's 200s", s["answered_matches_ok"],
                  f"server {s['answered_requests']}, client {s['client']['ok_requests']}")
        if "sigterm" in out:
            s = out["sigterm"]
            check(f"{config}: sigterm, exit 0", s["server"]["exit_code"] == 0, f"exit code {s['server']['exit_code']}")
            check(f"{config}: sigterm, answered count = client's 200s", s["answered_matches_ok"],
                  f"server {s['server']['answered_requests']}, client {s['ok_requests']}")
            check(f"{config}: sigterm, no hung request", s["timeouts"] == 0, f"{s['timeouts']} timeouts")
            check(f"{config}: sigterm, no answer cut short", s["truncated"] + s["outcomes"].get("bad_response", 0) == 0,
                  f"{s['truncated']} truncated, {s['outcomes'].get('bad_response', 0)} malformed")
        errors = [row["errors"]["malformed_error_bodies"] for key in ("closed", "open") for row in out.get(key, [])]
        errors += [out[key]["errors"]["malformed_error_bodies"] for key in ("overload", "sigterm") if key in out]
        if errors:
            check(f"{config}: every error body is {{\"error\": one line}}", sum(errors) == 0, f"{sum(errors)} malformed")
    return found


def p99(summary: dict | None) -> float | None:
    return ((summary or {}).get("latency_ms") or {}).get("p99")


def summary(results: dict) -> dict:
    """The headline numbers: batching's gain, the overload and the shutdown."""
    configs = results["configs"]
    out: dict = {}
    clients = pick_clients(results["settings"]["clients"])
    rows = {config: next((r for r in c.get("closed", []) if r["clients"] == clients), None)
            for config, c in configs.items()}
    on, off = rows.get("batching_on"), rows.get("batching_off")
    if on and off:
        out["batching"] = {
            "clients": clients, "texts_per_request": results["settings"]["texts_per_request"],
            "on_texts_per_s": on["throughput_texts_per_s"], "off_texts_per_s": off["throughput_texts_per_s"],
            "ratio": on["throughput_texts_per_s"] / off["throughput_texts_per_s"] if off["throughput_texts_per_s"] else None,
            "on_p99_ms": p99(on), "off_p99_ms": p99(off),
            "on_mean_batch_size": on["mean_batch_size"], "off_mean_batch_size": off["mean_batch_size"],
        }
    o = configs.get("batching_on", {}).get("overload")
    if o:
        out["overload"] = {"rate": o["rates"]["overload"], "seconds": o["seconds"]["overload"],
                           "outcomes": o["outcomes"], "lost": o["lost"], "rss_mb": {k: v for k, v in o["rss_mb"].items()
                                                                                     if k != "samples"},
                           "recovered": o["recovered"]}
    sig = {config: c["sigterm"] for config, c in configs.items() if "sigterm" in c}
    if sig:
        out["sigterm"] = {config: {k: s[k] for k in ("in_flight_at_signal", "outcomes", "closed_without_response",
                                                       "ok_requests", "answered_matches_ok")}
                          | {"exit_code": s["server"]["exit_code"], "answered": s["server"]["answered_requests"]}
                          for config, s in sig.items()}
    return out


# --- reporting ------------------------------------------------------------------------------------


def fmt(value, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def duration_text(seconds: float) -> str:
    return f"{seconds / 60:.0f} minutes" if seconds >= 90 else f"{seconds:.0f} s"


def outcomes_text(outcomes: dict) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in outcomes.items()) or "none"


def describe(row: dict) -> str:
    lat = row["latency_ms"] or {}
    return (f"{row['throughput_requests_per_s']:,.1f} req/s, {row['throughput_texts_per_s']:,.1f} texts/s, p50 "
            f"{fmt(lat.get('p50'), '.1f')} / p99 {fmt(lat.get('p99'), '.1f')} ms, {outcomes_text(row['outcomes'])}")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or platform.machine()


def machine_info(server_threads: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from nlprnn.threads import available_cores

    versions = {}
    for package in ("onnxruntime", "tokenizers"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores_available": available_cores(),
        "server_threads": server_threads,
        "client": "one single-threaded asyncio process (raw HTTP/1.1, request bodies encoded up front)",
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def print_tables(results: dict) -> None:
    for config, out in results["configs"].items():
        for row in out.get("closed", []):
            print(f"{CONFIG_TITLES[config]:<13} closed {row['clients']:>4} clients  {describe(row)}")
        for row in out.get("open", []):
            print(f"{CONFIG_TITLES[config]:<13} open {row['target_rate']:>8g}/s  {describe(row)}")
    for name, c in results["checks"].items():
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {name}: {c['detail']}")


def write_plot(results: dict, path: Path) -> bool:
    """p50 and p99 latency against achieved texts/s from the open-loop sweep, batching on and off."""
    series = {config: out["open"] for config, out in results["configs"].items() if out.get("open")}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {"batching_on": "#1f77b4", "batching_off": "#ff7f0e"}
    for config, rows in series.items():
        rows = sorted((r for r in rows if r["latency_ms"]), key=lambda r: r["target_rate"])
        x = [r["throughput_texts_per_s"] for r in rows]
        for q, style in (("p50", "-"), ("p99", "--")):
            ax.plot(x, [r["latency_ms"][q] for r in rows], style, marker="o", markersize=4, color=colors[config],
                    label=f"{CONFIG_TITLES[config]}, {q}")
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput (texts / s, 200 responses)")
    ax.set_ylabel("latency (ms, from the scheduled arrival)")
    settings = results["settings"]
    ax.set_title(f"Open loop, Poisson arrivals, {settings['texts_per_request']} text(s) per request")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def ms(summary: dict, q: str, key: str = "latency_ms") -> str:
    """A percentile of a summary's latency, in ms, for a table."""
    return fmt((summary.get(key) or {}).get(q), ".1f")


def write_markdown(results: dict, path: Path, plot_name: str | None) -> None:
    m, settings = results["machine"], results["settings"]
    configs = results["configs"]
    lines = ["# Serving under load", ""]
    if results.get("note"):
        lines += [f"> **{results['note']}**", ""]
    lines += [
        f"Reproduce with `` {results['command']} `` (about {duration_text(results['wall_s'])} here). "
        f"Taken {results['date']}.", "",
        "## Machine", "",
        f"- CPU: {m['cpu_model']}; {m['logical_cpus']} logical CPUs, {m['physical_cores_available']} physical cores "
        f"available; load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'] or [])}",
        f"- Server: `--threads {m['server_threads']}` (OMP_NUM_THREADS and RAYON_NUM_THREADS alike); client: "
        f"{m['client']}; client and server share the CPUs",
        f"- Python {m['python']}, onnxruntime {m.get('onnxruntime', 'n/a')}, tokenizers {m.get('tokenizers', 'n/a')}, "
        f"{m['platform']}", "",
        "## Setup", "",
        f"- Bundle `{settings['bundle']}`; texts: {settings['texts_source']} ({settings['texts_available']:,} texts), "
        f"{settings['texts_per_request']} per request, drawn at random (seed {settings['seed']})",
        f"- Servers: batching on = `{shlex.join(configs.get('batching_on', {}).get('server_command', ['n/a']))}`; "
        "batching off adds `--max_batch_size 1`. A fresh server for each configuration, run one after the other.",
        f"- Closed loop: {settings['warmup']:g} s warm-up, then {settings['duration']:g} s measured. Open loop: "
        f"{settings['duration']:g} s per rate. Client timeout {settings['timeout']:g} s; up to "
        f"{settings['max_connections']:,} connections in the open loop.",
        "- Latency percentiles are over 200 responses (open loop: from the scheduled arrival); throughput counts the "
        "200 responses completed inside the measured window.", "",
    ]
    s = results["summary"]
    lines += ["## Summary", ""]
    if "batching" in s:
        b = s["batching"]
        lines.append(
            f"- **Batching**, {b['clients']} clients x {b['texts_per_request']} text(s): on / off = "
            f"**{fmt(b['ratio'], '.2f')}x** texts/s ({b['on_texts_per_s']:,.0f} against {b['off_texts_per_s']:,.0f}); "
            f"p99 {fmt(b['on_p99_ms'], '.1f')} ms on, {fmt(b['off_p99_ms'], '.1f')} ms off; mean batch "
            f"{fmt(b['on_mean_batch_size'], '.1f')} on, {fmt(b['off_mean_batch_size'], '.1f')} off.")
    if "overload" in s:
        o = s["overload"]
        rss = o["rss_mb"]
        lines.append(
            f"- **Overload**, {OVERLOAD_FACTOR:g}x the sustainable rate ({o['rate']:,.0f} requests/s) for "
            f"{o['seconds']:g} s: responses {outcomes_text(o['outcomes'])}; lost {o['lost']}; server RSS "
            f"{fmt(rss['start'])} MB at the start, {fmt(rss['max'])} MB at most, {fmt(rss['end'])} MB at the end "
            f"({fmt(rss['growth'], '+,.0f')} MB); recovered at {RECOVERY_FACTOR:g}x: **{'yes' if o['recovered'] else 'NO'}**.")
    for config, g in s.get("sigterm", {}).items():
        lines.append(
            f"- **SIGTERM** ({CONFIG_TITLES[config]}): {g['in_flight_at_signal']} requests in flight at the signal; "
            f"outcomes {outcomes_text(g['outcomes'])}; {g['closed_without_response']} closed without a response; exit "
            f"code {g['exit_code']}; the server answered {fmt(g['answered'], ',')}, the client got "
            f"{g['ok_requests']:,} 200s: **{'equal' if g['answered_matches_ok'] else 'DIFFERENT'}**.")
    failed = [name for name, c in results["checks"].items() if not c["ok"]]
    lines.append(f"- Checks: {len(results['checks']) - len(failed)} of {len(results['checks'])} passed"
                 + (f"; failed: {'; '.join(failed)}" if failed else "") + ".")
    if plot_name:
        lines += ["", f"![latency against throughput]({plot_name})"]
    closed = [(config, row) for config, out in configs.items() for row in out.get("closed", [])]
    if closed:
        lines += ["", "## Closed loop", ""] + table(
            ["server", "clients", "requests", "req/s", "texts/s", "p50 ms", "p95 ms", "p99 ms", "mean batch",
             "server / client CPU (cores)", "outcomes"],
            ([CONFIG_TITLES[config], row["clients"], f"{row['requests']:,}", f"{row['throughput_requests_per_s']:,.1f}",
              f"{row['throughput_texts_per_s']:,.1f}", ms(row, "p50"), ms(row, "p95"), ms(row, "p99"),
              fmt(row["mean_batch_size"], ".1f"), f"{fmt(row['cpu']['server_cores'], '.2f')} / {row['cpu']['client_cores']:.2f}",
              outcomes_text(row["outcomes"])] for config, row in closed))
    opened = [(config, row) for config, out in configs.items() for row in out.get("open", [])]
    if opened:
        lines += ["", "## Open loop", ""] + table(
            ["server", "target req/s", "offered req/s", "achieved req/s", "texts/s", "p50 ms", "p95 ms", "p99 ms",
             "outcomes", "client lag max ms"],
            ([CONFIG_TITLES[config], f"{row['target_rate']:g}", f"{row['offered_rate']:,.1f}",
              f"{row['throughput_requests_per_s']:,.1f}", f"{row['throughput_texts_per_s']:,.1f}", ms(row, "p50"),
              ms(row, "p95"), ms(row, "p99"), outcomes_text(row["outcomes"]), f"{row['client_lag']['max_ms']:.1f}"]
             for config, row in opened))
    o = configs.get("batching_on", {}).get("overload")
    if o:
        rss, seconds = o["rss_mb"], o["seconds"]
        lines += [
            "", "## Overload (batching on)", "",
            f"Sustainable rate: {o['sustainable_rps']:,.1f} requests/s (closed-loop throughput). One Poisson arrival "
            f"stream: {seconds['baseline']:g} s at {RECOVERY_FACTOR:g}x, {seconds['overload']:g} s at {OVERLOAD_FACTOR:g}x, "
            f"{seconds['recovery']:g} s at {RECOVERY_FACTOR:g}x. The server answered the last overload request "
            f"{o['drain_s']:.1f} s after the overload ended; \"recovery, settled\" counts the requests that arrived from "
            f"{o['recovery_settled_after_s']:.1f} s into the recovery (its second half, or after that last answer if "
            f"later): it recovered when all of them got 200 and their p99 is within {RECOVERED_P99_FACTOR:g}x the "
            f"baseline's (+{RECOVERED_P99_SLACK_MS:g} ms).", "",
        ]
        phases = (("baseline", "baseline", "baseline"), ("overload", "overload", "overload"),
                  ("recovery", "recovery", "recovery"), ("recovery_settled", "recovery, settled", "recovery"))
        lines += table(
            ["phase", "req/s offered", "requests", "achieved req/s", "texts/s", "p50 ms", "p99 ms", "503 p50 / p99 ms",
             "outcomes", "client lag max ms"],
            ([label, f"{o['rates'][rate]:,.1f}", f"{o[key]['requests']:,}", f"{o[key]['throughput_requests_per_s']:,.1f}",
              f"{o[key]['throughput_texts_per_s']:,.1f}", ms(o[key], "p50"), ms(o[key], "p99"),
              f"{ms(o[key], 'p50', 'rejected_latency_ms')} / {ms(o[key], 'p99', 'rejected_latency_ms')}",
              outcomes_text(o[key]["outcomes"]), f"{o['client_lag'][key]['max_ms']:.1f}"] for key, label, rate in phases))
        lines += [
            "",
            f"- Server RSS: {fmt(rss['start'])} MB at the start of the overload, {fmt(rss['max'])} MB at most, "
            f"{fmt(rss['end'])} MB at the end ({len(rss['samples'])} samples, one a second)",
            f"- All responses: {outcomes_text(o['outcomes'])}; lost {o['lost']}, timeouts {o['timeouts']}; client "
            f"overflow {o['client_overflow']}; up to {o['connections_peak']:,} connections; 503s without Retry-After: "
            f"{o['errors']['missing_retry_after']}",
        ]
        for message in o["errors"]["messages"][:5]:
            lines.append(f"- {message['status']}: `{message['error']}` x {message['count']:,}")
    sig = [(config, out["sigterm"]) for config, out in configs.items() if "sigterm" in out]
    if sig:
        lines += ["", "## SIGTERM under load", ""] + table(
            ["server", "clients", "in flight at the signal", "their outcomes", "sent after it", "200s", "other responses",
             "closed without response (of them resets)", "timeouts", "exit", "answered / client 200s"],
            ([CONFIG_TITLES[config], g["clients"], g["in_flight_at_signal"], outcomes_text(g["in_flight_outcomes"]),
              g["sent_after_signal"], f"{g['ok_requests']:,}", outcomes_text(g["non_200_responses"]),
              f"{g['closed_without_response']} ({g['resets']})", g["timeouts"], g["server"]["exit_code"],
              f"{fmt(g['server']['answered_requests'], ',')} / {g['ok_requests']:,}"] for config, g in sig))
    lines += ["", "## Checks", ""] + table(
        ["check", "result", "detail"],
        ([name, "yes" if c["ok"] else "NO", c["detail"]] for name, c in results["checks"].items()))
    path.write_text("\n".join(lines) + "\n")


# --- texts and arguments --------------------------------------------------------------------------


def dataset_texts(dataset: str, split: str) -> list[str]:
    """A split's texts, read in a child process so that this one never loads datasets, Arrow or numpy."""
    code = ("import json, sys\nfrom nlprnn.data.sources import SourceSpec, load_splits\n"
            "texts = load_splits(SourceSpec(dataset=sys.argv[1]))[sys.argv[2]]['text']\n"
            "json.dump(list(texts), sys.stdout)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", code, dataset, split], capture_output=True, text=True, env=env,
                               cwd=ROOT)
    if completed.returncode != 0:
        raise SystemExit(f"load_test: cannot read the {split} split of {dataset!r} (give --input FILE instead):\n"
                         f"{completed.stderr[-2000:]}")
    return json.loads(completed.stdout)


def load_texts(options: argparse.Namespace) -> tuple[list[str], str]:
    if options.input:
        from nlprnn.deploy.inputs import read_texts
        from nlprnn.errors import exit_on_reported_error

        with exit_on_reported_error("load_test"):
            texts = list(read_texts(options.input, options.text_column))
        source = f"`{options.input}`"
    else:
        texts = dataset_texts(options.dataset, options.split)
        source = f"the {options.split} split of {options.dataset}"
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SystemExit("load_test: no non-empty texts to send")
    return texts, source


def texts_range(value: str) -> tuple[int, int]:
    """`4` or `1-8`: texts per request, fixed or drawn uniformly from the range."""
    low, dash, high = value.partition("-")
    try:
        bounds = (int(low), int(high if dash else low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a range like 1-8, not {value!r}") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError(f"expected 1 <= low <= high, not {value!r}")
    return bounds


def number_list(kind: type) -> Callable[[str], list]:
    def parse(value: str) -> list:
        try:
            values = [kind(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {value!r}") from None
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive numbers, not {value!r}")
        return values

    return parse


def scenario_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(SCENARIOS)}; not {', '.join(sorted(unknown)) or value!r}")
    return names


def config_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or set(names) - set(CONFIGS):
        raise argparse.ArgumentTypeError(f"configurations are {', '.join(CONFIGS)}")
    return [c for c in CONFIGS if c in names]  # batching on first: the others use its sustainable rate


def default_server_threads() -> int:
    from nlprnn.threads import available_cores

    return available_cores()


def parse_args(argv: list[str]) -> argparse.Namespace:
    server_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, server_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="the bundle the servers load (`python -m nlprnn.serve BUNDLE`)")
    parser.add_argument("--out", type=Path, default=None, help="folder for serving.{json,md,png}")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--note", default=None, help="a line shown at the top of serving.md")
    parser.add_argument("--scenarios", type=scenario_list, default=list(SCENARIOS), help="closed,open,overload,sigterm")
    parser.add_argument("--configs", type=config_list, default=list(CONFIGS), help="batching_on,batching_off")
    parser.add_argument("--quick", action="store_true", help="a few seconds per scenario: a smoke run")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per closed-loop run and per rate")
    parser.add_argument("--warmup", type=float, default=None, help="uncounted seconds before each closed-loop run")
    parser.add_argument("--clients", type=number_list(int), default=[64], help="closed-loop clients, e.g. 1,16,64")
    parser.add_argument("--texts_per_request", type=texts_range, default=(1, 1), help="a number or a range like 1-8")
    parser.add_argument("--rates", default="auto",
                        help="open-loop requests/s, comma-separated, or `auto`: fractions of the batching server's "
                             "closed-loop throughput")
    parser.add_argument("--baseline_seconds", type=float, default=None, help="seconds at 0.5x before the overload")
    parser.add_argument("--overload_seconds", type=float, default=None, help="seconds at 2x the sustainable rate")
    parser.add_argument("--recovery_seconds", type=float, default=None, help="seconds at 0.5x after the overload")
    parser.add_argument("--timeout", type=float, default=20.0, help="client-side timeout of every request, seconds")
    parser.add_argument("--max_connections", type=int, default=4096,
                        help="open-loop connection cap (above the server's queue, so the server, not the client, "
                             "turns load away)")
    parser.add_argument("--sigterm_grace", type=float, default=15.0,
                        help="seconds after SIGTERM before the clients stop sending on connections still open")
    parser.add_argument("--stop_timeout", type=float, default=60.0, help="seconds a server may take to exit")
    parser.add_argument("--server_threads", type=int, default=None,
                        help="the server's --threads (default: the physical cores)")
    parser.add_argument("--input", help="texts to send (.txt/.csv/.tsv/.jsonl) instead of a dataset split")
    parser.add_argument("--text_column", default="text", help="the text column of a .csv/.tsv/.jsonl input")
    parser.add_argument("--dataset", default="movie-snippets", help="built-in dataset whose split gives the texts")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server_command", type=shlex.split, default=[sys.executable, "-m", "nlprnn.serve"],
                        help="what runs the server, before BUNDLE (default: this Python's -m nlprnn.serve)")
    options = parser.parse_args(argv)
    options.server_args = server_args
    preset = QUICK if options.quick else DEFAULTS
    for name, value in preset.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    if options.rates == "auto":
        options.rates = None
        options.rate_fractions = QUICK_RATES if options.quick else AUTO_RATES
    else:
        options.rates = number_list(float)(options.rates)
    options.server_threads = options.server_threads or default_server_threads()
    return options


def raise_open_files_limit(needed: int) -> int:
    """Every connection is a file on each side (the server inherits the limit); a soft limit of 1024 is too low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        log(f"load_test: at most {soft} open files allowed; connections beyond fail as connect_error")
    return soft


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run_all(options: argparse.Namespace, texts: list[str], settings: Settings, results: dict) -> None:
    # A full collection amid thousands of connections stalls the client for tens of ms, and the stall would
    # count as server latency: collections run between measurements instead (see `Usage`).
    gc.disable()
    try:
        with tempfile.TemporaryDirectory(prefix="nlprnn-load-") as scratch:
            for config in options.configs:
                log(CONFIG_TITLES[config])
                results["configs"][config] = await run_config(options, config, texts, settings, Path(scratch), results)
    except ServerError as err:  # a server that did not start: there is nothing to measure
        raise SystemExit(f"load_test: {err}") from None
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    options = parse_args(argv)
    if not options.bundle.exists():
        raise SystemExit(f"load_test: no bundle at {options.bundle}")
    texts, source = load_texts(options)
    open_files = raise_open_files_limit(options.max_connections + 512)
    gc.collect()
    gc.freeze()  # the texts and modules loaded so far stay: later collections need not look at them
    settings = Settings(
        duration=options.duration, warmup=options.warmup, baseline_seconds=options.baseline_seconds,
        overload_seconds=options.overload_seconds,
        recovery_seconds=options.recovery_seconds, timeout=options.timeout, max_connections=options.max_connections,
        sigterm_grace=options.sigterm_grace, stop_timeout=options.stop_timeout,
        texts_per_request=options.texts_per_request, seed=options.seed,
    )
    low, high = options.texts_per_request
    started = time.perf_counter()
    results: dict = {
        "command": shlex.join([".venv/bin/python", "scripts/load_test.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "note": options.note,
        "machine": machine_info(options.server_threads),
        "settings": {
            "bundle": str(options.bundle), "texts_source": source, "texts_available": len(texts),
            "texts_per_request": str(low) if low == high else f"{low}-{high}", "clients": options.clients,
            "scenarios": options.scenarios, "rates": options.rates,
            "rate_fractions": None if options.rates else list(options.rate_fractions),
            "duration": settings.duration, "warmup": settings.warmup, "baseline_seconds": settings.baseline_seconds,
            "overload_seconds": settings.overload_seconds,
            "recovery_seconds": settings.recovery_seconds, "timeout": settings.timeout,
            "max_connections": settings.max_connections, "server_args": options.server_args, "seed": settings.seed,
        },
        "configs": {},
    }
    asyncio.run(run_all(options, texts, settings, results))
    results["wall_s"] = time.perf_counter() - started
    results["machine"]["open_files_limit"] = open_files
    results["checks"] = checks(results)
    results["summary"] = summary(results)
    print_tables(results)
    text = json.dumps(results, indent=2) + "\n"
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(text)
    if options.out:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "serving.json").write_text(text)
        plotted = write_plot(results, options.out / "serving.png")
        write_markdown(results, options.out / "serving.md", "serving.png" if plotted else None)
        log(f"wrote {options.out / 'serving.md'}, serving.json" + (" and serving.png" if plotted else ""))
    failed = [name for name, c in results["checks"].items() if not c["ok"]]
    if failed:
        log(f"load_test: {len(failed)} check(s) failed: {'; '.join(failed)}")
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
