"""TfidfLogistic: a TF-IDF + logistic-regression classifier inside the model, whose probabilities the network's join.

A recurrent network and a linear model over words and word pairs err on different texts: averaging their
probabilities got more held-out examples right than the network alone on every built-in dataset, in 5-fold
cross-validation over three seeds (docs/defaults.md, "The linear blend"). The linear model is the classic one (sublinear term counts, smoothed idf, rows scaled
to unit length, L2-regularised logistic regression), fitted to convergence by scikit-learn on the training split
before the network trains, and then frozen. Its L2 penalty is its own (`c`): the blend wants a linear model far
less regularised than the baseline (docs/defaults.md). It reads the model's own token ids and the n-gram bag's
hashed word pairs (nlprnn.models.ngrams), so it exports to ONNX inside the same graph and predicts without
scikit-learn.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nlprnn.baseline import MAX_ITER
from nlprnn.errors import UserError
from nlprnn.models.ngrams import PAIR_MULTIPLIER, first_occurrences, word_grams


class TfidfLogistic(nn.Module):
    def __init__(self, vocab_size: int, buckets: int, num_classes: int, c: float) -> None:
        """Rows 0..vocab_size-1 are words, the next `buckets` hashed word pairs; every weight is a buffer that
        `fit` fills, so the optimizer never sees them and checkpoints keep them. `c` is scikit-learn's C, the
        inverse of the L2 penalty's strength."""
        super().__init__()
        self.vocab_size, self.buckets, self.c = vocab_size, buckets, c
        rows = vocab_size + buckets
        self.register_buffer("pair_multiplier", torch.tensor(PAIR_MULTIPLIER, dtype=torch.int64))
        self.register_buffer("idf", torch.ones(rows))
        self.register_buffer("weight", torch.zeros(rows, num_classes))
        self.register_buffer("bias", torch.zeros(num_classes))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, real tokens first, and (B,) lengths -> (B, num_classes) logits.

        Each distinct real n-gram weighs (1 + ln count) x idf, over the row's Euclidean norm. Its count is the
        length of its run among the sorted n-grams, summed by a scatter (ONNX ScatterElements).
        """
        rows = self.vocab_size + self.buckets
        grams, real = word_grams(input_ids, lengths, self.vocab_size, self.buckets, self.pair_multiplier)
        grams, first = first_occurrences(grams, real, rows)
        sorted_real = torch.ones_like(grams).cumsum(1) <= real.sum(1, keepdim=True)  # the real ones sort first
        run = first.long().cumsum(1).clamp(min=1) - 1  # (B, N): the index of each n-gram's run
        ones = sorted_real.to(self.weight.dtype)  # padding counts for no run
        counts = torch.zeros_like(ones).scatter_add(1, run, ones).gather(1, run).clamp(min=1)
        weights = torch.where(first, (1 + counts.log()) * self.idf[grams], 0)
        weights = weights / weights.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (weights.unsqueeze(-1) * self.weight[grams]).sum(1) + self.bias

    @torch.no_grad()
    def fit(self, ids: np.ndarray, offsets: np.ndarray, labels: np.ndarray) -> float:
        """Fit on texts whose token ids are `ids[offsets[i]:offsets[i+1]]`, labelled `labels`; return its training accuracy."""
        # only when training: prediction needs no scikit-learn
        from sklearn.feature_extraction.text import TfidfTransformer
        from sklearn.linear_model import LogisticRegression

        num_classes = self.weight.size(1)
        classes = np.unique(labels)
        if len(classes) < 2:
            raise UserError("model.linear_blend needs at least two classes in the training split; set it to 0")
        counts = term_counts(ids, offsets, self.vocab_size, self.buckets, int(self.pair_multiplier))
        transformer = TfidfTransformer(sublinear_tf=True).fit(counts)  # smoothed idf, rows of unit length
        features = transformer.transform(counts)
        classifier = LogisticRegression(C=self.c, max_iter=MAX_ITER).fit(features, labels)
        weight = np.zeros((counts.shape[1], num_classes))
        bias = np.full(num_classes, -1e4)  # a class without training texts is never predicted
        if len(classes) == 2:  # one decision function: p(second class) = sigmoid(x . w + b), a softmax over (0, .)
            weight[:, classes[1]], bias[classes] = classifier.coef_[0], (0.0, classifier.intercept_[0])
        else:
            weight[:, classes], bias[classes] = classifier.coef_.T, classifier.intercept_
        for buffer, value in ((self.idf, transformer.idf_), (self.weight, weight), (self.bias, bias)):
            buffer.copy_(torch.from_numpy(value))
        return float(classifier.score(features, labels))


def term_counts(ids: np.ndarray, offsets: np.ndarray, vocab_size: int, buckets: int, multiplier: int):
    """(texts, vocab_size + buckets) sparse counts of each text's words and hashed adjacent word pairs."""
    import scipy.sparse as sp

    texts = len(offsets) - 1
    ids = np.asarray(ids, dtype=np.int64)
    text_of = np.repeat(np.arange(texts), np.diff(offsets))
    paired = text_of[1:] == text_of[:-1]  # adjacent tokens of one text
    pairs = (ids[:-1] * multiplier + ids[1:]) % buckets + vocab_size
    rows = vocab_size + buckets
    keys = np.concatenate([text_of * rows + ids, text_of[1:][paired] * rows + pairs[paired]])
    keys, counts = np.unique(keys, return_counts=True)
    return sp.csr_matrix((counts.astype(np.float64), (keys // rows, keys % rows)), shape=(texts, rows))
