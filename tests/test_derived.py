"""Settings derived from the training split: what is chosen for short and long texts, logged, and overridden."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FILLER, NEGATIVE, POSITIVE, write_csv
from nlprnn.derived import (
    MAX_EPOCHS, MAX_LENGTH, MIN_EPOCHS, MIN_LENGTH, MIN_PATIENCE_EPOCHS, epoch_budget, max_length_from, patience_for,
)
from test_fit import TINY_MODEL, fit


def test_max_length_keeps_95_percent_of_texts_whole():
    lengths = np.arange(1, 101)  # 1..100 tokens
    derived = max_length_from(lengths)
    assert derived.value == 96 and "96% of training texts are at most 96 tokens" in derived.reason
    assert max_length_from(np.full(50, 3)).value == MIN_LENGTH
    assert max_length_from(np.full(50, 5000)).value == MAX_LENGTH


def test_small_data_gets_more_epochs_and_large_data_fewer():
    assert epoch_budget(1_700, 64).value > epoch_budget(8_000, 64).value > epoch_budget(30_000, 64).value
    assert epoch_budget(100, 64).value == MAX_EPOCHS and epoch_budget(10_000_000, 64).value == MIN_EPOCHS
    assert "1500 optimizer steps at 27 per epoch" in epoch_budget(1_700, 64).reason


def test_patience_is_counted_in_optimizer_steps():
    assert patience_for(1_700, 64).value == 10  # bbc-news: 27 steps per epoch
    assert patience_for(3_600, 64).value == 5  # 57 steps per epoch
    assert patience_for(8_500, 64).value == patience_for(10_000_000, 64).value == MIN_PATIENCE_EPOCHS
    assert patience_for(10, 64).value == 10  # at most a third of the most epochs
    assert "after 10 epochs of 27 steps without a better validation epoch" in patience_for(1_700, 64).reason


def make_texts(n: int, words: int, seed: int = 0) -> list[dict[str, str]]:
    """Labelled texts of about `words` words: filler plus sentiment words that decide the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        cue = POSITIVE if label == "positive" else NEGATIVE
        text = [rng.choice(FILLER) for _ in range(words)] + rng.sample(cue, 2)
        rng.shuffle(text)
        rows.append({"text": " ".join(text), "label": label})
    return rows


def run(tmp_path: Path, data: Path, *args: str):
    proc = fit("--data.train_file", str(data), *TINY_MODEL, "--trainer.logger", "false", "--baseline", "false",
               "--trainer.limit_train_batches", "2", "--model.pretrained_vectors", "null",
               "--data.tokenizer.vector_words", "null",
               "--output_dir", str(tmp_path / "runs"), "--run_name", data.stem, *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / data.stem
    state = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=False)  # where training ended
    return proc.stdout + proc.stderr, state, run_dir


@pytest.mark.parametrize("words,length,bag", [(6, 16, 0), (120, 128, 64)])
def test_short_and_long_texts_get_different_settings_and_say_why(tmp_path, words, length, bag):
    data = write_csv(tmp_path / f"texts{words}.csv", make_texts(200, words))
    log, state, _ = run(tmp_path, data, "--model.lr", "0")  # a model that never changes: no epoch is better
    assert f"data.max_length = {length} (derived: " in log
    assert f"model.ngram_dim = {bag} (derived: the median training text has" in log
    epochs = epoch_budget(160, 16).value  # 80% of 200 train, batch size 16 (TINY_MODEL)
    assert f"trainer.max_epochs = {epochs} (derived: about 1500 optimizer steps" in log
    assert f"early stopping patience = {patience_for(160, 16).value} (derived: training stops after" in log
    hparams = state["hyper_parameters"]
    assert hparams["ngram_dim"] is None and (hparams["typical_length"] >= 64) == bool(bag)
    assert ("ngrams.table.weight" in state["state_dict"]) == bool(bag)
    # early stopping on validation ends the run: nothing beats epoch 0, so it stops `patience` epochs after it
    patience = patience_for(160, 16).value
    assert f"stopped early after epoch {patience}: no better validation epoch in the last {patience}" in log
    assert state["epoch"] == patience < epochs - 1


def test_explicit_settings_win_over_derived_ones(tmp_path):
    data = write_csv(tmp_path / "long.csv", make_texts(200, 120))
    log, state, run_dir = run(tmp_path, data, "--data.max_length", "40", "--model.ngram_dim", "8",
                              "--trainer.max_epochs", "3")
    assert "(derived: " not in log
    assert state["hyper_parameters"]["ngram_dim"] == 8 and state["state_dict"]["ngrams.table.weight"].shape[1] == 8
    assert "stopped early" not in log
    assert next(v for k, v in state["callbacks"].items() if "BestCheckpoint" in k)["patience"] is None
    assert json.loads((run_dir / "tokenizer.json").read_text())["truncation"]["max_length"] == 40
    assert state["epoch"] == 2  # the third epoch, counted from 0: the three asked for, no more and no fewer


def test_a_higher_min_epochs_raises_the_derived_budget_and_accumulation_counts_optimizer_steps(tmp_path):
    data = write_csv(tmp_path / "short.csv", make_texts(200, 6))
    budget = epoch_budget(160, 16, accumulate=4)
    assert budget.value > epoch_budget(160, 16).value or budget.value == MAX_EPOCHS
    assert "at 3 per epoch" in budget.reason  # 10 batches, 4 to a step: 3 optimizer steps
    log, state, _ = run(tmp_path, data, "--model.lr", "0", "--trainer.accumulate_grad_batches", "4",
                        "--trainer.min_epochs", str(MAX_EPOCHS + 2), "--trainer.limit_val_batches", "1")
    assert f"trainer.max_epochs = {MAX_EPOCHS + 2} (derived: trainer.min_epochs is {MAX_EPOCHS + 2}, above the" in log
    assert state["epoch"] == MAX_EPOCHS + 1  # early stopping waits for min_epochs; max_epochs ends it


def test_without_the_models_word_vectors_the_vocabulary_takes_none_of_theirs(tmp_path):
    data = write_csv(tmp_path / "short.csv", make_texts(200, 6))
    proc = fit("--data.train_file", str(data), *TINY_MODEL, "--trainer.logger", "false", "--baseline", "false",
               "--trainer.max_epochs", "1", "--model.embedding_dim", "50", "--model.pretrained_vectors", "null",
               "--output_dir", str(tmp_path / "runs"), "--run_name", "plain", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert ("data.tokenizer.vector_words = none (derived: the model starts from no word vectors "
            "(model.pretrained_vectors is null)") in log
    vocabulary = json.loads((tmp_path / "runs" / "plain" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocabulary) < 100  # the tiny texts' own words, not GloVe's 50,000


def test_a_time_limit_caps_the_derived_budget_without_replacing_it(tmp_path):
    data = write_csv(tmp_path / "short.csv", make_texts(200, 6))
    log, state, _ = run(tmp_path, data, "--trainer.max_time", "00:00:00:05")
    assert f"trainer.max_epochs = {epoch_budget(160, 16).value} (derived: " in log
    assert f"early stopping patience = {patience_for(160, 16).value} (derived: " in log


def test_a_time_limit_that_ends_training_before_any_validation_is_one_line(tmp_path):
    data = write_csv(tmp_path / "short.csv", make_texts(200, 6))
    proc = fit("--data.train_file", str(data), *TINY_MODEL, "--trainer.logger", "false", "--baseline", "false",
               "--model.pretrained_vectors", "null", "--data.tokenizer.vector_words", "null",
               "--output_dir", str(tmp_path / "runs"), "--trainer.max_time", "00:00:00:00", cwd=tmp_path)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("nlprnn.fit: error: --trainer.max_time 00:00:00:00 ended training before its first "
                            "validation")
    assert not list((tmp_path / "runs").glob("*/metrics.json"))  # nothing was tested
