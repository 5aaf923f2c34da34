"""NonFiniteLossGuard: names the first non-finite step when it checks, and is quiet otherwise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nlprnn.callbacks.nonfinite import NonFiniteLoss, NonFiniteLossGuard


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
