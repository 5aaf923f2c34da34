"""Occlusion explanations: word spans map back to the text, contributions are probability drops, bounded calls."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nlprnn.deploy import Predictor
from nlprnn.deploy.explain import Explanation, WordContribution, explain, html_section

from deploy.tiny_bundles import LABELS, WORDS, build_bundle

REPO = Path(__file__).resolve().parents[2]
TRAINING_MODULES = ("torch", "lightning", "pytorch_lightning", "torchmetrics", "jsonargparse", "datasets", "wandb",
                    "onnx", "pyarrow", "pandas", "yaml")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor(build_bundle(tmp_path_factory.mktemp("bundles") / "bundle", max_length=300), threads=1)


@pytest.fixture(scope="module")
def short_predictor(tmp_path_factory) -> Predictor:
    return Predictor(build_bundle(tmp_path_factory.mktemp("bundles") / "short", max_length=4), threads=1)


def probability(predictor: Predictor, text: str, label: str) -> float:
    return float(predictor.score([text]).probabilities[0, LABELS.index(label)])


def test_word_spans_map_back_to_the_text(predictor):
    text = "  The MOVIE was good,  and the plot… awful!! zzz\tcafé "
    (explanation,) = predictor.explain([text])
    assert [w.word for w in explanation.words] == [
        "The", "MOVIE", "was", "good", ",", "and", "the", "plot", "…", "awful", "!!", "zzz", "café"]
    for w in explanation.words:
        assert text[w.start : w.end] == w.word


def test_contributions_are_probability_drops_when_the_word_is_deleted(predictor):
    words = ["the", "movie", "was", "good", "and", "the", "plot", "was", "awful"]
    text = " ".join(words)
    (explanation,) = explain(predictor, [text])
    label, probabilities = predictor.predict([text])[0]
    assert explanation.label == label
    assert explanation.probabilities == pytest.approx(probabilities, abs=1e-6)
    full = probability(predictor, text, label)
    for i, w in enumerate(explanation.words):
        without = " ".join(words[:i] + words[i + 1 :])
        assert w.contribution == pytest.approx(full - probability(predictor, without, label), abs=1e-5)
    assert any(abs(w.contribution) > 1e-4 for w in explanation.words)


def test_a_lone_word_is_compared_with_an_empty_text_and_an_empty_text_has_no_words(predictor):
    (lone, empty) = predictor.explain(["good", "   "])
    assert empty.words == [] and empty.label == predictor.predict([""])[0][0]
    full = probability(predictor, "good", lone.label)
    assert lone.words[0].contribution == pytest.approx(full - probability(predictor, "", lone.label), abs=1e-5)


def test_words_past_max_length_are_left_out(short_predictor):
    text = "good bad awful great fine dull"
    (explanation,) = short_predictor.explain([text])
    assert [w.word for w in explanation.words] == text.split()[:4]
    full = probability(short_predictor, text, explanation.label)
    # The variant is what was read less the word: no unread word slides into the window in its place.
    cut = probability(short_predictor, "bad awful great", explanation.label)
    assert explanation.words[0].contribution == pytest.approx(full - cut, abs=1e-5)


def test_a_character_the_normaliser_expands_is_one_word_and_shown_once(predictor):
    text = "good movie, 3\u00bd stars"  # NFKC reads ½ as 1⁄2: three pieces, all pointing into the same characters
    (explanation,) = predictor.explain([text])
    assert [(w.word, w.start, w.end) for w in explanation.words] == [
        ("good", 0, 4), ("movie", 5, 10), (",", 10, 11), ("3\u00bd", 12, 14), ("stars", 15, 20)]
    full = probability(predictor, text, explanation.label)
    without = probability(predictor, "good movie, stars", explanation.label)
    assert explanation.words[3].contribution == pytest.approx(full - without, abs=1e-5)
    shown = html_section(text, explanation).split('<div class="text">')[1].split("</div>")[0]
    assert html.unescape(re.sub("<[^>]*>", "", shown)) == text
    overlapping = Explanation("positive", {"positive": 1.0}, [WordContribution("3\u00bd", 12, 14, 0.5),
                                                               WordContribution("\u00bd", 13, 14, 0.5)])
    shown = html_section(text, overlapping).split('<div class="text">')[1].split("</div>")[0]
    assert html.unescape(re.sub("<[^>]*>", "", shown)) == text


def count_model_calls(predictor, monkeypatch) -> list[int]:
    """The rows of each model call `predictor` makes from now on."""
    calls: list[int] = []
    run = predictor.session.run

    def counting_run(outputs, feeds):
        calls.append(feeds["input_ids"].shape[0])
        return run(outputs, feeds)

    monkeypatch.setattr(predictor.session, "run", counting_run)
    return calls


def test_a_256_token_text_is_explained_in_calls_of_batch_size_rows_with_the_same_result(predictor, monkeypatch):
    text = " ".join(WORDS[i % len(WORDS)] for i in range(256))
    (whole,) = Predictor(predictor.bundle.root, batch_size=512, threads=1).explain([text])
    calls = count_model_calls(predictor, monkeypatch)
    (explanation,) = predictor.explain([text])
    assert calls == [64, 64, 64, 64, 1]  # the text and one variant per word, 64 rows a call: memory stays bounded
    assert len(explanation.words) == 256 and explanation.label == whole.label
    np.testing.assert_allclose([w.contribution for w in explanation.words], [w.contribution for w in whole.words],
                               rtol=0, atol=1e-6)  # padding changes no result, so neither does the split


def test_a_long_text_costs_one_call_of_at_most_max_length_variants(short_predictor, monkeypatch):
    calls = count_model_calls(short_predictor, monkeypatch)
    (explanation,) = short_predictor.explain([" ".join(WORDS * 500)])
    assert calls == [5]  # the text and one variant per word read, however long the text
    assert [w.word for w in explanation.words] == WORDS[:4]


def test_to_json():
    explanation = Explanation("positive", {"negative": 0.25, "positive": 0.75}, [WordContribution("good", 0, 4, 0.5)])
    assert explanation.to_json() == {
        "label": "positive", "probabilities": {"negative": 0.25, "positive": 0.75},
        "explanation": [{"word": "good", "start": 0, "end": 4, "contribution": 0.5}],
    }


def run_python(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "nlprnn.predict", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=300)


def test_predict_explain_imports_no_torch_and_prints_explanations(predictor):
    code = textwrap.dedent(f"""
        import sys
        from nlprnn.predict import main
        main(sys.argv[1:])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {TRAINING_MODULES!r})
        print("HEAVY", heavy, file=sys.stderr)
    """)
    texts = ["good movie", "the plot was awful"]
    proc = run_python(str(predictor.bundle.root), "--explain", *texts, "--threads", "1", code=code)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "HEAVY []" in proc.stderr.decode()
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    for line, text, explanation in zip(lines, texts, predictor.explain(texts), strict=True):
        assert line["text"] == text
        expected = explanation.to_json()["explanation"]
        assert [w["word"] for w in line["explanation"]] == [w["word"] for w in expected]
        assert [w["contribution"] for w in line["explanation"]] == pytest.approx(
            [w["contribution"] for w in expected], abs=1e-6)


def test_predict_explain_html_escapes_the_text(predictor, tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("good <script>alert('x')</script> & movie\n", encoding="utf-8")
    proc = run_python(str(predictor.bundle.root), "--input", str(path), "--explain", "--explain_format", "html",
                      "--threads", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    page = proc.stdout.decode()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script>" not in page and "&lt;" in page and "&amp;" in page
    assert page.count("<span") == len(predictor.explain(["good <script>alert('x')</script> & movie"])[0].words)
