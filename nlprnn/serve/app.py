"""The HTTP API: classify, explain, a page to try the model, health, readiness, metrics and the OpenAPI
document, over one dynamic batcher.

Every error is answered with a status code and a one-line JSON body {"error": "..."}:
400 malformed JSON, 405 a method the path does not take (with Allow), 413 a body, request or text over
its limit, 422 a body of the wrong shape, 500 an unexpected error (logged as one line), 503 a full queue
or a server not yet warm (with Retry-After) or whose warm-up failed, 504 a request past its deadline,
408 a body that has not all arrived by then.
Starlette rather than FastAPI: its thinner stack served 12% more requests per second here, and the
few models the API has give the OpenAPI document directly (`nlprnn.serve.schema`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from nlprnn import __version__
from nlprnn.deploy.predictor import Prediction, Predictor
from nlprnn.errors import UserError
from nlprnn.serve.batcher import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from nlprnn.serve.metrics import ServerMetrics
from nlprnn.serve.middleware import BodyLimit, InternalErrors, RequestMetrics, describe
from nlprnn.serve.schema import ApiError, error_response, json_response, openapi, parse_texts

log = logging.getLogger("nlprnn.serve")
CLASSIFY = "/v1/classify"
EXPLAIN = "/v1/explain"
PAGE = files("nlprnn.serve").joinpath("page.html").read_text(encoding="utf-8")  # shipped as package data
ENDPOINTS = (CLASSIFY, EXPLAIN, "/", "/healthz", "/readyz", "/metrics", "/openapi.json")


def explain_cost(texts: Sequence[str], max_length: int) -> int:
    """Places in the queue that explaining `texts` takes: one per row its model calls may run.

    A text is explained by running it and one variant per word the model reads: at most
    min(tokens, max_length) + 1 rows. A place per row keeps explains from holding the model's thread
    much longer than a full queue: at max_length 40 a full-length explain (41 rows) took the model time
    of ~23 classified texts, and the cost grows with max_length. Characters stand in for tokens, as a
    token almost always covers one character or more: nothing is tokenized on the event loop to count.
    """
    return sum(min(len(text), max_length) + 1 for text in texts)


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches and what it accepts.

    Args:
        max_batch_size: most texts per batch; the Predictor runs a batch in length-sorted model calls.
        max_wait_ms: longest time a text waits for its batch to fill.
        max_queue: most texts waiting at once; a request that would go beyond gets 503. It bounds the
            time a text waits (here about 0.1 s at full load) and the memory the queue can hold. A text
            being explained takes up to max_length + 1 places (`explain_cost`, at most max_queue) until its
            explanation is done; a request's texts are explained one after another, batches running between.
        max_texts: most texts in one request (413 beyond).
        max_chars: most characters in one text (413 beyond).
        max_body_bytes: largest request body (413 beyond).
        timeout_s: a request not answered within this many seconds gets 504 and leaves the queue; one whose
            body has not all arrived within it, 408.
    """

    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_texts: int = 64
    max_chars: int = 20_000
    max_body_bytes: int = 1 << 20
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_texts", "max_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, not {getattr(self, name)}")
        # math.isfinite: nan passes every comparison below, and a nan deadline answers every request 504.
        if not (math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0):
            raise UserError(f"--max_wait_ms must be 0 or more and finite, not {self.max_wait_ms:g}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise UserError(f"--timeout_s must be positive and finite, not {self.timeout_s:g}")
        if self.max_texts > self.max_queue:
            raise UserError(f"--max_texts ({self.max_texts}) cannot exceed --max_queue ({self.max_queue})")


def create_app(
    predictor: Predictor, settings: ServeSettings, on_ready: Callable[[], Awaitable[None]] | None = None,
    on_failure: Callable[[], None] | None = None,
) -> Starlette:
    """The ASGI app serving `predictor`; its lifespan warms the model up, then starts the batcher.

    `/healthz` answers at once; `/readyz` and classify answer 503 until the warm-up batch has run,
    after which `on_ready` is awaited. A warm-up that fails is logged, `/readyz` and classify answer 503
    from then on, and `on_failure` is called so that the caller can stop the server. On shutdown the
    batcher answers what it holds, then stops.
    """
    metrics = ServerMetrics()
    batcher: Batcher[Prediction] = Batcher(
        predictor.predict, settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue,
        on_batch=metrics.record_batch,
    )
    metrics.queue_depth.set_function(lambda: batcher.queued_texts)
    ready = asyncio.Event()
    failed: str | None = None  # the type of error the warm-up failed with; then the model cannot answer
    document = openapi("nlprnn", __version__, f"Text classification with the bundle {predictor.bundle.root.resolve()}")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        warm_up = asyncio.get_running_loop().create_task(warm_up_then_start())
        yield
        warm_up.cancel()
        await batcher.close()

    async def warm_up_then_start() -> None:
        """One full batch through the model first: the first calls allocate its memory."""
        nonlocal failed
        texts = ["warm-up " * 8] * settings.max_batch_size
        try:
            await asyncio.get_running_loop().run_in_executor(None, predictor.predict, texts)
        except Exception as err:  # a model that cannot run a batch would leave the server unready for good
            failed = type(err).__name__  # clients get its type, the log the whole error
            log.error("the model failed its warm-up batch, so the server cannot answer: %s", describe(err))
            log.debug("the warm-up's traceback", exc_info=True)
            if on_failure is not None:
                on_failure()
            return
        batcher.start()
        ready.set()
        if on_ready is not None:
            await on_ready()

    async def accepted_texts(request: Request) -> list[str]:
        """The request's texts once they are within the limits and the model is warm."""
        texts = parse_texts(await request.body())
        if len(texts) > settings.max_texts:
            raise ApiError(413, f"{len(texts)} texts in one request; at most {settings.max_texts} are accepted")
        for i, text in enumerate(texts):
            if len(text) > settings.max_chars:
                raise ApiError(413, f"texts[{i}] has {len(text)} characters; at most {settings.max_chars} are accepted")
        if failed is not None:
            raise ApiError(503, f"not ready: the model failed its warm-up batch ({failed})")
        if not ready.is_set():
            raise ApiError(503, "not ready: the model is warming up", retry=True)
        return texts

    async def answered(work: Awaitable[Any]) -> Any:
        """The batcher's answer, its refusals turned into API errors."""
        try:
            return await work
        except QueueFull:
            raise ApiError(503, "busy: the queue is full; retry later", retry=True) from None
        except ShuttingDown:
            raise ApiError(503, "shutting down", retry=True) from None
        except DeadlineExceeded:
            raise ApiError(504, f"not answered within {settings.timeout_s:g} s") from None

    async def classify(request: Request) -> Response:
        texts = await accepted_texts(request)
        predictions = await answered(batcher.classify(texts, settings.timeout_s))
        return json_response({"results": [{"label": label, "probabilities": p} for label, p in predictions]})

    async def explain(request: Request) -> Response:
        texts = await accepted_texts(request)
        if not texts:
            return json_response({"results": []})
        # On the model's thread, between batches: the session is never run by two threads at once. One job per
        # text, so classify batches run between them and a request past its deadline starts no more of them.
        deadline = time.monotonic() + settings.timeout_s
        explanations = []
        for text in texts:
            cost = min(explain_cost([text], predictor.max_length), settings.max_queue)  # so that it can always run
            explanations += await answered(batcher.run_alone(
                predictor.explain, [text], cost=cost, timeout_s=max(deadline - time.monotonic(), 0.0)))
        # Up to max_length words per text: serialized off the event loop, which keeps answering meanwhile.
        return await asyncio.to_thread(
            lambda: json_response({"results": [explanation.to_json() for explanation in explanations]}))

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if failed is not None:
            return error_response(503, f"not ready: the model failed its warm-up batch ({failed})")
        if not ready.is_set():
            return error_response(503, "not ready: the model is warming up", retry=True)
        return json_response({"status": "ready", "labels": predictor.labels})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(request: Request) -> Response:
        return json_response(document)

    async def api_error(request: Request, err: ApiError) -> Response:
        return error_response(err.status, str(err), err.retry)

    async def http_error(request: Request, err: HTTPException) -> Response:
        return error_response(err.status_code, str(err.detail), headers=err.headers)  # e.g. a 405's Allow

    app = Starlette(
        routes=[
            Route(CLASSIFY, classify, methods=["POST"]), Route(EXPLAIN, explain, methods=["POST"]),
            Route("/", page),
            Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", prometheus),
            Route("/openapi.json", openapi_json),
        ],
        middleware=[
            Middleware(RequestMetrics, metrics=metrics, endpoints=ENDPOINTS, timed=CLASSIFY),
            Middleware(InternalErrors, log=log),  # inside RequestMetrics, so that a 500 is counted
            Middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.timeout_s),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    return app
