"""A TF-IDF + logistic-regression baseline, trained on the same splits as the recurrent model.

A recurrent classifier's accuracy means little alone: on many text sets a bag of words and bigrams
does as well. Every `python -m nlprnn.fit` run reports this baseline beside the model, so a number in
a table always comes with the floor it has to beat.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NGRAM_RANGE = (1, 2)  # words and word pairs: the classic strong linear baseline for short texts
C = 4.0  # weak regularisation: TF-IDF features are sparse and mostly uninformative one by one
MAX_ITER = 1000  # lbfgs on ~10k documents and ~100k features converges well before this


def _columns(split: Any) -> tuple[list[str], np.ndarray]:
    """The split's texts and ClassLabel ids, read as whole Arrow columns (never row by row)."""
    table = split.with_format("arrow", columns=["text", "label"])[:]
    return table.column("text").to_pylist(), table.column("label").to_numpy()


def fit_baseline(splits: Any) -> dict[str, float]:
    """Train TF-IDF (1-2 grams, sublinear tf) + logistic regression on `splits["train"]` and score it.

    `splits` is the `DatasetDict(train, validation, test)` of `nlprnn.data.sources.load_splits`: the
    vectorizer's vocabulary and idf come from the training split only, as the model's tokenizer does.
    Returns `baseline_val_acc`, `baseline_test_acc` and `baseline_test_f1_macro` (macro over the classes
    that the test labels or predictions hold, as the model's `test_f1_macro` leaves out a class with neither).
    """
    # scikit-learn is imported here, not at module level: `python -m nlprnn.fit --help` stays fast.
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    train_texts, train_labels = _columns(splits["train"])
    vectorizer = TfidfVectorizer(ngram_range=NGRAM_RANGE, sublinear_tf=True)
    classifier = LogisticRegression(C=C, max_iter=MAX_ITER)
    classifier.fit(vectorizer.fit_transform(train_texts), train_labels)

    def predict(split: str) -> tuple[np.ndarray, np.ndarray]:
        texts, labels = _columns(splits[split])
        return labels, classifier.predict(vectorizer.transform(texts))

    val_true, val_pred = predict("validation")
    test_true, test_pred = predict("test")
    return {
        "baseline_val_acc": float(accuracy_score(val_true, val_pred)),
        "baseline_test_acc": float(accuracy_score(test_true, test_pred)),
        "baseline_test_f1_macro": float(
            f1_score(test_true, test_pred, average="macro", zero_division=0)
        ),
    }
