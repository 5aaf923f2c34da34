"""python -m nlprnn.serve as a real process on loopback: contracts, batching, limits, shutdown."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nlprnn.deploy import Predictor

from deploy.tiny_bundles import LABELS, build_bundle
from serve.server_process import REPO, Server

TRAINING_MODULES = ("torch", "lightning", "torchmetrics", "jsonargparse", "datasets", "wandb", "onnx", "pandas")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("serve") / "bundle")


@pytest.fixture(scope="module")
def server(bundle):
    server = Server(bundle, "--max_texts", "4", "--max_chars", "50", "--max_body_bytes", "2000")
    yield server
    assert server.stop() == 0


def test_classify_answers_in_request_order_with_the_predictors_results(server, bundle):
    texts = ["good movie", "the plot was awful", "", "café ünïcode"]
    status, headers, body = server.classify(texts)
    assert status == 200 and headers["content-type"] == "application/json"
    expected = Predictor(bundle, threads=1).predict(texts)
    assert len(body["results"]) == len(texts)
    for result, (label, probabilities) in zip(body["results"], expected):
        assert result["label"] == label and list(result["probabilities"]) == LABELS
        assert result["probabilities"] == pytest.approx(probabilities, abs=1e-6)
        assert sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert server.classify([])[::2] == (200, {"results": []})


def test_health_readiness_and_the_openapi_schema(server):
    status, _, body = server.request("GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = server.request("GET", "/readyz")
    assert status == 200 and json.loads(body) == {"status": "ready", "labels": LABELS}
    status, _, body = server.request("GET", "/openapi.json")
    schema = json.loads(body)
    classify = schema["paths"]["/v1/classify"]["post"]
    assert {"200", "400", "408", "413", "422", "503", "504"} == set(classify["responses"])
    request_schema = classify["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert schema["components"]["schemas"][request_schema]["required"] == ["texts"]
    assert schema["components"]["schemas"]["ClassifyRequest"]["properties"]["texts"]["items"] == {"type": "string"}
    assert {"/v1/classify", "/v1/explain", "/", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    explain = schema["paths"]["/v1/explain"]["post"]
    assert set(explain["responses"]) == set(classify["responses"])
    result = schema["components"]["schemas"]["ExplainResult"]
    assert set(result["required"]) == {"label", "probabilities", "explanation"}
    word = schema["components"]["schemas"]["WordContribution"]
    assert set(word["required"]) == {"word", "start", "end", "contribution"}


def test_explain_answers_each_texts_prediction_and_the_contribution_of_each_word(server, bundle):
    texts = ["good movie, awful plot", "", "café  ünïcode 🎬 great"]
    status, headers, raw = server.request("POST", "/v1/explain", json.dumps({"texts": texts}))
    assert status == 200 and headers["content-type"] == "application/json"
    results = json.loads(raw)["results"]
    expected = Predictor(bundle, threads=1).explain(texts)
    assert [result["label"] for result in results] == [explanation.label for explanation in expected]
    for text, result, explanation in zip(texts, results, expected):
        assert list(result) == ["label", "probabilities", "explanation"]
        assert result["probabilities"] == pytest.approx(explanation.probabilities, abs=1e-6)
        assert [(w["word"], w["start"], w["end"]) for w in result["explanation"]] == [
            (w.word, w.start, w.end) for w in explanation.words]
        assert [w["contribution"] for w in result["explanation"]] == pytest.approx(
            [w.contribution for w in explanation.words], abs=1e-6)
        assert all(text[w["start"] : w["end"]] == w["word"] for w in result["explanation"])
    assert results[1]["explanation"] == []
    status, _, raw = server.request("POST", "/v1/explain", '{"texts": []}')
    assert status == 200 and json.loads(raw) == {"results": []}


def test_the_page_is_served_self_contained(server):
    status, headers, raw = server.request("GET", "/")
    page = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert 'id="text"' in page and 'id="classify"' in page and "/v1/explain" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere: it works offline


def test_a_body_without_a_json_content_type_is_read_as_json(server):
    status, _, body = server.request("POST", "/v1/classify", '{"texts": ["good"]}',
                                     {"Content-Type": "application/x-www-form-urlencoded"})  # what curl -d sends
    assert status == 200 and len(json.loads(body)["results"]) == 1


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("POST", "/v1/classify", '{"texts": ["good"', 400, "not valid JSON"),
        ("POST", "/v1/classify", "", 400, "not valid JSON"),
        ("POST", "/v1/classify", '{"texts": "good movie"}', 422, "texts: Input should be a valid array"),
        ("POST", "/v1/classify", '{"texts": ["good", 3]}', 422, "texts.1: Input should be a valid string"),
        ("POST", "/v1/classify", '{"text": ["good"]}', 422, "texts: Field required"),
        ("POST", "/v1/classify", '["good"]', 422, "Input should be an object"),
        ("POST", "/v1/classify", json.dumps({"texts": ["a"] * 5}), 413, "5 texts in one request; at most 4"),
        ("POST", "/v1/classify", json.dumps({"texts": ["ok", "x" * 51]}), 413, "texts[1] has 51 characters"),
        ("POST", "/v1/classify", json.dumps({"texts": ["word " * 500]}), 413, "the body is over 2000 bytes"),
        ("POST", "/v1/explain", '{"texts": ["good"', 400, "not valid JSON"),
        ("POST", "/v1/explain", '{"texts": ["good", null]}', 422, "texts.1: Input should be a valid string"),
        ("POST", "/v1/explain", json.dumps({"texts": ["a"] * 5}), 413, "5 texts in one request; at most 4"),
        ("POST", "/v1/explain", json.dumps({"texts": ["x" * 51]}), 413, "texts[0] has 51 characters"),
        ("POST", "/v1/explain", json.dumps({"texts": ["word " * 500]}), 413, "the body is over 2000 bytes"),
        ("GET", "/v1/classify", None, 405, "Method Not Allowed"),
        ("GET", "/v1/explain", None, 405, "Method Not Allowed"),
        ("GET", "/v2/classify", None, 404, "Not Found"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_one_line_json_error_and_the_server_stays_up(
    server, method, path, body, status, says
):
    got, headers, raw = server.request(method, path, body)
    assert got == status
    assert headers["content-type"] == "application/json" and b"\n" not in raw.strip()
    error = json.loads(raw)
    assert list(error) == ["error"] and says in error["error"]
    assert server.classify(["good"])[0] == 200


def test_an_escaped_lone_surrogate_is_valid_json_and_its_text_is_classified(server):
    """JSON allows "\ud800" (half a pair, as a truncated emoji leaves it); the text is read with U+FFFD there."""
    status, _, replaced = server.request("POST", "/v1/classify", json.dumps({"texts": ["good \ufffd movie"]}))
    assert status == 200
    status, _, raw = server.request("POST", "/v1/classify", '{"texts": ["good \\ud800 movie"]}')
    assert status == 200 and json.loads(raw) == json.loads(replaced)
    status, _, raw = server.request("POST", "/v1/explain", '{"texts": ["good \\ud800 movie"]}')
    assert status == 200 and [w["word"] for w in json.loads(raw)["results"][0]["explanation"]][0] == "good"
    status, _, raw = server.request("POST", "/v1/classify", '{"texts": ["\\ud800", 3]}')
    assert status == 422 and "texts.1: Input should be a valid string" in json.loads(raw)["error"]


def test_a_405_says_which_methods_the_path_takes(server):
    status, headers, _ = server.request("GET", "/v1/classify")
    assert status == 405 and headers["allow"] == "POST"


def test_a_422_quotes_a_long_key_of_the_clients_shortened(server):
    status, _, raw = server.request("POST", "/v1/classify", json.dumps({"texts": ["good"], "k" * 1500: 1}))
    error = json.loads(raw)["error"]
    assert status == 422 and len(error) < 200
    assert error.startswith("k" * 79 + "…: Extra inputs are not permitted")


def test_every_route_the_module_help_names_is_served(server):
    import nlprnn.serve.__main__ as cli

    paths = set(re.findall(r"(/[\w./]*)", cli.__doc__.split("\n\n")[1]))
    assert {"/v1/classify", "/v1/explain", "/", "/healthz", "/openapi.json"} <= paths
    for path in paths:
        method = "POST" if path.startswith("/v1/") else "GET"
        assert server.request(method, path, '{"texts": []}' if method == "POST" else None)[0] == 200, path


def test_a_body_larger_than_declared_limit_is_refused_before_it_is_read(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/v1/classify")
    connection.putheader("Content-Length", str(10**9))
    connection.endheaders()  # no body follows: the declared length alone is enough to refuse
    response = connection.getresponse()
    assert response.status == 413 and "over 2000 bytes" in json.loads(response.read())["error"]
    connection.close()


def test_metrics_count_requests_by_status_and_parse_as_prometheus_text(server):
    before = server.metrics()
    server.classify(["good", "bad"])
    server.classify(["x"] * 5)  # 413
    after = server.metrics()
    ok, too_large = "nlprnn_requests_total{endpoint=/v1/classify,status=200}", "nlprnn_requests_total{endpoint=/v1/classify,status=413}"
    assert after[ok] - before.get(ok, 0) == 1 and after[too_large] - before.get(too_large, 0) == 1
    assert after["nlprnn_texts_classified_total"] - before.get("nlprnn_texts_classified_total", 0) == 2
    assert after["nlprnn_request_seconds_count"] - before["nlprnn_request_seconds_count"] == 2
    server.request("POST", "/v1/explain", '{"texts": ["good"]}')
    explained = server.metrics()["nlprnn_requests_total{endpoint=/v1/explain,status=200}"]
    assert explained - before.get("nlprnn_requests_total{endpoint=/v1/explain,status=200}", 0) == 1
    for name in ("nlprnn_batch_size_count", "nlprnn_queue_texts", "nlprnn_texts_per_second"):
        assert name in after
    assert after["nlprnn_texts_per_second"] > 0


def post_concurrently(server: Server, requests: list[list[str]]) -> list[tuple[int, dict[str, str], dict]]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(server.classify, requests))


@pytest.mark.parametrize("threads", ["1", "2"])  # with 2, a batch's 8 model calls of 2 texts run on two threads
def test_concurrent_requests_are_batched_together(bundle, threads):
    server = Server(bundle, "--max_wait_ms", "300", "--threads", threads, "--model_batch_size", "2")
    try:
        requests = [[f"good movie {i}", "awful plot"] for i in range(8)]
        answers = post_concurrently(server, requests)
        assert [status for status, _, _ in answers] == [200] * 8
        expected = Predictor(bundle, threads=1).predict([text for texts in requests for text in texts])
        got = [result for _, _, body in answers for result in body["results"]]
        assert [result["label"] for result in got] == [label for label, _ in expected]  # each request got its own
        for result, (_, probabilities) in zip(got, expected):
            assert result["probabilities"] == pytest.approx(probabilities, abs=1e-6)
        metrics = server.metrics()
        assert metrics["nlprnn_batch_size_sum"] == 16
        assert metrics["nlprnn_batch_size_sum"] / metrics["nlprnn_batch_size_count"] > 1
    finally:
        assert server.stop() == 0


def test_a_full_queue_answers_503_with_retry_after(bundle):
    # The first text waits up to 2 s for a batch to fill, so it holds the one place in the queue.
    server = Server(bundle, "--max_queue", "1", "--max_texts", "1", "--max_wait_ms", "2000")
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(server.classify, ["good"])
            time.sleep(0.5)
            status, headers, body = server.classify(["bad"])
            assert status == 503 and headers["retry-after"] == "1"
            assert body == {"error": "busy: the queue is full; retry later"}
            assert first.result()[0] == 200
        assert server.classify(["bad"])[0] == 200  # room again once the queue drained
    finally:
        assert server.stop() == 0


def test_a_request_past_its_deadline_gets_504_and_its_texts_leave_the_queue(bundle):
    server = Server(bundle, "--timeout_s", "0.3", "--max_wait_ms", "3000")
    try:
        status, _, body = server.classify(["good", "bad"])
        assert status == 504 and body == {"error": "not answered within 0.3 s"}
        metrics = server.metrics()
        assert metrics["nlprnn_queue_texts"] == 0
        assert metrics.get("nlprnn_texts_classified_total", 0) == 0
    finally:
        assert server.stop() == 0


def test_sigterm_answers_every_accepted_request_then_exits_0(bundle):
    server = Server(bundle, "--max_wait_ms", "1500")  # requests stay in flight for 1.5 s
    with ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(server.classify, [f"good {i}"]) for i in range(6)]
        deadline = time.monotonic() + 10
        while server.metrics()["nlprnn_queue_texts"] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        assert [answer.result()[0] for answer in answers] == [200] * 6
    assert server.process.wait(timeout=30) == 0
    assert "answered 6 classify requests (6 texts)" in "".join(server.stderr)
    with pytest.raises(ConnectionRefusedError):
        server.request("GET", "/healthz")


def test_a_half_sent_body_gets_408_within_the_deadline_and_does_not_hold_up_shutdown(bundle):
    server = Server(bundle, "--timeout_s", "1")
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        client.putrequest("POST", "/v1/classify")
        client.putheader("Content-Type", "application/json")
        client.putheader("Content-Length", "100")
        client.endheaders(message_body=b'{"texts"')  # and then nothing more
        started = time.monotonic()
        response = client.getresponse()
        waited = time.monotonic() - started
        assert response.status == 408
        assert json.loads(response.read()) == {"error": "the body did not arrive within 1 s"}
        assert 0.9 < waited < 10
        server.process.send_signal(signal.SIGTERM)  # the client still holds its connection open
        assert server.process.wait(timeout=10) == 0
    finally:
        client.close()
        server.stop()


def test_the_server_imports_neither_torch_nor_lightning(bundle):
    code = (
        "import sys, runpy\n"
        "sys.argv = ['nlprnn.serve', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('nlprnn.serve', run_name='__main__')\n"
        "finally:\n"
        f"    print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_MODULES!r}), file=sys.stderr)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(bundle), "--port", "0", "--threads", "1"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True,
    )
    for line in process.stderr:
        if "ready on" in line:
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stderr.read()
    assert process.wait(timeout=30) == 0
    assert "HEAVY []" in rest


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["/no/such/bundle"], "no bundle at /no/such/bundle"),
        (["BUNDLE", "--max_batch_size", "0"], "--max_batch_size must be at least 1, not 0"),
        (["BUNDLE", "--max_texts", "10", "--max_queue", "5"], "--max_texts (10) cannot exceed --max_queue (5)"),
        (["BUNDLE", "--timeout_s", "0"], "--timeout_s must be positive"),
        (["BUNDLE", "--timeout_s", "nan"], "--timeout_s must be positive and finite, not nan"),
        (["BUNDLE", "--max_wait_ms", "inf"], "--max_wait_ms must be 0 or more and finite, not inf"),
        (["BUNDLE", "--port", "70000"], "--port must be in 0..65535"),
    ],
)
def test_bad_options_end_with_one_line(bundle, args, says):
    args = [str(bundle) if arg == "BUNDLE" else arg for arg in args]
    proc = subprocess.run([sys.executable, "-m", "nlprnn.serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("nlprnn.serve: error: ") and says in lines[0]
