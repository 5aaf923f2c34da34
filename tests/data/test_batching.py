"""BucketBatchSampler: disjoint equal shares under DDP, every example once, bounded batches, little padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlprnn.data.batching import BucketBatchSampler, Collate


def lengths_like_reviews(n: int, seed: int = 0) -> np.ndarray:
    """Skewed lengths, 1..200 tokens, mostly short: what bucketing is for."""
    return np.clip(np.random.default_rng(seed).lognormal(3.0, 0.7, n).astype(int), 1, 200)


def rank_samplers(lengths, batch_size: int, world_size: int, **kwargs) -> list[BucketBatchSampler]:
    return [
        BucketBatchSampler(lengths, batch_size, rank=rank, world_size=world_size, **kwargs) for rank in range(world_size)
    ]


def epoch(samplers: list[BucketBatchSampler], number: int) -> list[list[list[int]]]:
    for sampler in samplers:
        sampler.set_epoch(number)
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n", [1000, 1001, 130])  # 1001 and 130 leave an odd number of batches to even out
def test_two_ranks_get_disjoint_equal_count_batches_covering_the_data(shuffle, n):
    samplers = rank_samplers(lengths_like_reviews(n), batch_size=64, world_size=2, shuffle=shuffle, window_batches=4)
    per_rank = epoch(samplers, 0)
    assert len(per_rank[0]) == len(per_rank[1]) == len(samplers[0]) == len(samplers[1]) > 0
    seen = [index for batches in per_rank for batch in batches for index in batch]
    assert sorted(seen) == list(range(n))  # every example exactly once: disjoint and covering
    assert all(0 < len(batch) <= 64 for batches in per_rank for batch in batches)


def test_each_epoch_has_a_new_order_and_the_same_epoch_the_same():
    samplers = rank_samplers(lengths_like_reviews(2000), batch_size=32, world_size=2)
    first, second, first_again = epoch(samplers, 0), epoch(samplers, 1), epoch(samplers, 0)
    assert first != second and first == first_again
    assert [sorted(sum(r, [])) for r in first] != [sorted(sum(r, [])) for r in second]  # ranks' shares change too


def test_batches_hold_similar_lengths():
    lengths = lengths_like_reviews(20_000)
    sampler = BucketBatchSampler(lengths, batch_size=64)
    assert sampler.padding_efficiency() > 0.88
    unsorted_padded = sum(lengths[i : i + 64].max() * len(lengths[i : i + 64]) for i in range(0, len(lengths), 64))
    assert lengths.sum() / unsorted_padded < 0.6  # what random batches would waste


def test_padding_efficiency_counts_real_over_padded_tokens_of_this_rank():
    lengths = lengths_like_reviews(500)
    sampler = BucketBatchSampler(lengths, batch_size=16, rank=1, world_size=2)
    batches = list(sampler)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    assert sampler.padding_efficiency() == pytest.approx(real / padded)


def test_too_few_examples_for_the_ranks_is_an_error():
    with pytest.raises(ValueError, match="cannot fill"):
        BucketBatchSampler([3, 4, 5], batch_size=1, world_size=2)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 400),
    batch_size=st.integers(1, 50),
    world_size=st.integers(1, 4),
    window_batches=st.integers(1, 8),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
)
def test_any_shape_shares_every_example_once(n, batch_size, world_size, window_batches, shuffle, seed):
    lengths = lengths_like_reviews(n, seed)
    try:
        samplers = rank_samplers(lengths, batch_size, world_size, shuffle=shuffle, window_batches=window_batches, seed=seed)
    except ValueError:
        assert n < world_size * 2 or batch_size < 2  # only when equal shares would need repeats
        return
    per_rank = epoch(samplers, seed)
    assert len({len(batches) for batches in per_rank}) == 1
    assert sorted(i for batches in per_rank for batch in batches for i in batch) == list(range(n))
    assert all(0 < len(batch) <= batch_size for batches in per_rank for batch in batches)


def test_collate_pads_with_the_pad_id_and_keeps_lengths():
    batch = Collate(pad_id=0)({"input_ids": [[5, 6, 7], [8]], "label": [1, 0]})
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["lengths"].tolist() == [3, 1] and batch["labels"].dtype == torch.long


@pytest.mark.slow
def test_padding_efficiency_on_movie_snippets_at_batch_size_64(shared_cache, monkeypatch):
    from nlprnn.data.datamodule import TextDataModule

    monkeypatch.setenv("NLPRNN_CACHE", str(shared_cache))
    data = TextDataModule(dataset="movie-snippets", batch_size=64)
    data.prepare()
    lengths = data.splits["train"].with_format("numpy", columns=["length"])[:]["length"]
    for number in range(3):
        sampler = BucketBatchSampler(lengths, 64, seed=number)
        sampler.set_epoch(number)
        assert sampler.padding_efficiency() >= 0.90


# --- resume state ------------------------------------------------------------------------------------


def drawn(sampler: BucketBatchSampler, count: int) -> list[list[int]]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("world_size", [1, 2])
def test_state_dict_round_trip_continues_each_rank_after_its_position(world_size):
    lengths = lengths_like_reviews(700)
    samplers = rank_samplers(lengths, 16, world_size, seed=5, window_batches=3)
    uninterrupted = epoch(samplers, 4)
    states = []
    for sampler in samplers:
        drawn(sampler, 7)  # epoch 4 is still set
        states.append(sampler.state_dict())
    assert all(s["epoch"] == 4 and s["position"] == 7 for s in states)
    assert states[0]["dataset"] == states[-1]["dataset"]  # the fingerprint agrees across ranks

    restored = rank_samplers(lengths, 16, world_size, seed=5, window_batches=3)
    for sampler, state in zip(restored, states):
        sampler.load_state_dict(state)
        sampler.set_epoch(4)  # what Lightning does before the resumed epoch
        assert list(sampler) == uninterrupted[sampler.rank][7:]
        assert sampler.state_dict()["position"] == len(sampler)  # the epoch's end
        assert list(sampler) == uninterrupted[sampler.rank]  # a second pass is the whole epoch again


def test_a_state_from_an_ended_epoch_starts_the_next_epoch_at_its_first_batch():
    sampler = BucketBatchSampler(lengths_like_reviews(300), 16)
    list(sampler)
    restored = BucketBatchSampler(lengths_like_reviews(300), 16)
    restored.load_state_dict(sampler.state_dict())
    restored.set_epoch(1)
    assert len(list(restored)) == len(sampler)


def test_skipped_batches_are_never_read():
    from torch.utils.data import DataLoader

    from nlprnn.data.batching import ResumableLoader

    class Recording(list):
        read: list[int] = []

        def __getitem__(self, index):
            self.read.append(index)
            return super().__getitem__(index)

    lengths = lengths_like_reviews(200)
    first = BucketBatchSampler(lengths, 8)
    skipped = drawn(first, 10)
    data = Recording(range(200))
    resumed = BucketBatchSampler(lengths, 8)
    resumed.load_state_dict(first.state_dict())
    batches = list(ResumableLoader(DataLoader(data, batch_sampler=resumed, collate_fn=list)))
    assert len(batches) == len(first) - 10
    assert not set(data.read) & {i for batch in skipped for i in batch}
    assert sorted(data.read) == sorted(i for batch in batches for i in batch)


@pytest.mark.parametrize(
    "changed, name",
    [
        (dict(batch_size=32), "batch_size"),
        (dict(world_size=2), "world_size"),
        (dict(seed=1), "seed"),
        (dict(lengths=lengths_like_reviews(399)), "dataset"),
        (dict(lengths=lengths_like_reviews(400, seed=9)), "dataset"),  # same count, other lengths
    ],
)
def test_a_state_whose_batches_differ_is_refused_naming_what_changed(changed, name):
    from nlprnn.data.batching import ResumeMismatch

    settings = dict(lengths=lengths_like_reviews(400), batch_size=16, seed=0, world_size=1)
    saved = BucketBatchSampler(**settings)
    drawn(saved, 3)
    resumed = BucketBatchSampler(**{**settings, **changed})
    with pytest.raises(ResumeMismatch) as refused:
        resumed.load_state_dict(saved.state_dict())
    assert [c.name for c in refused.value.changes] == [name]
    assert list(resumed) == list(BucketBatchSampler(**{**settings, **changed}))  # nothing was half-applied
