"""Predictor: raw texts to labels on onnxruntime; bucketing keeps order; padding changes nothing; bad input."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nlprnn.deploy import Predictor
from nlprnn.errors import UserError
from nlprnn.threads import available_cores

from deploy.tiny_bundles import LABELS, MAX_LENGTH, WORDS, build_bundle

TEXTS = [
    "good movie",
    "the plot was awful and the acting was dull",
    "great",
    "a story of it " * 20,
    "fine fine bad",
    "movie",
    "the movie was good and the story was great and the acting was fine " * 3,
]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundles") / "bundle")


@pytest.fixture(scope="module")
def predictor(tiny_bundle) -> Predictor:
    return Predictor(tiny_bundle, batch_size=3, threads=1)


def test_predictions_come_back_in_input_order_and_match_one_text_at_a_time(predictor):
    predictions = predictor.predict(TEXTS)
    assert len(predictions) == len(TEXTS)
    for text, (label, probabilities) in zip(TEXTS, predictions):
        assert list(probabilities) == LABELS
        assert label == max(probabilities, key=probabilities.get)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        (alone_label, alone), = predictor.predict([text])
        assert alone_label == label
        assert max(abs(alone[k] - probabilities[k]) for k in LABELS) <= 1e-6
    # The texts really differ, so a mix-up of the order would have been seen above.
    assert len({round(p["positive"], 6) for _, p in predictions}) == len(TEXTS)


def test_logits_alone_equal_logits_in_a_padded_batch(predictor):
    rng = np.random.default_rng(0)
    lengths = np.array([1, 300, 2, 17, 299, 150, 64, 3, 250, 5, 100, 1, 42, 8, 200, 33, 120])
    rows = [list(rng.integers(2, len(WORDS) + 2, size=n)) for n in lengths]
    ids, batch_lengths = predictor.pad(rows)  # (17, 300)
    assert ids.shape == (17, 300) and (ids[0, 1:] == predictor.pad_id).all()
    batch_logits, batch_probabilities = predictor.run(ids, batch_lengths)
    for i, row in enumerate(rows):
        alone_logits, _ = predictor.run(*predictor.pad([row]))
        np.testing.assert_allclose(batch_logits[i], alone_logits[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(batch_probabilities.sum(1), 1.0, atol=1e-6)


def test_empty_texts_are_read_as_one_unknown_token(predictor):
    assert predictor.encode(["", "   ", "zzz"]) == [[predictor.unk_id]] * 3
    scores = predictor.score(["", "   ", "zzz unknown"]).logits  # "zzz unknown" is two [UNK] tokens
    np.testing.assert_array_equal(scores[0], scores[1])
    assert not np.allclose(scores[0], scores[2])
    label, probabilities = predictor.predict([""])[0]
    assert label in LABELS and sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)


def test_long_texts_are_cut_to_max_length(predictor):
    words = [WORDS[i % len(WORDS)] for i in range(1000)]
    long_text, head = " ".join(words), " ".join(words[:MAX_LENGTH])
    (ids,) = predictor.encode([long_text])
    assert len(ids) == MAX_LENGTH
    np.testing.assert_array_equal(predictor.score([long_text]).logits, predictor.score([head]).logits)


def test_text_that_is_not_valid_unicode_is_replaced(predictor):
    broken, replaced = predictor.score(["good \udcff movie", "good \ufffd movie"]).logits
    np.testing.assert_array_equal(broken, replaced)


def test_no_texts_and_wrong_types(predictor):
    assert predictor.predict([]) == []
    with pytest.raises(TypeError, match="wrap a single text in a list"):
        predictor.predict("good movie")
    with pytest.raises(TypeError, match="texts must be strings, not int"):
        predictor.predict(["good", 3])


def test_threads_are_set_deliberately(tiny_bundle, predictor):
    options = predictor.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    default = Predictor(tiny_bundle).session.get_session_options()
    assert (default.intra_op_num_threads, default.inter_op_num_threads) == (available_cores(), 1)


def test_parallel_calls_give_the_same_scores_from_one_thread_per_call(tiny_bundle, predictor, monkeypatch):
    parallel = Predictor(tiny_bundle, batch_size=3, threads=2, parallel_calls=True)
    options = parallel.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    threads = set()
    run = parallel.run

    def recorded(ids, lengths):
        threads.add(threading.current_thread().name)
        time.sleep(0.02)  # long enough for the other thread to take a call of its own
        return run(ids, lengths)

    monkeypatch.setattr(parallel, "run", recorded)
    texts = TEXTS * 4  # 28 texts: 10 calls of at most 3
    together, alone = parallel.score(texts), predictor.score(texts)
    assert np.abs(together.logits - alone.logits).max() <= 1e-6
    assert np.abs(together.probabilities - alone.probabilities).max() <= 1e-6
    assert len(threads) == 2 and all(name.startswith("nlprnn-call") for name in threads)
    threads.clear()
    parallel.score(TEXTS[:1])  # a single call runs where it is asked for
    assert threads == {threading.current_thread().name}


@pytest.mark.parametrize("option, value", [("threads", 0), ("batch_size", 0)])
@pytest.mark.parametrize("parallel_calls", [False, True])
def test_bad_options(tiny_bundle, option, value, parallel_calls):
    with pytest.raises(UserError, match=f"{option} must be at least 1"):
        Predictor(tiny_bundle, parallel_calls=parallel_calls, **{option: value})


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def test_corrupt_model(bundle_copy):
    (bundle_copy / "model.onnx").write_bytes(b"\x00not a model at all")
    with pytest.raises(UserError, match="model.onnx is not a loadable ONNX model .*export the bundle again"):
        Predictor(bundle_copy)


def test_corrupt_tokenizer(bundle_copy):
    (bundle_copy / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(UserError, match="tokenizer.json is not a tokenizer.json"):
        Predictor(bundle_copy)


def test_labels_that_do_not_fit_the_model(bundle_copy):
    (bundle_copy / "labels.json").write_text(json.dumps(LABELS[:2]))
    with pytest.raises(UserError, match="predicts 3 classes but labels.json names 2"):
        Predictor(bundle_copy)
