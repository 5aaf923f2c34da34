"""The app in this process, through Starlette's TestClient: failures inside it, settings it refuses, explain costs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from nlprnn.deploy import Predictor
from nlprnn.errors import UserError
from nlprnn.serve.app import ServeSettings, create_app

from deploy.tiny_bundles import build_bundle
from serve.server_process import REPO


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("app") / "bundle")


@pytest.fixture(scope="module")
def short_bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("app") / "short", max_length=4)


@contextmanager
def serving(
    predictor: Predictor, settings: ServeSettings = ServeSettings(), **callbacks: Callable
) -> Iterator[TestClient]:
    """A client of the app once it is ready; an exception that escapes the app fails the test."""
    with TestClient(create_app(predictor, settings, **callbacks)) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        yield client


def requests_counted(client: TestClient, endpoint: str, status: int) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'nlprnn_requests_total{{endpoint="{endpoint}",status="{status}"}}'):
            return float(line.split()[-1])
    return 0.0


def queued_texts(client: TestClient) -> float:
    (line,) = [line for line in client.get("/metrics").text.splitlines() if line.startswith("nlprnn_queue_texts ")]
    return float(line.split()[-1])


def test_an_unexpected_error_is_a_counted_one_line_500_logged_once_and_the_server_stays_up(bundle, caplog):
    predictor = Predictor(bundle, threads=1)
    predict = predictor.predict

    def failing_on_boom(texts: list[str]):
        if "boom" in texts:
            raise RuntimeError("model failed\nwith a second line")
        return predict(texts)

    predictor.predict = failing_on_boom
    with serving(predictor) as client, caplog.at_level(logging.INFO):
        response = client.post("/v1/classify", json={"texts": ["boom"]})
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/json" and b"\n" not in response.content
        assert response.json() == {"error": "internal error: RuntimeError"}
        assert client.post("/v1/classify", json={"texts": ["good"]}).status_code == 200
        assert requests_counted(client, "/v1/classify", 500) == 1
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    message = errors[0].getMessage()
    assert "\n" not in message and "/v1/classify" in message and "model failed" in message


def test_a_failed_warm_up_is_logged_once_and_stops_the_app_being_ready(bundle, caplog):
    predictor = Predictor(bundle, threads=1)

    def failing(texts: list[str]):
        raise RuntimeError("model cannot run")

    predictor.predict = failing
    failed = threading.Event()
    app = create_app(predictor, ServeSettings(), on_failure=failed.set)
    with caplog.at_level(logging.INFO), TestClient(app) as client:
        assert failed.wait(30)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "retry-after" not in ready.headers  # retrying will not help
        assert "failed its warm-up" in ready.json()["error"]
        classify = client.post("/v1/classify", json={"texts": ["good"]})
        assert classify.status_code == 503 and "failed its warm-up" in classify.json()["error"]
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "warm-up" in errors[0].getMessage() and "model cannot run" in errors[0].getMessage()


def test_the_server_exits_1_with_one_line_when_the_warm_up_fails(bundle):
    code = (
        "from nlprnn.deploy.predictor import Predictor\n"
        "def failing(self, texts):\n"
        "    raise RuntimeError('model cannot run')\n"
        "Predictor.predict = failing\n"
        "from nlprnn.serve.__main__ import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(bundle), "--port", "0", "--threads", "1"], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "failed its warm-up batch" in lines[0] and "model cannot run" in lines[0]


@pytest.mark.parametrize(
    ("setting", "value"),
    [("timeout_s", float("nan")), ("timeout_s", float("inf")), ("timeout_s", -1.0),
     ("max_wait_ms", float("nan")), ("max_wait_ms", float("inf")), ("max_wait_ms", -1.0)],
)
def test_settings_refuse_times_that_are_not_finite_or_are_negative(setting, value):
    with pytest.raises(UserError, match=f"--{setting} must be"):
        ServeSettings(**{setting: value})


def test_an_explained_text_takes_places_in_the_queue_for_the_words_the_model_reads(bundle, short_bundle):
    long_text = " ".join(["good movie"] * 500)

    def places_taken_while_explaining(bundle: Path, text: str) -> float:
        predictor = Predictor(bundle, threads=1)
        explain, release = predictor.explain, threading.Event()

        def held(texts: list[str]):
            release.wait(20)
            return explain(texts)

        predictor.explain = held
        with serving(predictor, ServeSettings(max_queue=512)) as client, ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.post, "/v1/explain", json={"texts": [text]})
            deadline = time.monotonic() + 20
            while (places := queued_texts(client)) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            release.set()
            assert answer.result().status_code == 200
        return places

    # The bundle reads 300 tokens: the text and one variant per word read go through the model.
    assert 100 < places_taken_while_explaining(bundle, long_text) <= 301
    # Words past max_length cost nothing: this bundle reads 4 tokens of the same text.
    assert places_taken_while_explaining(short_bundle, long_text) <= 5


def test_an_explanation_lists_only_the_words_the_model_reads(short_bundle):
    text = " ".join(["good movie"] * 5000)  # 10,000 words, 4 of them read
    with serving(Predictor(short_bundle, threads=1), ServeSettings(max_chars=100_000)) as client:
        response = client.post("/v1/explain", json={"texts": [text]})
    assert response.status_code == 200 and len(response.content) < 2_000
    (result,) = json.loads(response.content)["results"]
    assert [w["word"] for w in result["explanation"]] == ["good", "movie", "good", "movie"]


def test_classify_batches_run_between_the_texts_of_an_explain(bundle):
    """An explain is one job per text on the model's thread: it holds the model one text at a time."""
    predictor = Predictor(bundle, threads=1)
    explain, predict, calls, first_held = predictor.explain, predictor.predict, [], threading.Event()
    release = threading.Event()

    def logged_explain(texts: list[str]):
        calls.append("explain")
        first_held.set()
        release.wait(20)
        return explain(texts)

    def logged_predict(texts: list[str]):
        calls.append("classify")
        return predict(texts)

    predictor.explain, predictor.predict = logged_explain, logged_predict
    with serving(predictor, ServeSettings(max_wait_ms=1)) as client, ThreadPoolExecutor(2) as pool:
        calls.clear()  # the warm-up batch
        explained = pool.submit(client.post, "/v1/explain", json={"texts": ["good film", "bad film", "fine"]})
        assert first_held.wait(20)
        classified = pool.submit(client.post, "/v1/classify", json={"texts": ["a film"]})
        time.sleep(1.0)  # its batch is handed to the model's thread within a millisecond, behind the first text
        release.set()
        assert classified.result().status_code == 200 and explained.result().status_code == 200
    assert calls == ["explain", "classify", "explain", "explain"]
    assert len(explained.result().json()["results"]) == 3


def test_a_number_too_long_for_python_is_valid_json_of_the_wrong_shape(bundle):
    """Python's parser refuses integers over 4,300 digits; JSON does not, so the answer is 422, not 400."""
    with serving(Predictor(bundle, threads=1)) as client:
        response = client.post("/v1/classify", content='{"texts": [' + "9" * 5000 + "]}")
    assert response.status_code == 422 and response.json()["error"].startswith("texts.0: Input should be a valid string")
