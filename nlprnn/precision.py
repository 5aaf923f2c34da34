"""Running a recurrence under mixed precision, in a dtype its kernels support.

Under `--trainer.precision bf16-mixed` or `16-mixed` the layers around the recurrence (embedding
projections, attention, head) run in the low-precision dtype. The recurrence itself:

- off CUDA runs in float32 with autocast disabled: CPU LSTM kernels under bf16/fp16 autocast fail on
  CPUs without native bf16 ("could not create a primitive descriptor for the LSTM forward propagation
  primitive"), and a recurrence accumulates rounding error over time anyway;
- on CUDA runs under autocast (cuDNN LSTM/GRU/RNN support fp16 and, on recent builds, bf16). Where the
  build lacks a low-precision kernel (some builds raise `"_thnn_fused_lstm_cell_cuda" not implemented
  for 'BFloat16'`), the failure is remembered and that cell runs in float32 from then on.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

# (cell class name, autocast dtype) pairs whose CUDA kernels turned out to be missing in this process
_NO_LOW_PRECISION_KERNEL: set[tuple[str, torch.dtype]] = set()


def recur(rnn: nn.RNNBase, x: torch.Tensor) -> torch.Tensor:
    """(B, T, H_in) -> (B, T, H_out): one batch-first recurrence, in a dtype its kernels support."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return rnn(x)[0]
    if device != "cuda":
        return float32_recur(rnn, x)
    return low_precision_or_float32(rnn, x, torch.get_autocast_dtype(device))


def float32_recur(rnn: nn.RNNBase, x: torch.Tensor) -> torch.Tensor:
    """Run the recurrence in float32 with autocast disabled; its output feeds back into the mixed layers."""
    with torch.autocast(x.device.type, enabled=False):
        return rnn(x.float())[0]


def low_precision_or_float32(rnn: nn.RNNBase, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Try the autocast kernel; if this build has none for `dtype`, fall back to float32 and remember that."""
    key = (type(rnn).__name__, dtype)
    if key in _NO_LOW_PRECISION_KERNEL:
        return float32_recur(rnn, x)
    try:
        return rnn(x)[0]
    except (RuntimeError, NotImplementedError) as err:
        if "not implemented for" not in str(err):
            raise
        _NO_LOW_PRECISION_KERNEL.add(key)
        warnings.warn(
            f"this PyTorch build has no {dtype} kernel for {type(rnn).__name__} ({err}); "
            "running the recurrence in float32, the rest of the model stays in mixed precision",
            stacklevel=2,
        )
        return float32_recur(rnn, x)
