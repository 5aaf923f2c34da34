"""scripts/load_test.py: its statistics, its HTTP client against a toy server, and one short run end to end.

The toy server below speaks the classify protocol of `python -m nlprnn.serve` (keep-alive HTTP/1.1, 503 with
Retry-After when its queue is full, a final "answered N" line after SIGTERM); run as a script it stands in
for the real server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SCRIPTS, load_script

SCRIPT = SCRIPTS / "load_test.py"


# --- a toy server -----------------------------------------------------------------------------------


class ToyServer:
    """Classify requests answered by a worker that takes `service_s` per batch of up to `max_batch_size` texts.

    Texts steer it: "__close__" closes the connection unanswered, "__sleep__" never answers, "__bad__" answers
    one result too few, "__chunked__" answers with a chunked body.
    """

    def __init__(self, max_batch_size: int = 64, service_s: float = 0.0, max_queue: int = 2048) -> None:
        self.max_batch_size, self.service_s, self.max_queue = max_batch_size, service_s, max_queue
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queued_texts = 0
        self.answered = self.answered_texts = 0
        self.connections = 0
        self.batch_sum = self.batch_count = 0
        self.stopping = False
        self.idle: set[asyncio.StreamWriter] = set()
        self.handlers: set[asyncio.Task] = set()

    async def worker(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            await asyncio.sleep(self.service_s)
            self.batch_sum += len(batch)
            self.batch_count += 1
            for future in batch:
                self.queued_texts -= 1
                future.set_result({"label": "positive", "probabilities": {"negative": 0.25, "positive": 0.75}})

    async def classify(self, texts: list[str]) -> tuple[int, dict, bytes]:
        if "__sleep__" in texts:
            await asyncio.sleep(3600)
        if self.queued_texts + len(texts) > self.max_queue:
            return 503, {"Retry-After": "1"}, json.dumps({"error": "the queue is full; retry later"}).encode()
        futures = [asyncio.get_running_loop().create_future() for _ in texts]
        self.queued_texts += len(texts)
        for future in futures:
            self.queue.put_nowait(future)
        results = list(await asyncio.gather(*futures))
        if "__bad__" in texts:
            results = results[:-1]
        self.answered += 1
        self.answered_texts += len(texts)
        return 200, {}, json.dumps({"results": results}).encode()

    async def respond(self, method: bytes, path: bytes, body: bytes) -> tuple[int, dict, bytes] | None:
        if method == b"GET" and path in (b"/healthz", b"/readyz"):
            return 200, {}, b'{"status": "ok"}'
        if method == b"GET" and path == b"/metrics":
            text = (f"# TYPE nlprnn_batch_size histogram\nnlprnn_batch_size_bucket{{le=\"1\"}} 0\n"
                    f"nlprnn_batch_size_sum {self.batch_sum}\nnlprnn_batch_size_count {self.batch_count}\n")
            return 200, {"Content-Type": "text/plain"}, text.encode()
        if method == b"POST" and path == b"/v1/classify":
            texts = json.loads(body)["texts"]
            if "__close__" in texts:
                return None
            return await self.classify(texts)
        return 404, {}, b'{"error": "no such path"}'

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.handlers.add(asyncio.current_task())
        try:
            while not self.stopping:
                self.idle.add(writer)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                finally:
                    self.idle.discard(writer)
                if writer.is_closing():  # shutdown closed it while the request arrived: no answer can reach the client
                    return
                method, path, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                answer = await self.respond(method, path, body)
                if answer is None:
                    return
                status, headers, payload = answer
                close = self.stopping
                if b'"__chunked__"' in body:
                    headers = {**headers, "Transfer-Encoding": "chunked"}
                    half = len(payload) // 2
                    payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:half], payload[half:])) + b"0\r\n\r\n"
                else:
                    headers = {**headers, "Content-Length": str(len(payload))}
                if close:
                    headers["Connection"] = "close"
                head_lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers.items()]
                writer.write(("\r\n".join(head_lines) + "\r\n\r\n").encode() + payload)
                await writer.drain()
                if close:
                    return
        finally:
            self.handlers.discard(asyncio.current_task())
            writer.close()

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop reading new requests; answer those read (for up to `grace` s); close every connection."""
        self.stopping = True
        for writer in list(self.idle):
            writer.close()
        deadline = time.perf_counter() + grace
        while self.handlers and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        for handler in list(self.handlers):
            handler.cancel()


async def start_toy(server: ToyServer) -> tuple[asyncio.AbstractServer, asyncio.Task, int]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    worker = asyncio.create_task(server.worker())
    return listener, worker, listener.sockets[0].getsockname()[1]


def toy_main() -> None:
    """`python tests/test_load_test.py BUNDLE --port 0 [...]`: the toy server in place of nlprnn.serve."""
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--max_batch_size", type=int, default=64)
    parser.add_argument("--exit_code", type=int, default=0, help="exit with this after SIGTERM")
    parser.add_argument("--miscount", type=int, default=0, help="add this to the final count of answered requests")
    options, _ = parser.parse_known_args()

    async def serve() -> None:
        server = ToyServer(max_batch_size=options.max_batch_size, service_s=0.002)
        listener, worker, port = await start_toy(server)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(f"nlprnn.serve: ready on http://127.0.0.1:{port} (toy)", file=sys.stderr, flush=True)
        await stop.wait()
        listener.close()
        await server.shutdown()
        worker.cancel()
        print(f"nlprnn.serve: stopped; answered {server.answered + options.miscount} classify requests "
              f"({server.answered_texts} texts)", file=sys.stderr, flush=True)

    asyncio.run(serve())
    sys.exit(options.exit_code)


# --- statistics -----------------------------------------------------------------------------------


def test_percentile_interpolates_as_numpy_does():
    lt = load_script("load_test")
    values = sorted(np.random.default_rng(0).exponential(size=101).tolist())
    for q in (0, 1, 50, 95, 99, 99.9, 100):
        assert lt.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert lt.percentile([], 50) is None
    assert lt.percentile([3.0], 99) == 3.0


def test_summarize_counts_by_start_and_throughput_by_completion():
    lt = load_script("load_test")
    records = [
        (0.5, 1.5, 200, 2),  # warm-up request finishing inside the window: throughput only
        (1.0, 1.1, 200, 1),
        (1.2, 1.4, 200, 3),
        (1.5, 1.5, "client_overflow", 1),
        (2.0, 2.5, 503, 1),
        (2.5, 4.0, "timeout", 1),
        (2.9, 3.5, 200, 1),  # started inside, finished after: latency yes, throughput no
        (3.0, 3.1, 200, 1),  # started after the window
    ]
    s = lt.summarize(records, 1.0, 3.0)
    assert s["requests"] == 6 and s["texts"] == 8
    assert s["outcomes"] == {"200": 3, "503": 1, "client_overflow": 1, "timeout": 1}
    assert s["lost"] == 1 and s["timeouts"] == 1 and s["client_overflow"] == 1
    assert s["ok_requests"] == 3 and s["ok_texts"] == 5
    assert s["throughput_requests_per_s"] == pytest.approx(3 / 2)  # 1.5, 1.1 and 1.4 completed in [1, 3]
    assert s["throughput_texts_per_s"] == pytest.approx(6 / 2)
    assert s["latency_ms"]["p50"] == pytest.approx(200.0)
    assert s["latency_ms"]["max"] == pytest.approx(600.0)
    assert s["rejected_latency_ms"]["p99"] == pytest.approx(500.0)  # the one 503


def test_metrics_are_summed_over_labels_and_give_the_mean_batch():
    lt = load_script("load_test")
    before = lt.metric_totals("nlprnn_batch_size_sum 10\nnlprnn_batch_size_count 5\n")
    after = lt.metric_totals(
        "# HELP nlprnn_batch_size texts per batch\n# TYPE nlprnn_batch_size histogram\n"
        'nlprnn_batch_size_bucket{le="1"} 4\nnlprnn_batch_size_bucket{le="+Inf"} 9\n'
        'nlprnn_batch_size_sum 90\nnlprnn_batch_size_count 9\nnlprnn_requests_total{status="200"} 7\n'
        'nlprnn_requests_total{status="503",path="/v1/classify"} 2 1712345678\n'
    )
    assert after["nlprnn_requests_total"] == 9 and after["nlprnn_batch_size_bucket"] == 13
    assert lt.mean_batch_size(before, after) == pytest.approx(80 / 4)
    assert lt.mean_batch_size(None, after) == pytest.approx(10.0)
    assert lt.mean_batch_size(before, {"other": 1.0}) is None
    assert lt.mean_batch_size(after, after) is None  # no batch in between


def test_texts_per_request_is_a_number_or_a_range():
    lt = load_script("load_test")
    assert lt.texts_range("4") == (4, 4)
    assert lt.texts_range("1-8") == (1, 8)
    for bad in ("0", "8-1", "a", "1-"):
        with pytest.raises(argparse.ArgumentTypeError):
            lt.texts_range(bad)
    requests = lt.make_requests(lt.Target("127.0.0.1", 1), ["a", "b", "c"], 200, 1, 3, seed=0)
    counts = {r.texts for r in requests}
    assert counts == {1, 2, 3}
    first = requests[0].data
    head, body = first.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v1/classify HTTP/1.1\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert len(json.loads(body)["texts"]) == requests[0].texts
    assert lt.make_requests(lt.Target("127.0.0.1", 1), ["a", "b", "c"], 200, 1, 3, seed=0) == requests  # seeded


# --- the client against the toy server ------------------------------------------------------------


def test_client_tells_every_outcome_apart_and_keeps_connections_alive():
    lt = load_script("load_test")

    async def scenario() -> None:
        toy = ToyServer(max_queue=3)
        listener, worker, port = await start_toy(toy)
        target = lt.Target("127.0.0.1", port)
        recorder = lt.Recorder()

        def request(texts: list[str]):
            body = json.dumps({"texts": texts}).encode()
            return lt.Request(lt.post_request(target, "/v1/classify", body), len(texts))

        connection = await lt.Connection.open(target)
        for texts in (["good"], ["a", "b", "c"], ["__chunked__", "x"]):
            assert await lt.classify(connection, request(texts), 5.0, recorder) == (200, True)
        assert toy.connections == 1  # three requests on one keep-alive connection
        assert await lt.classify(connection, request(["a", "b", "c", "d"]), 5.0, recorder) == (503, True)
        assert await lt.classify(connection, request(["__bad__", "x"]), 5.0, recorder) == ("bad_results", True)
        assert await lt.classify(connection, request(["__close__"]), 5.0, recorder) == ("closed", False)
        connection.close()

        connection = await lt.Connection.open(target)
        started = time.perf_counter()
        assert await lt.classify(connection, request(["__sleep__"]), 0.2, recorder) == ("timeout", False)
        assert time.perf_counter() - started < 1.0
        connection.close()

        errors = recorder.errors_summary()
        assert errors["messages"] == [{"status": 503, "error": "the queue is full; retry later", "count": 1}]
        assert errors["missing_retry_after"] == 0 and errors["malformed_error_bodies"] == 0
        metrics = lt.metric_totals((await lt.http_get(target, "/metrics")).body.decode())
        assert metrics["nlprnn_batch_size_count"] >= 3
        assert (await lt.http_get(target, "/readyz")).status == 200

        listener.close()
        await toy.shutdown(grace=0)  # the "__sleep__" request would never finish
        worker.cancel()
        # the listener is gone: a new connection is refused, and counted as such
        assert await lt.connect(target, 1.0) == (None, "connect_refused")

    asyncio.run(scenario())


def test_loops_record_every_request_and_overflow_of_the_pool():
    lt = load_script("load_test")

    async def scenario() -> None:
        toy = ToyServer(service_s=0.05, max_batch_size=1)  # 20 requests/s at most
        listener, worker, port = await start_toy(toy)
        target = lt.Target("127.0.0.1", port)
        requests = lt.make_requests(target, ["good film", "bad film"], 16, 1, 2, seed=1)

        closed = lt.Recorder()
        t0, t1 = await lt.closed_loop(target, requests, 4, 0.1, 0.4, 5.0, closed)
        s = lt.summarize(closed.records, t0, t1)
        assert s["requests"] > 0 and s["outcomes"] == {"200": s["requests"]}
        assert all(r[2] == 200 for r in closed.records)
        assert toy.connections == 4  # one connection per client, kept alive
        assert toy.answered == len(closed.records)

        # 200 arrivals/s against a server of 20/s, through at most 2 connections: most arrivals find none free
        opened = lt.Recorder()
        pool = lt.ConnectionPool(target, limit=2)
        stats = lt.OpenLoopStats()
        (b, e), = await lt.open_loop(pool, requests, [(200.0, 0.5)], 5.0, opened, seed=3, stats=stats)
        assert e - b == pytest.approx(0.5)
        assert len(opened.records) == stats.arrivals > 40
        outcomes = lt.summarize(opened.records, b, e)["outcomes"]
        assert set(outcomes) == {"200", "client_overflow"} and outcomes["client_overflow"] > outcomes["200"]
        assert pool.peak == 2 and len(pool.idle) == pool.open == 2  # every connection came back
        pool.close()

        listener.close()
        await toy.shutdown()
        worker.cancel()

    asyncio.run(scenario())


def test_overload_reports_statuses_rss_and_recovery():
    lt = load_script("load_test")

    class ThisProcess:  # RSS and CPU of the test process stand in for the server's
        pid = os.getpid()
        rss_mb = lt.ServerProcess.rss_mb
        cpu_s = lt.ServerProcess.cpu_s

    async def scenario() -> dict:
        toy = ToyServer(service_s=0.01, max_batch_size=1, max_queue=4)  # 100 requests/s, 4 queued at most
        listener, worker, port = await start_toy(toy)
        target = lt.Target("127.0.0.1", port)
        requests = lt.make_requests(target, ["good film"], 8, 1, 1, seed=1)
        run = lt.ServerRun(ThisProcess(), target, requests)
        settings = lt.Settings(duration=1, warmup=0, baseline_seconds=1.5, overload_seconds=1.5, recovery_seconds=1.5, timeout=5,
                               max_connections=64, sigterm_grace=1, stop_timeout=5, texts_per_request=(1, 1), seed=0)
        result = await lt.scenario_overload(run, 60.0, settings, lt.ConnectionPool(target, 64))
        listener.close()
        await toy.shutdown()
        worker.cancel()
        return result

    result = asyncio.run(scenario())
    assert result["rates"] == {"baseline": 30.0, "overload": 120.0, "recovery": 30.0}
    assert result["overload"]["outcomes"].get("503", 0) > 0  # 120/s against 100/s with a queue of 4
    assert result["only_200_or_503"] and result["lost"] == 0 and result["timeouts"] == 0
    assert result["recovered"], result["recovery_settled"]
    assert result["baseline"]["outcomes"] == {"200": result["baseline"]["requests"]}
    rss = result["rss_mb"]
    assert rss["start"] > 0 and rss["max"] >= rss["start"] and len(rss["samples"]) >= 4
    assert result["errors"]["missing_retry_after"] == 0


# --- end to end, with the toy server in place of nlprnn.serve -------------------------------------


def test_a_short_run_checks_both_servers_and_writes_the_report(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a fine film\nan awful film\n\na long and moving story\n")
    out = tmp_path / "docs"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--input", str(texts), "--scenarios", "closed,open,sigterm",
         "--clients", "8", "--texts_per_request", "1-3", "--duration", "0.6", "--warmup", "0.2", "--rates", "50",
         "--out", str(out), "--server_command", f"{sys.executable} {Path(__file__).resolve()}", "--server_threads", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "serving.json").read_text())
    assert results["settings"]["texts_available"] == 3  # the blank line is no text
    assert all(c["ok"] for c in results["checks"].values()), results["checks"]
    on, off = results["configs"]["batching_on"], results["configs"]["batching_off"]
    assert off["server_command"][-2:] == ["--max_batch_size", "1"]
    for config in (on, off):
        closed = config["closed"][0]
        assert closed["clients"] == 8 and closed["lost"] == 0 and closed["throughput_texts_per_s"] > 0
        assert closed["mean_batch_size"] is not None
        assert config["open"][0]["target_rate"] == 50 and config["open"][0]["outcomes"].keys() == {"200"}
        assert config["server"]["exit_code"] == 0
        assert config["server"]["answered_requests"] == config["server"]["client"]["ok_requests"] > 0
        sigterm = config["sigterm"]
        assert sigterm["server"]["exit_code"] == 0 and sigterm["timeouts"] == 0
        assert sigterm["server"]["answered_requests"] == sigterm["ok_requests"] > 0
        assert sigterm["in_flight_at_signal"] <= 8
    assert off["closed"][0]["mean_batch_size"] == pytest.approx(1.0)
    assert results["summary"]["batching"]["ratio"] > 0
    assert "batching on" in completed.stdout and "FAIL" not in completed.stdout
    report = (out / "serving.md").read_text()
    assert "## Machine" in report and "## SIGTERM under load" in report and "scripts/load_test.py" in report
    assert (out / "serving.png").stat().st_size > 0


def test_a_server_that_miscounts_or_fails_to_exit_0_fails_the_run(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a fine film\n")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--input", str(texts), "--scenarios", "sigterm", "--configs",
         "batching_off", "--clients", "4", "--duration", "0.4", "--warmup", "0.1", "--json", str(tmp_path / "r.json"),
         "--server_command", f"{sys.executable} {Path(__file__).resolve()}", "--", "--exit_code", "3", "--miscount", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 1
    sigterm = json.loads((tmp_path / "r.json").read_text())["configs"]["batching_off"]["sigterm"]
    assert sigterm["server"]["exit_code"] == 3
    assert sigterm["server"]["answered_requests"] == sigterm["ok_requests"] + 1 and not sigterm["answered_matches_ok"]
    assert "FAIL batching_off: sigterm, exit 0" in completed.stdout
    assert "FAIL batching_off: sigterm, answered count = client's 200s" in completed.stdout


if __name__ == "__main__":
    toy_main()
