"""Resuming the same batches: the loader's position survives a checkpoint, and other batches are refused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from nlprnn.callbacks.resume import RestoreLoaderPosition
from nlprnn.data.batching import BucketBatchSampler, ResumableLoader


def make_loader(seed: int = 3) -> ResumableLoader:
    lengths = np.random.default_rng(0).integers(1, 30, size=64)
    sampler = BucketBatchSampler(lengths, batch_size=4, seed=seed, window_batches=4)
    return ResumableLoader(DataLoader(list(range(64)), batch_sampler=sampler, collate_fn=list))


def test_lightning_reaches_the_batch_sampler_epoch_through_the_loader():
    loader = make_loader()
    epoch0 = list(loader)
    _set_sampler_epoch(loader, 1)  # what Lightning calls before each epoch
    assert loader.batch_sampler.epoch == 1 and list(loader) != epoch0
    _set_sampler_epoch(loader, 0)
    assert list(loader) == epoch0


def test_a_restored_loader_continues_after_the_batches_already_served():
    loader = make_loader()
    loader.set_epoch(2)
    uninterrupted = list(loader)
    iterator = iter(loader)
    served = [next(iterator) for _ in range(5)]
    state = loader.batch_sampler.state_dict()
    assert (state["epoch"], state["position"]) == (2, 5)

    restored = make_loader()
    restored.batch_sampler.load_state_dict(state)
    assert served + list(restored) == uninterrupted
    assert list(restored) == uninterrupted  # the skip applies to the resumed epoch only
    restored.batch_sampler.load_state_dict(state)
    restored.set_epoch(3)  # the saved epoch had ended: a new epoch starts at its first batch
    assert len(list(restored)) == len(loader)


def test_the_position_counts_delivered_batches_although_workers_draw_ahead():
    lengths = np.random.default_rng(0).integers(1, 30, size=64)
    sampler = BucketBatchSampler(lengths, batch_size=4, seed=3, window_batches=4)
    loader = ResumableLoader(DataLoader(list(range(64)), batch_sampler=sampler, collate_fn=list, num_workers=1,
                                        prefetch_factor=4))
    iterator = iter(loader)
    served = [next(iterator) for _ in range(3)]
    assert sampler.state_dict()["position"] == 3  # the worker has drawn more index lists by now
    restored = make_loader()
    restored.batch_sampler.load_state_dict(sampler.state_dict())
    assert served + list(restored) == list(make_loader())


def test_the_loader_is_not_stateful_to_lightning():
    # RestoreLoaderPosition alone saves and restores the position; Lightning must not do it a second time.
    from lightning.fabric.utilities.types import _Stateful

    assert not isinstance(make_loader(), _Stateful)


def test_the_callback_saves_the_sampler_and_refuses_a_resume_with_other_batches():
    # The same check as nlprnn.fit's, for a Trainer built without it: at train start, before a batch is read.
    from nlprnn.errors import UserError

    saving = RestoreLoaderPosition()
    loader = make_loader()
    saving.setup(SimpleNamespace(train_dataloader=loader), None, "fit")
    next(iter(loader))
    checkpoint = {"callbacks": {"RestoreLoaderPosition": saving.state_dict()}}
    assert RestoreLoaderPosition.saved_state(checkpoint)["position"] == 1

    lengths = np.random.default_rng(0).integers(1, 30, size=64)
    sampler = BucketBatchSampler(lengths, batch_size=8, seed=3, window_batches=4)
    other = ResumableLoader(DataLoader(list(range(64)), batch_sampler=sampler, collate_fn=list))
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), ckpt_path="runs/x/last.ckpt", train_dataloader=other)
    restoring = RestoreLoaderPosition()
    restoring.on_load_checkpoint(trainer, None, checkpoint)
    with pytest.raises(UserError, match="the batch size changed from 4 to 8 since last.ckpt"):
        restoring.on_train_start(trainer, None)
