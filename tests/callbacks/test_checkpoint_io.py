"""AtomicCheckpointIO: a failed write leaves the previous checkpoint whole."""

from __future__ import annotations

import pytest
import torch

from nlprnn.callbacks.checkpoint_io import AtomicCheckpointIO


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
