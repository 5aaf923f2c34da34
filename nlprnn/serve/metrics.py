"""The server's Prometheus metrics, in a registry of its own (so several apps in one process stay apart)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nlprnn.serve.batcher import BatchRecord

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW_S = 10.0  # texts/s is averaged over this many recent seconds


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nlprnn_requests", "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "nlprnn_request_seconds", "Time from a classify request's arrival to its answer.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "nlprnn_batch_size", "Texts per batch.", buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "nlprnn_batch_seconds", "Time of one model call (tokenize, pad, run).",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.texts = Counter("nlprnn_texts_classified", "Texts classified.", registry=self.registry)
        self.queue_depth = Gauge("nlprnn_queue_texts", "Texts waiting for a model call.", registry=self.registry)
        self.texts_per_second = Gauge(
            "nlprnn_texts_per_second", f"Texts classified per second over the last {RATE_WINDOW_S:g} s.",
            registry=self.registry,
        )
        self.texts_per_second.set_function(self._recent_rate)
        self._recent: deque[tuple[float, int]] = deque()  # (time, texts) of recent model calls

    def record_batch(self, record: BatchRecord) -> None:
        self.batch_size.observe(record.texts)
        self.batch_seconds.observe(record.seconds)
        self.texts.inc(record.texts)
        now = time.monotonic()
        self._recent.append((now, record.texts))
        self._forget_before(now - RATE_WINDOW_S)

    def _recent_rate(self) -> float:
        now = time.monotonic()
        self._forget_before(now - RATE_WINDOW_S)
        return sum(texts for _, texts in self._recent) / RATE_WINDOW_S

    def _forget_before(self, cutoff: float) -> None:
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
