"""NgramBag: a hand-computed reference, padding invariance, and the classifier's wide-and-deep head."""

from __future__ import annotations

import math

import pytest
import torch

from nlprnn.errors import UserError
from nlprnn.models.classifier import TextClassifier, head_and_tail
from nlprnn.models.ngrams import LEGACY_PAIR_MULTIPLIER, PAIR_MULTIPLIER, NgramBag

VOCAB, BUCKETS, DIM = 30, 11, 5


def reference(bag: NgramBag, ids: list[int]) -> torch.Tensor:
    """Sum of the embeddings of each token and each hashed adjacent pair (each distinct one once, for a distinct
    bag), over sqrt of their count, layer-normed."""
    multiplier = int(bag.pair_multiplier)
    rows = list(ids) + [(a * multiplier + b) % BUCKETS + VOCAB for a, b in zip(ids, ids[1:])]
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


def test_dropout_leaves_out_ngrams_while_training_only():
    torch.manual_seed(0)
    vocab, buckets = 1000, 100_003
    bag = NgramBag(vocab, DIM, buckets, distinct=True, dropout=0.4)
    ids, lengths = torch.arange(1, 401).unsqueeze(0), torch.tensor([400])  # 400 words, 399 pairs: 799 n-grams
    kept = NgramBag(vocab, DIM, buckets, distinct=True)
    kept.load_state_dict(bag.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(bag.eval()(ids, lengths), kept.eval()(ids, lengths), rtol=0, atol=0)
    (bag.train()(ids, lengths) * torch.randn(DIM)).sum().backward()  # a plain sum of a layer norm has no gradient
    read = int((bag.table.weight.grad != 0).any(1).sum())  # the rows the training pass read
    assert abs(read / 799 - 0.6) < 0.06
    for _ in range(20):  # a one-word text whose only n-gram is dropped gives the bag's bias, not NaN
        assert torch.isfinite(NgramBag(vocab, DIM, buckets, dropout=0.9).train()(ids[:, :1], lengths.clamp(max=1))).all()


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_a_dropout_outside_0_to_1_is_refused(dropout):
    with pytest.raises(UserError, match=r"dropout must be in \[0, 1\)"):
        NgramBag(VOCAB, DIM, BUCKETS, dropout=dropout)


def test_pairs_are_ordered():
    """"not good" and "good not" are different pairs (unless they share a bucket, which these ids do not)."""
    torch.manual_seed(0)
    bag = NgramBag(VOCAB, DIM, BUCKETS)
    lengths = torch.tensor([2])
    with torch.no_grad():
        assert not torch.allclose(bag(torch.tensor([[3, 4]]), lengths), bag(torch.tensor([[4, 3]]), lengths))


def test_int32_ids_hash_their_pairs_as_int64_ids_do():
    """Tokenizers and Arrow columns hand out int32 ids: their pair hash must not wrap around in 32 bits."""
    torch.manual_seed(0)
    bag = NgramBag(1000, DIM, 200_003).eval()
    ids, lengths = torch.tensor([[999, 998, 997]]), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(bag(ids.int(), lengths), bag(ids, lengths))


@pytest.mark.parametrize("buckets", [100_003, 200_003, 1_000_003])
def test_word_pairs_fill_the_rows_as_a_random_hash_would(buckets):
    """Frequent words have the smallest ids, so the pairs that matter are pairs of small ids: every pair of
    the first 400 ids (160,000) must spread over the rows, not fall into a few of them. (A grid of pairs is
    harder on a linear hash than text is: on bbc-news's word pairs the multiplier fills 99-102% of what a
    random hash does, the legacy one 9-91%.)"""
    ids = torch.arange(400)
    a, b = ids.repeat_interleave(len(ids)), ids.repeat(len(ids))
    expected = buckets * (1 - math.exp(-len(a) / buckets))  # distinct rows a uniform random hash fills

    def filled(multiplier: int) -> float:
        return len(torch.unique((a * multiplier + b) % buckets)) / expected

    assert filled(PAIR_MULTIPLIER) > 0.85
    assert filled(LEGACY_PAIR_MULTIPLIER) < 0.2  # why checkpoints now carry their multiplier


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
    """And a checkpoint from before n-gram dropout trains on without it."""
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
    assert model.ngrams.dropout > 0 and old.ngrams.dropout == old.hparams.ngram_dropout == 0  # a resume trains as before
    ids, lengths = torch.tensor([[3, 7, 3, 7, 3]]), torch.tensor([5])
    with torch.no_grad():
        torch.testing.assert_close(old.ngrams(ids, lengths)[0], reference(old.ngrams, [3, 7, 3, 7, 3]))
        assert not torch.allclose(old(ids, lengths), model(ids, lengths))


def test_a_checkpoint_keeps_the_pair_hash_it_was_trained_with(tmp_path):
    import lightning

    from nlprnn.export import load_checkpoint

    torch.manual_seed(0)
    model = TextClassifier(VOCAB, 3, embedding_dim=4, ngram_dim=3, ngram_buckets=BUCKETS).eval()
    assert int(model.state_dict()["ngrams.pair_multiplier"]) == PAIR_MULTIPLIER
    hparams = {"vocab_size": VOCAB, "num_classes": 3, "embedding_dim": 4, "ngram_dim": 3, "ngram_buckets": BUCKETS,
               "ngram_distinct": True, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    state = model.state_dict()
    torch.save({"state_dict": state, "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, tmp_path / "now.ckpt")
    del state["ngrams.pair_multiplier"]  # as written before the multiplier was saved
    torch.save({"state_dict": state, "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, tmp_path / "old.ckpt")
    now, old = load_checkpoint(tmp_path / "now.ckpt").eval(), load_checkpoint(tmp_path / "old.ckpt").eval()
    assert int(now.ngrams.pair_multiplier) == PAIR_MULTIPLIER and int(old.ngrams.pair_multiplier) == LEGACY_PAIR_MULTIPLIER
    ids, lengths = torch.tensor([[3, 7, 2, 9]]), torch.tensor([4])
    with torch.no_grad():
        torch.testing.assert_close(now(ids, lengths), model(ids, lengths), rtol=0, atol=0)
        torch.testing.assert_close(old.ngrams(ids, lengths)[0], reference(old.ngrams, [3, 7, 2, 9]))
        assert not torch.allclose(old(ids, lengths), model(ids, lengths))


def test_each_branch_trains_a_head_of_its_own_and_predictions_use_the_joined_head():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = TextClassifier(VOCAB, 3, embedding_dim=4, ngram_dim=3, ngram_buckets=BUCKETS, branch_loss=0.5,
                           ngram_dropout=0.0)  # no randomness: the loss is recomputed below
    assert [head[-1].in_features for head in model.branch_heads] == [model.encoder.output_dim, 3]
    assert not TextClassifier(VOCAB, 3, embedding_dim=4, ngram_dim=0, branch_loss=0.5).branch_heads  # no bag
    model.log = model.log_dict = lambda *args, **kwargs: None  # no Trainer to log to
    batch = {"input_ids": torch.tensor([[3, 7, 2], [4, 5, 0]]), "lengths": torch.tensor([3, 2]),
             "labels": torch.tensor([2, 0])}
    with torch.no_grad():
        loss = model.training_step(batch, 0)
        recurrence, bag = model.branches(batch["input_ids"], batch["lengths"])
        expected = (F.cross_entropy(model(batch["input_ids"], batch["lengths"]), batch["labels"]) + 0.5 * (
            F.cross_entropy(model.branch_heads[0](recurrence), batch["labels"])
            + F.cross_entropy(model.branch_heads[1](bag), batch["labels"])))
        torch.testing.assert_close(loss, expected)
        plain = TextClassifier(VOCAB, 3, embedding_dim=4, ngram_dim=3, ngram_buckets=BUCKETS, ngram_dropout=0.0)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("branch_heads.")})
        torch.testing.assert_close(plain(batch["input_ids"], batch["lengths"]), model(batch["input_ids"], batch["lengths"]))


def test_head_and_tail_reads_a_long_texts_first_and_last_tokens_and_a_short_text_whole():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 0, 0, 0]])
    read, lengths = head_and_tail(ids, torch.tensor([9, 3, 6]), length=5, tail=2)
    assert read.tolist() == [[1, 2, 3, 8, 9], [1, 2, 3, 0, 0], [1, 2, 3, 5, 6]] and lengths.tolist() == [5, 3, 5]
    read, lengths = head_and_tail(ids, torch.tensor([9, 3, 6]), length=5, tail=0)  # the opening only
    assert read.tolist() == ids[:, :5].tolist() and lengths.tolist() == [5, 3, 5]
    assert head_and_tail(ids[1:2, :3], torch.tensor([3]), length=5, tail=2)[0].tolist() == [[1, 2, 3]]


def test_with_a_tail_the_recurrence_reads_a_long_texts_end_and_padding_still_changes_nothing():
    torch.manual_seed(0)
    lengths = torch.tensor([9, 2, 5])
    ids = torch.randint(1, VOCAB, (3, 11))
    ids[torch.arange(11) >= lengths[:, None]] = 0
    for position, read in ((4, False), (8, True)):  # a token skipped between head and tail, then the last one
        other = ids.clone()
        other[0, position] = (other[0, position] % (VOCAB - 1)) + 1
        model = TextClassifier(VOCAB, 3, embedding_dim=4, ngram_dim=0, recurrent_length=4, recurrent_tail=2).eval()
        with torch.no_grad():
            logits = model(ids, lengths)
            assert (model(other, lengths)[0] != logits[0]).any() == read
            for b, n in enumerate(lengths.tolist()):
                torch.testing.assert_close(model(ids[b : b + 1, :n], lengths[b : b + 1])[0], logits[b], rtol=0, atol=1e-5)


@pytest.mark.parametrize("length, tail", [(None, 2), (4, 4), (4, -1)])
def test_a_tail_must_be_part_of_the_recurrent_length(length, tail):
    with pytest.raises(UserError, match="recurrent_tail"):
        TextClassifier(VOCAB, 3, embedding_dim=4, recurrent_length=length, recurrent_tail=tail)
