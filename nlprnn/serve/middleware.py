"""ASGI middleware around the app: a body-size limit, unexpected errors answered as 500, and request metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nlprnn.serve.metrics import ServerMetrics
from nlprnn.serve.schema import error_response, shorten

LOGGED_CHARS = 300  # most characters of an exception's repr in a log line

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class BodyLimit:
    """Reads a POST body whole before the app sees it: 413 past `max_bytes`, before any of it reaches a JSON
    parser; 408 when it has not all arrived within `timeout_s`, so that a client that stops half-way holds
    neither a connection nor the server's shutdown."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_big(scope, receive, send)
        try:
            whole = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except _TooBig:
            return await self.too_big(scope, receive, send)
        except asyncio.TimeoutError:
            message = f"the body did not arrive within {self.timeout_s:g} s"
            return await error_response(408, message)(scope, receive, send)
        if whole is None:  # the client has gone
            return
        body = {"type": "http.request", "body": whole, "more_body": False}
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return body

        await self.app(scope, replay, send)

    async def _read(self, receive: Callable) -> bytes | None:
        """The whole body, or None if the client disconnects first; raises _TooBig past max_bytes."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooBig
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def too_big(self, scope: dict, receive: Callable, send: Callable) -> None:
        await error_response(413, f"the body is over {self.max_bytes} bytes")(scope, receive, send)


class _TooBig(Exception):
    pass


class RequestMetrics:
    """Counts answers by endpoint and status, and times the requests of one endpoint."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: tuple[str, ...], timed: str) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints  # counted by path; any other path as "other", to bound the label's values
        self.timed = timed

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"

        async def send_and_count(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
                if endpoint == self.timed:
                    self.metrics.latency.observe(time.monotonic() - started)
            await send(message)

        await self.app(scope, receive, send_and_count)


def describe(err: BaseException) -> str:
    """An exception on one line of bounded length: repr escapes the line breaks of its message."""
    return shorten(repr(err), LOGGED_CHARS)


class InternalErrors:
    """Answers an unexpected exception with a one-line JSON 500 and logs it as one line.

    Starlette's own handler for `Exception` sits outside every middleware, so RequestMetrics never saw
    those answers, and it raises the exception again, which uvicorn logs as a whole traceback.
    """

    def __init__(self, app: ASGIApp, log: logging.Logger) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_and_note(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as err:
            self.log.error("unexpected error on %s %s: %s", scope["method"], scope["path"], describe(err))
            self.log.debug("its traceback", exc_info=True)
            if not started:  # once an answer has begun, the server closes the connection instead
                await error_response(500, f"internal error: {type(err).__name__}")(scope, receive, send)
