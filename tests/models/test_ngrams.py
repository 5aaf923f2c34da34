"""NgramBag: a hand-computed reference, padding invariance, and the classifier's wide-and-deep head."""

from __future__ import annotations

import math

import pytest
import torch

from nlprnn.models.classifier import TextClassifier
from nlprnn.models.ngrams import BIGRAM_PRIME, NgramBag

VOCAB, BUCKETS, DIM = 30, 11, 5


def reference(bag: NgramBag, ids: list[int]) -> torch.Tensor:
    """Sum of the embeddings of each token and each hashed adjacent pair (each distinct one once, for a distinct
    bag), over sqrt of their count, layer-normed."""
    rows = list(ids) + [(a * BIGRAM_PRIME + b) % BUCKETS + VOCAB for a, b in zip(ids, ids[1:])]
    if bag.distinct:
        rows = sorted(set(rows))
    return bag.norm(bag.table.weight[rows].sum(0) / math.sqrt(len(rows)))


@pytest.mark.parametrize("distinct", [False, True])
def test_matches_the_hand_computed_bag_and_ignores_padding(distinct):
    torch.manual_seed(0)
    bag = NgramBag(VOCAB, DIM, BUCKETS, distinct)
    rows = [[3, 7, 7, 2, 9], [4], [5, 6], [8, 1, 8, 1, 8, 1]]  # repeated words and pairs
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), 8, dtype=torch.long)
    noisy = torch.randint(1, VOCAB, (len(rows), 8))  # anything at all where padding would be
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        noisy[b, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        out = bag(ids, lengths)
        torch.testing.assert_close(bag(noisy, lengths), out, rtol=0, atol=1e-6)
        for b, row in enumerate(rows):
            torch.testing.assert_close(out[b], reference(bag, row), rtol=0, atol=1e-6)
            torch.testing.assert_close(bag(ids[b : b + 1, : len(row)], lengths[b : b + 1])[0], out[b], rtol=0, atol=1e-6)


def test_pairs_are_ordered():
    """"not good" and "good not" are different pairs (unless they share a bucket, which these ids do not)."""
    torch.manual_seed(0)
    bag = NgramBag(VOCAB, DIM, BUCKETS)
    lengths = torch.tensor([2])
    with torch.no_grad():
        assert not torch.allclose(bag(torch.tensor([[3, 4]]), lengths), bag(torch.tensor([[4, 3]]), lengths))


@pytest.mark.parametrize("typical_length,width", [(400, 64), (12, 0)])
def test_the_classifier_derives_the_bag_from_the_texts_length(typical_length, width):
    model = TextClassifier(VOCAB, 3, embedding_dim=4, typical_length=typical_length)
    assert (model.ngrams.output_dim if model.ngrams else 0) == width
    assert model.head[-1].in_features == model.encoder.output_dim + width
    assert model.derived["model.ngram_dim"].value == width and str(typical_length) in model.derived["model.ngram_dim"].reason


def test_an_explicit_width_wins_over_the_derived_one():
    model = TextClassifier(VOCAB, 3, embedding_dim=4, typical_length=400, ngram_dim=0)
    assert model.ngrams is None and "model.ngram_dim" not in model.derived
    model = TextClassifier(VOCAB, 3, embedding_dim=4, typical_length=5, ngram_dim=8)
    assert model.ngrams.output_dim == 8


def test_the_recurrence_reads_only_its_opening_and_the_bag_all_of_the_text():
    torch.manual_seed(0)
    lengths = torch.tensor([7, 2, 5])
    ids = torch.randint(1, VOCAB, (3, 9))
    ids[torch.arange(9) >= lengths[:, None]] = 0
    late = ids.clone()
    late[0, 6] = (late[0, 6] % (VOCAB - 1)) + 1  # another token after the recurrence's cut of 4
    for ngram_dim, changes in ((0, False), (3, True)):
        model = TextClassifier(VOCAB, 3, embedding_dim=4, ngram_dim=ngram_dim, recurrent_length=4).eval()
        with torch.no_grad():
            logits = model(ids, lengths)
            assert (model(late, lengths)[0] != logits[0]).any() == changes
            for b, n in enumerate(lengths.tolist()):  # padding still changes nothing
                torch.testing.assert_close(model(ids[b : b + 1, :n], lengths[b : b + 1])[0], logits[b], rtol=0, atol=1e-5)


def test_the_bag_learns_at_its_own_rate_and_the_rest_at_lr():
    torch.manual_seed(0)
    model = TextClassifier(VOCAB, 3, embedding_dim=4, ngram_dim=3, ngram_buckets=BUCKETS, lr=1e-3, ngram_lr_scale=10.0)
    optimizer = model.configure_optimizers()
    rest, bag = optimizer.param_groups
    assert (rest["lr"], bag["lr"]) == (1e-3, pytest.approx(1e-2)) and bag["params"] == [model.ngrams.table.weight]
    assert len(rest["params"]) + len(bag["params"]) == len(list(model.parameters()))
    table, embedding = model.ngrams.table.weight.detach().clone(), model.embedding.weight.detach().clone()
    ids, lengths = torch.tensor([[3, 7, 2]]), torch.tensor([3])
    model.loss(model(ids, lengths), torch.tensor([1])).backward()
    optimizer.step()  # Adam's first step moves every parameter with a gradient by about its group's lr
    assert (model.ngrams.table.weight - table)[3].abs().max().item() == pytest.approx(1e-2, rel=0.05)
    assert (model.embedding.weight - embedding)[3].abs().max().item() == pytest.approx(1e-3, rel=0.05)


def test_without_a_bag_every_parameter_learns_at_lr():
    model = TextClassifier(VOCAB, 3, embedding_dim=4, ngram_dim=0, lr=1e-3)
    (group,) = model.configure_optimizers().param_groups
    assert group["lr"] == 1e-3 and len(group["params"]) == len(list(model.parameters()))


def test_a_bag_counts_each_distinct_ngram_once_and_a_checkpoint_from_before_keeps_counting_all(tmp_path):
    import functools

    import lightning

    from nlprnn.export import load_checkpoint
    from nlprnn.models.encoder import RNNEncoder

    torch.manual_seed(0)
    encoder = functools.partial(RNNEncoder, hidden_size=4)
    model = TextClassifier(VOCAB, 3, embedding_dim=4, encoder=encoder, ngram_dim=3, ngram_buckets=BUCKETS).eval()
    assert model.ngrams.distinct  # the default
    # the hyperparameters as `python -m nlprnn.fit` writes them, from before the option existed
    hparams = {"vocab_size": VOCAB, "num_classes": 3, "embedding_dim": 4, "ngram_dim": 3, "ngram_buckets": BUCKETS,
               "encoder": {"class_path": "nlprnn.models.encoder.RNNEncoder", "init_args": {"hidden_size": 4}},
               "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, tmp_path / "old.ckpt")
    old = load_checkpoint(tmp_path / "old.ckpt").eval()
    assert not old.ngrams.distinct and not old.hparams.ngram_distinct
    ids, lengths = torch.tensor([[3, 7, 3, 7, 3]]), torch.tensor([5])
    with torch.no_grad():
        torch.testing.assert_close(old.ngrams(ids, lengths)[0], reference(old.ngrams, [3, 7, 3, 7, 3]))
        assert not torch.allclose(old(ids, lengths), model(ids, lengths))
