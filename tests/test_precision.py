"""Mixed precision: every cell trains under bf16-mixed on CPU; recurrences run in a dtype their kernels support."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from conftest import CELLS
from nlprnn import precision
from nlprnn.fit import main
from nlprnn.models.encoder import RNNEncoder



@pytest.mark.parametrize("cell", CELLS)
def test_bf16_mixed_fit_with_each_cell(tmp_path, tiny_csv, cell):
    metrics = main([
        "--data.train_file", str(tiny_csv), "--data.batch_size", "16", "--trainer.precision", "bf16-mixed",
        "--model.embedding_dim", "16", "--model.encoder.cell", cell, "--model.encoder.hidden_size", "16",
        "--model.lr", "0.01", "--model.embedding_dropout", "0", "--model.dropout", "0", "--model.encoder.dropout", "0",
        "--trainer.max_epochs", "10", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--output_dir", str(tmp_path / "runs"), "--run_name", cell,
    ])
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["test_acc"] >= 0.75  # it learned (chance is 0.5): the tiny data is separable by its sentiment words
    state = torch.load(tmp_path / "runs" / cell / "last.ckpt", map_location="cpu", weights_only=False)
    weights = [w for w in state["state_dict"].values() if w.is_floating_point()]  # not the hash's integer multiplier
    assert weights and all(w.dtype == torch.float32 for w in weights)  # mixed: weights stay float32


@pytest.mark.parametrize("cell", CELLS)
def test_cpu_autocast_runs_the_recurrence_in_float32_and_the_rest_mixed(cell):
    torch.manual_seed(0)
    encoder = RNNEncoder(8, cell=cell, hidden_size=6, num_layers=2, direction="bidirectional")
    head = nn.Linear(encoder.output_dim, 3)
    x, lengths = torch.randn(4, 7, 8), torch.tensor([7, 3, 1, 5])
    reference = encoder(x, lengths).outputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = encoder(x, lengths)
        logits = head(encoded.last)
    assert encoded.outputs.dtype == torch.float32 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(encoded.outputs, reference, rtol=0, atol=0)  # float32 in, float32 all through


class MissingKernelRNN(nn.Module):
    """Stands in for a CUDA build without a bf16 kernel: fails whenever autocast is on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if torch.is_autocast_enabled(x.device.type):
            raise RuntimeError("\"_thnn_fused_lstm_cell_cuda\" not implemented for 'BFloat16'")
        return x * 2, None


def test_a_missing_low_precision_kernel_falls_back_to_float32_once(monkeypatch):
    monkeypatch.setattr(precision, "_NO_LOW_PRECISION_KERNEL", set())
    rnn, x = MissingKernelRNN(), torch.ones(2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="running the recurrence in float32"):
            y = precision.low_precision_or_float32(rnn, x, torch.bfloat16)
        assert rnn.calls == 2 and y.dtype == torch.float32 and torch.equal(y, x * 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # remembered: no second try, no second warning
            precision.low_precision_or_float32(rnn, x, torch.bfloat16)
        assert rnn.calls == 3


def test_other_recurrence_errors_are_not_hidden(monkeypatch):
    monkeypatch.setattr(precision, "_NO_LOW_PRECISION_KERNEL", set())

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        precision.low_precision_or_float32(Broken(), torch.ones(1, 1, 1), torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cudnn", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_autocast_trains_every_cell(cell, cudnn, dtype):
    torch.manual_seed(0)
    encoder = RNNEncoder(8, cell=cell, hidden_size=16, num_layers=2, direction="bidirectional").cuda()
    head = nn.Linear(encoder.output_dim, 3).cuda()
    x, lengths = torch.randn(4, 7, 8, device="cuda"), torch.tensor([7, 3, 1, 5], device="cuda")
    with torch.backends.cudnn.flags(enabled=cudnn), torch.autocast("cuda", dtype=dtype):
        loss = head(encoder(x, lengths).last).float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
