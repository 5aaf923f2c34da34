"""scripts/selection_rules.py: the epoch each rule keeps, and its score on validation examples it did not see."""

from __future__ import annotations

import numpy as np

from conftest import load_script
from test_fit import TINY_MODEL

from nlprnn.derived import MAX_EPOCHS

rules = load_script("selection_rules")


def test_each_rule_keeps_its_epoch_and_stops_after_patience():
    acc = np.array([0.5, 0.8, 0.8, 0.7, 0.8, 0.6, 0.6, 0.9])
    loss = np.array([0.9, 0.5, 0.4, 0.6, 0.3, 0.7, 0.7, 0.1])
    assert rules.choose(acc, loss, "first", None, 10) == 7
    assert rules.choose(acc, loss, "first", 3, 10) == 1  # epochs 2, 3, 4 are no better: stopped before epoch 7
    # epochs 2 and 4 tie epoch 1 with lower losses, so the wait starts again from 4, and epoch 7 is reached
    assert rules.choose(acc, loss, "lowest_loss", 3, 10) == 7
    assert rules.choose(acc, loss, "lowest_loss", 2, 10) == 4  # stopped after epoch 6


def test_within_one_example_the_lower_loss_wins_and_beyond_it_the_higher_accuracy():
    acc = np.array([0.5, 0.8, 0.7, 0.9, 0.6])  # over 10 examples: 0.1 is one example
    loss = np.array([0.9, 0.5, 0.4, 0.6, 0.1])
    # epoch 2 is one example behind epoch 1 with a lower loss; epoch 3, two ahead of it; epoch 4, three behind
    assert rules.choose(acc, loss, "within_one", None, 10) == 3
    assert rules.choose(acc, loss, "lowest_loss", None, 10) == 3
    assert rules.choose(acc[:3], loss[:3], "within_one", None, 10) == 2
    assert rules.choose(acc[:3], loss[:3], "lowest_loss", None, 10) == 1
    assert rules.choose(acc[:3], loss[:3], "within_one", None, 100) == 1  # on 100 examples 0.1 is ten


def test_held_out_accuracy_scores_the_chosen_epoch_on_the_examples_left_out():
    # epoch 1 is right on every example, epoch 0 on none: any split chooses epoch 1 and scores 1.0 on the rest
    correct = np.array([[False] * 10, [True] * 10])
    losses = np.array([[2.0] * 10, [0.1] * 10])
    rng = np.random.default_rng(0)
    assert rules.held_out_accuracy(correct, losses, "first", None, splits=20, rng=rng) == 1.0
    # and the score is that of the epoch kept: the better epoch first, then one right on half of the examples
    halves = np.array([[True] * 10, [True, False] * 5])
    score = rules.held_out_accuracy(halves, losses, "first", None, splits=50, rng=rng)
    assert score == 1.0


def test_losses_are_the_cross_entropy_of_each_example():
    logits = np.log(np.array([[[0.25, 0.75], [0.5, 0.5]]]))  # (1 epoch, 2 examples, 2 classes)
    losses = rules.example_losses(logits, np.array([1, 0]))
    np.testing.assert_allclose(losses, [[-np.log(0.75), -np.log(0.5)]])


def test_a_recorded_curve_covers_the_whole_derived_budget(tmp_path, tiny_csv):
    """A model that never changes would stop at the derived patience; the recording trains the whole budget."""
    path = tmp_path / "curves" / "tiny-seed1.npz"
    path.parent.mkdir()
    rules.record_curve(["--data.train_file", str(tiny_csv), *TINY_MODEL, "--model.lr", "0",
                        "--trainer.limit_train_batches", "2", "--model.pretrained_vectors", "null",
                        "--data.tokenizer.vector_words", "null"], 1, path)
    saved = np.load(path)
    epochs, examples, classes = saved["logits"].shape
    assert (epochs, classes) == (MAX_EPOCHS, 2) and examples == len(saved["labels"]) > 0  # the most a budget derives
    assert int(saved["patience"]) == 10 < epochs
    assert sorted(p.name for p in path.parent.iterdir()) == ["runs", "tiny-seed1.npz"]
    assert not any((path.parent / "runs").iterdir())  # the run's checkpoints are gone
