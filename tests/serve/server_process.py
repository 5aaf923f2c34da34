"""A `python -m nlprnn.serve` subprocess for the serving tests.

Imported as `serve.server_process` (tests/ is on the path).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


class Server:
    """A server subprocess on a free loopback port; its stderr is collected line by line."""

    def __init__(self, bundle: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "nlprnn.serve", str(bundle), "--port", "0", "--threads", "1", *flags]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process = subprocess.Popen(command, cwd=REPO, env=environment, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.port = self._wait_until_ready()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def _wait_until_ready(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if "ready on http://" in line:
                return int(line.split("ready on http://")[1].split()[0].rsplit(":", 1)[1])
        self.process.kill()
        raise AssertionError(f"the server did not become ready: {''.join(self.stderr)}")

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def classify(self, texts: object) -> tuple[int, dict[str, str], dict]:
        status, headers, body = self.request("POST", "/v1/classify", json.dumps({"texts": texts}))
        return status, headers, json.loads(body)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, parsed by the Prometheus client's own parser."""
        status, _, body = self.request("GET", "/metrics")
        assert status == 200
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)
