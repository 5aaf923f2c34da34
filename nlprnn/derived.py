"""Settings a recipe leaves open, derived from the training split alone, each with the reason for it.

The validation and test splits are never looked at here: what is derived is part of the recipe, and
the recipe is chosen before any held-out example is read. An explicit setting in a recipe or on the
command line always wins; these functions only fill what is left open (`None`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LENGTH_QUANTILE = 0.95  # max_length keeps this share of training texts whole
LENGTH_STEP = 8  # max_length is rounded up to a multiple of this
MIN_LENGTH, MAX_LENGTH = 16, 1024  # the n-gram bag reads this far; model.recurrent_length bounds the recurrence
LENGTH_SAMPLE = 20_000  # training texts tokenized to measure the distribution; enough for a 95th percentile
MAX_LENGTH_RULE = f"p{LENGTH_QUANTILE:g} step {LENGTH_STEP} in {MIN_LENGTH}..{MAX_LENGTH}"  # in cache keys

LONG_TEXT_TOKENS = 64  # a median length from which texts count as documents rather than snippets
NGRAM_DIM = 64  # width of the n-gram bag the model reads beside its recurrence on documents

TARGET_STEPS = 1500  # optimizer steps a run aims for, whatever the size of its data
# 30: a bbc-news epoch (1.7k documents) takes 15-18 s on 2 cores of an AVX-512 AMD EPYC, so even a run that never
# stops early ends within 10 minutes; at 40 one took 11. Other CPUs are slower (21 s on an AVX-512 Intel Xeon, 43 s
# on an AVX2-only EPYC): --trainer.max_time caps such a run without replacing this budget.
MIN_EPOCHS, MAX_EPOCHS = 4, 30
PATIENCE_STEPS = 250  # optimizer steps without a better validation epoch before training stops
MIN_PATIENCE_EPOCHS, MAX_PATIENCE_EPOCHS = 4, 10  # in whole epochs; at most a third of MAX_EPOCHS


@dataclass(frozen=True)
class Derived:
    """A value and why it was chosen, for the log."""

    value: int | str
    reason: str


def typical_length(lengths: np.ndarray) -> int:
    """The median token count of the training texts, what the model's own derived settings start from."""
    return int(np.median(lengths)) if len(lengths) else 0


def max_length_from(lengths: np.ndarray) -> Derived:
    """max_length from the token counts of (a sample of) the training texts: their 95th percentile."""
    if len(lengths) == 0:
        return Derived(MIN_LENGTH, "no training text to measure")
    quantile = float(np.quantile(lengths, LENGTH_QUANTILE))
    value = int(np.clip(math.ceil(quantile / LENGTH_STEP) * LENGTH_STEP, MIN_LENGTH, MAX_LENGTH))
    kept = float(np.mean(lengths <= value))
    return Derived(value, f"{kept:.0%} of training texts are at most {value} tokens "
                          f"(95th percentile {quantile:.0f}, median {float(np.median(lengths)):.0f}; "
                          f"bounds {MIN_LENGTH}..{MAX_LENGTH})")


def ngram_dim_for(typical_length: int) -> Derived:
    """The width of the model's bag of n-grams: on for documents, off for snippets.

    Measured (seed 1, validation accuracy): on movie-snippets (median 22 tokens) the bag overfits within
    two epochs and costs 2.3 points; on bbc-news (median ~400 tokens) it reads the topic words of the
    whole document (up to MAX_LENGTH tokens) where the default recipe's recurrence reads its first 384.
    """
    if typical_length >= LONG_TEXT_TOKENS:
        return Derived(NGRAM_DIM, f"the median training text has {typical_length} tokens (>= {LONG_TEXT_TOKENS}): "
                                  "a bag of words and word pairs reads beside the recurrence")
    return Derived(0, f"the median training text has {typical_length} tokens (< {LONG_TEXT_TOKENS}): "
                      "the recurrence alone; a bag of n-grams overfits short texts")


def epoch_budget(train_examples: int, batch_size: int, accumulate: int = 1) -> Derived:
    """max_epochs for about TARGET_STEPS optimizer steps, within MIN_EPOCHS..MAX_EPOCHS.

    Small data gets more passes and large data fewer, so 1.7k long documents get enough updates and
    30k short texts do not spend time on passes they do not need; early stopping on validation
    accuracy (`patience_for`) ends a run that has stopped improving sooner. Counted on one device:
    under DDP an epoch has fewer, larger steps, and the same epochs see the same examples.
    """
    steps_per_epoch = _steps_per_epoch(train_examples, batch_size, accumulate)
    value = int(np.clip(math.ceil(TARGET_STEPS / steps_per_epoch), MIN_EPOCHS, MAX_EPOCHS))
    return Derived(value, f"about {TARGET_STEPS} optimizer steps at {steps_per_epoch} per epoch "
                          f"(bounds {MIN_EPOCHS}..{MAX_EPOCHS} epochs)")


def patience_for(train_examples: int, batch_size: int, accumulate: int = 1) -> Derived:
    """Epochs without a better validation epoch (nlprnn.callbacks.selection) after which a derived budget stops.

    About PATIENCE_STEPS optimizer steps, a sixth of the budget, within MIN..MAX_PATIENCE_EPOCHS. A fixed 4
    epochs were 108 steps on bbc-news (27 per epoch), where one seed stopped at its 9th epoch of 40 with
    a validation accuracy that 10 epochs of patience took from 97.6% to 98.6% (seeds 1-3: 97.8% -> 98.1%).
    Data with 63 steps per epoch or more keeps 4.
    """
    steps_per_epoch = _steps_per_epoch(train_examples, batch_size, accumulate)
    value = int(np.clip(math.ceil(PATIENCE_STEPS / steps_per_epoch), MIN_PATIENCE_EPOCHS, MAX_PATIENCE_EPOCHS))
    return Derived(value, f"training stops after {value} epochs of {steps_per_epoch} steps without a better "
                          f"validation epoch (higher accuracy, or equal with lower loss): about {PATIENCE_STEPS} steps "
                          f"(bounds {MIN_PATIENCE_EPOCHS}..{MAX_PATIENCE_EPOCHS} epochs)")


def _steps_per_epoch(train_examples: int, batch_size: int, accumulate: int) -> int:
    """Optimizer steps: with gradient accumulation, one per `accumulate` batches (and one for the epoch's rest)."""
    return max(math.ceil(math.ceil(train_examples / batch_size) / accumulate), 1)
