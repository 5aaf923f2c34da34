"""Units of nlprnn.callbacks: scores, plot, telemetry windows, the NaN guard, atomic saves, loader position."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from nlprnn.data.batching import ResumableLoader
from nlprnn.callbacks import (
    AtomicCheckpointIO,
    NonFiniteLoss,
    NonFiniteLossGuard,
    RestoreLoaderPosition,
    TrainingMonitor,
    per_class_scores,
    plot_confusion_matrix,
)
from nlprnn.data.batching import BucketBatchSampler


def test_per_class_scores_from_a_confusion_matrix():
    counts = torch.tensor([[5.0, 1, 0], [2, 3, 0], [0, 0, 0]])  # rows true, columns predicted; class 2 never seen
    scores = per_class_scores(counts)
    torch.testing.assert_close(scores["precision"], torch.tensor([5 / 7, 3 / 4, 0]))
    torch.testing.assert_close(scores["recall"], torch.tensor([5 / 6, 3 / 5, 0]))
    p, r = scores["precision"][:2], scores["recall"][:2]
    torch.testing.assert_close(scores["f1"], torch.cat([2 * p * r / (p + r), torch.zeros(1)]))


def test_the_confusion_matrix_plot_is_a_png():
    png = plot_confusion_matrix(np.array([[8, 2], [1, 9]]), ["negative", "positive"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


class Recorder:
    """Stands in for a LightningModule: collects what is logged."""

    def __init__(self) -> None:
        self.logged: dict[str, list[float]] = {}

    def log(self, name, value, **_) -> None:
        self.logged.setdefault(name, []).append(float(value))


def test_training_monitor_logs_padding_efficiency_and_throughput_per_window():
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=2, strategy=SimpleNamespace(reduce=lambda t, **_: t),
                              train_dataloader=None)
    module, monitor = Recorder(), TrainingMonitor()
    monitor.on_train_epoch_start(trainer, module)
    batches = [(torch.zeros(2, 3), torch.tensor([3, 1])), (torch.zeros(3, 2), torch.tensor([2, 2, 1]))]
    for step, (ids, lengths) in enumerate(batches, start=1):
        monitor.on_train_batch_start(trainer, module, {"input_ids": ids, "lengths": lengths}, step - 1)
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, None, step - 1)
    # One window of two steps: 4 + 5 real tokens in 6 + 6 padded positions.
    assert module.logged["padding_efficiency"] == [pytest.approx(9 / 12)]
    assert len(module.logged["tokens_per_sec"]) == 1 and module.logged["tokens_per_sec"][0] > 0


def test_the_guard_names_the_first_non_finite_step_when_it_checks():
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=4, strategy=SimpleNamespace(reduce=lambda t, **_: t))
    guard = NonFiniteLossGuard()
    for step, loss in enumerate([0.7, 0.6, float("nan"), float("inf")], start=1):
        trainer.global_step = step
        if step < 4:
            guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step - 1)
        else:  # the 4th step is a checking step
            with pytest.raises(NonFiniteLoss, match="became NaN or infinite at step 3;"):
                guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step - 1)


def test_the_guard_stays_quiet_while_the_loss_is_finite():
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1, strategy=SimpleNamespace(reduce=lambda t, **_: t))
    guard = NonFiniteLossGuard()
    for step in range(1, 4):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0 / step)}, None, step - 1)
    guard.check(trainer)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # fails half-way through writing


def test_an_interrupted_checkpoint_write_leaves_the_previous_file_whole(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "w": torch.ones(1000), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


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
