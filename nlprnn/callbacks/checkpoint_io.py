"""AtomicCheckpointIO: a checkpoint on disk is the previous one or the new one, never half-written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from nlprnn.atomic import replacing


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, flushes it to disk, then renames it.

    Lightning's own writer stages the file in the system temp directory, and when that is another
    file system the final move is a copy that a kill can leave half-done.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the atomic write there
            return super().save_checkpoint(checkpoint, path, storage_options)
        with replacing(Path(path)) as f:
            torch.save(checkpoint, f)
