"""python -m nlprnn.serve BUNDLE: an HTTP service classifying texts with an exported bundle.

    POST /v1/classify  {"texts": ["...", ...]}  ->  {"results": [{"label": ..., "probabilities": {...}}, ...]}
    POST /v1/explain   the same, each result with "explanation": [{"word", "start", "end", "contribution"}, ...]
    GET  /             a page to try the model in a browser
    GET  /healthz, /readyz, /metrics (Prometheus) and /openapi.json

Concurrent requests are batched dynamically (see `nlprnn.serve.batcher`). On SIGTERM or Ctrl-C the
server stops accepting connections, answers every request it has read, and exits 0. A model that fails
its warm-up batch stops the server at once, with one line saying why and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys

from nlprnn.errors import UserError, exit_on_reported_error

PROG = "nlprnn.serve"


def parse_args(args: list[str] | None) -> argparse.Namespace:
    from nlprnn.serve.app import ServeSettings

    defaults = ServeSettings()
    parser = argparse.ArgumentParser(prog="python -m nlprnn.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle folder written by `python -m nlprnn.export`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    parser.add_argument("--max_batch_size", type=int, default=defaults.max_batch_size,
                        help="most texts gathered into one batch; 1 turns batching off")
    parser.add_argument("--model_batch_size", type=int, default=8,
                        help="most texts per model call: a batch is sorted by length and run in calls of this many, "
                        "so short texts are not padded to the longest")
    parser.add_argument("--max_wait_ms", type=float, default=defaults.max_wait_ms,
                        help="longest time a text waits for its batch to fill")
    parser.add_argument("--max_queue", type=int, default=defaults.max_queue,
                        help="most texts waiting at once; requests beyond get 503 with Retry-After")
    parser.add_argument("--max_texts", type=int, default=defaults.max_texts, help="most texts per request (413 beyond)")
    parser.add_argument("--max_chars", type=int, default=defaults.max_chars, help="most characters per text (413 beyond)")
    parser.add_argument("--max_body_bytes", type=int, default=defaults.max_body_bytes,
                        help="largest request body in bytes (413 beyond)")
    parser.add_argument("--timeout_s", type=float, default=defaults.timeout_s,
                        help="a request not answered in this time gets 504 and its texts leave the queue")
    parser.add_argument("--threads", type=int, default=None,
                        help="model calls run at once, one core each (default: the cores this process may use)")
    parser.add_argument("--access_log", action="store_true", help="log every request (costs throughput)")
    return parser.parse_args(args)


def main(args: list[str] | None = None) -> None:
    options = parse_args(args)
    with exit_on_reported_error(PROG):
        try:
            import uvicorn

            from nlprnn.serve.app import CLASSIFY, ServeSettings, create_app
        except ImportError as err:
            raise UserError(f'serving needs the serve extra ({err.name} is missing): pip install "nlprnn[serve]"') from None
        from nlprnn.deploy.predictor import Predictor

        settings = ServeSettings(**{name: getattr(options, name) for name in ServeSettings.__dataclass_fields__})
        if not 0 <= options.port <= 65535:
            raise UserError(f"--port must be in 0..65535, not {options.port}")
        if options.model_batch_size < 1:
            raise UserError(f"--model_batch_size must be at least 1, not {options.model_batch_size}")
        predictor = Predictor(options.bundle, batch_size=options.model_batch_size, threads=options.threads,
                              parallel_calls=True)

        async def announce() -> None:
            while not server.started:  # the warm-up can finish before the socket is bound
                await asyncio.sleep(0.01)
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            print(f"{PROG}: ready on http://{host}:{port} (bundle {options.bundle}, labels {', '.join(predictor.labels)}; "
                  f"max_batch_size {settings.max_batch_size}, model_batch_size {options.model_batch_size}, "
                  f"max_wait_ms {settings.max_wait_ms:g})",
                  file=sys.stderr, flush=True)

        warm_up_failed = False

        def stop_unready() -> None:  # the app has logged why; a server that can never be ready should not linger
            nonlocal warm_up_failed
            warm_up_failed = True
            server.should_exit = True

        app = create_app(predictor, settings, on_ready=announce, on_failure=stop_unready)
        server = uvicorn.Server(uvicorn.Config(
            app, host=options.host, port=options.port, log_level="warning", access_log=options.access_log,
            timeout_keep_alive=30,
        ))
        # uvicorn shuts down gracefully on these signals, then raises them again with the handlers it found.
        # These handlers ask for the same shutdown (a signal before uvicorn's own handlers are in place
        # still stops it) and let the process end with status 0 once everything is answered.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
        quiet_garbage_collector()
        prompt_thread_switches()
        server.run()  # a port that is taken, or a host that does not resolve, ends it here: uvicorn logs why, exits 3
        if warm_up_failed:
            raise SystemExit(1)
        answered = app.state.metrics.registry.get_sample_value(
            "nlprnn_requests_total", {"endpoint": CLASSIFY, "status": "200"}) or 0
        texts = app.state.metrics.registry.get_sample_value("nlprnn_texts_classified_total") or 0
        print(f"{PROG}: stopped; answered {int(answered)} classify requests ({int(texts)} texts)", file=sys.stderr)


def quiet_garbage_collector() -> None:
    """Fewer collector passes, and none over the objects that live as long as the process.

    Python's defaults run a young-generation pass every 700 allocations and a full pass over every tracked
    object every hundred or so of those; a server under load allocates that many within milliseconds, and the
    pauses made the p99 latency at half load 27-35 ms where the median was 5 ms (8.9-11.4 ms like this).
    Reference counting still frees everything that is not in a cycle at once.
    """
    gc.freeze()  # the model, tokenizer and app, loaded by now: never garbage, never scanned again
    gc.set_threshold(50_000, 50, 100)


def prompt_thread_switches() -> None:
    """Hand the interpreter lock between threads every 1 ms rather than every 5.

    Under load the event loop runs Python without pause, and a model thread coming back from
    onnxruntime waits for the lock until the loop's thread is told to let go: up to the switch interval,
    once per model call. At 5 ms these waits held the batching server at 4,042 texts/s with 64 clients,
    against 4,700-4,900 at 1 ms (scripts/load_test.py, closed loop).
    """
    sys.setswitchinterval(0.001)


if __name__ == "__main__":
    main()
