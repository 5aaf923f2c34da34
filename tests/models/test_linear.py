"""TfidfLogistic: scikit-learn's own TF-IDF + logistic regression, inside the model and blind to padding."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from nlprnn.errors import UserError
from nlprnn.models.linear import TfidfLogistic
from nlprnn.models.ngrams import PAIR_MULTIPLIER

VOCAB, BUCKETS = 40, 1_000_003  # buckets far above the pairs used: no two pairs share a row
C = 4.0


def texts_and_labels(seed: int, num_classes: int, count: int = 60) -> tuple[list[list[int]], np.ndarray]:
    """Token id lists whose class shows in which ids they favour, with repeats (so counts exceed 1)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, count)
    texts = [list(rng.integers(0, VOCAB, rng.integers(1, 25)) // (1 + (label % 2)) + label) for label in labels]
    return [[int(i) % VOCAB for i in text] for text in texts], labels


def flat(texts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([np.asarray(t, dtype=np.int64) for t in texts]), np.cumsum([0] + [len(t) for t in texts])


def padded(texts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in texts)
    return (torch.tensor([t + [pad] * (width - len(t)) for t in texts]), torch.tensor([len(t) for t in texts]))


def terms(text: list[int]) -> list[str]:
    """A text's words and adjacent pairs, as scikit-learn's vectorizer would see 'a' and 'a b'."""
    words = [f"w{i}" for i in text]
    return words + [f"{a} {b}" for a, b in pairwise(words)]


def sklearn_probabilities(train, labels, test, c: float = C) -> np.ndarray:
    """The same model written with scikit-learn's vectorizer."""
    vectorizer = TfidfVectorizer(analyzer=terms, sublinear_tf=True)
    classifier = LogisticRegression(C=c, max_iter=1000).fit(vectorizer.fit_transform(train), labels)
    return classifier.predict_proba(vectorizer.transform(test))


@pytest.mark.parametrize("num_classes, c", [(2, C), (3, C), (3, 1024.0)])
def test_matches_scikit_learn_and_ignores_padding(num_classes, c):
    train, labels = texts_and_labels(0, num_classes)
    # training texts and their first halves: no unseen word or pair (for those, see the next test)
    test = [text[:cut] for text in train[:20] for cut in (len(text), (len(text) + 1) // 2)]
    model = TfidfLogistic(VOCAB, BUCKETS, num_classes, c)
    accuracy = model.fit(*flat(train), labels)
    assert 0.5 < accuracy <= 1.0
    expected = sklearn_probabilities(train, labels, test, c)
    batch = torch.softmax(model(*padded(test)), dim=-1).numpy()
    np.testing.assert_allclose(batch, expected, atol=1e-5)
    for text, row in zip(test, batch):  # alone, with no padding at all, and with other padding ids
        alone = torch.softmax(model(*padded([text])), dim=-1)[0].numpy()
        np.testing.assert_allclose(alone, row, atol=1e-6)
        np.testing.assert_allclose(torch.softmax(model(*padded([text, [1] * 30], pad=7)), -1)[0].numpy(), row, atol=1e-6)


def test_an_unseen_ngram_only_dilutes_the_seen_ones():
    model = TfidfLogistic(VOCAB, 101, 2, C)
    model.fit(*flat([[1, 2], [3, 4]]), np.array([0, 1]))
    seen, diluted = torch.softmax(model(*padded([[1, 2], [1, 2, 39]])), dim=-1)[:, 0]
    assert 0.5 < diluted < seen  # the unseen word and pair weigh nothing but share the unit length


def test_hashes_pairs_like_the_ngram_bag():
    assert int(TfidfLogistic(VOCAB, 11, 2, C).pair_multiplier) == PAIR_MULTIPLIER


def test_a_class_missing_from_training_is_never_predicted():
    train, labels = texts_and_labels(0, 2)
    model = TfidfLogistic(VOCAB, 101, 3, C)
    model.fit(*flat(train), labels * 2)  # classes 0 and 2 only
    assert torch.softmax(model(*padded(train)), dim=-1)[:, 1].max() < 1e-6


def test_one_class_is_refused():
    with pytest.raises(UserError, match="two classes"):
        TfidfLogistic(VOCAB, 101, 2, C).fit(*flat([[1], [2]]), np.array([0, 0]))


def blended_model(share: float = 0.25):
    from nlprnn.models.classifier import TextClassifier

    torch.manual_seed(0)
    model = TextClassifier(VOCAB, 3, embedding_dim=4, ngram_buckets=101, linear_blend=share, linear_c=C).eval()
    train, labels = texts_and_labels(0, 3)
    model.linear.fit(*flat(train), labels)
    return model, padded(train[:8])


def test_the_classifier_blends_the_two_probabilities_at_its_share():
    model, (ids, lengths) = blended_model(0.25)
    with torch.no_grad():
        network, blended = model.outputs(ids, lengths)
        expected = 0.75 * network.softmax(-1) + 0.25 * model.linear(ids, lengths).softmax(-1)
        torch.testing.assert_close(model(ids, lengths), blended)
    torch.testing.assert_close(blended.exp(), expected)  # log-probabilities: the logits of the blend
    assert model.selection_metrics == ("val_network_acc", "val_network_loss")


def test_without_a_share_there_is_no_linear_model():
    from nlprnn.models.classifier import TextClassifier

    model = TextClassifier(VOCAB, 3, embedding_dim=4)
    assert model.linear is None and model.selection_metrics == ("val_acc", "val_loss")
    assert not any(name.startswith("linear.") for name in model.state_dict())


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_a_share_outside_0_to_1_is_refused(share):
    from nlprnn.models.classifier import TextClassifier

    with pytest.raises(UserError, match=r"linear_blend .* in \[0, 1\)"):
        TextClassifier(VOCAB, 3, linear_blend=share)


@pytest.mark.parametrize("c", [0.0, -1.0])
def test_a_penalty_inverse_of_0_or_below_is_refused(c):
    from nlprnn.models.classifier import TextClassifier

    with pytest.raises(UserError, match=r"linear_c .* above 0: got"):
        TextClassifier(VOCAB, 3, linear_blend=0.5, linear_c=c)


def test_a_weaker_penalty_gives_the_linear_model_surer_probabilities():
    """Why the blend's linear model is far less regularised than the baseline: at the baseline's C its
    probabilities are nearly flat beside the network's (docs/defaults.md)."""
    train, labels = texts_and_labels(0, 3)
    sureness = []
    for c in (C, 1024.0):
        model = TfidfLogistic(VOCAB, 101, 3, c)
        model.fit(*flat(train), labels)
        sureness.append(float(torch.softmax(model(*padded(train)), dim=-1).max(-1).values.mean()))
    assert sureness[0] + 0.2 < sureness[1]


def test_a_checkpoint_keeps_its_fitted_linear_model_and_one_from_before_loads_without_one(tmp_path):
    import lightning

    from nlprnn.export import load_checkpoint

    model, (ids, lengths) = blended_model(0.5)
    hparams = {"vocab_size": VOCAB, "num_classes": 3, "embedding_dim": 4, "ngram_buckets": 101,
               "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    for name, saved in (("now", {**hparams, "linear_blend": 0.5, "linear_c": C}), ("old", hparams),
                        ("before_c", {**hparams, "linear_blend": 0.5})):
        state = {k: v for k, v in model.state_dict().items() if name != "old" or not k.startswith("linear.")}
        torch.save({"state_dict": state, "hyper_parameters": saved,
                    "pytorch-lightning_version": lightning.__version__}, tmp_path / f"{name}.ckpt")
    now, old = load_checkpoint(tmp_path / "now.ckpt").eval(), load_checkpoint(tmp_path / "old.ckpt").eval()
    assert old.linear is None
    before_c = load_checkpoint(tmp_path / "before_c.ckpt")
    assert before_c.linear.c == before_c.hparams.linear_c == 4.0  # what it was fitted at, not today's default
    with torch.no_grad():
        torch.testing.assert_close(now(ids, lengths), model(ids, lengths), rtol=0, atol=0)
        torch.testing.assert_close(old(ids, lengths), model.outputs(ids, lengths)[0], rtol=0, atol=0)
