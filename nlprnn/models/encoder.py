"""RNNEncoder: stacked vanilla RNN, LSTM or GRU layers read forward, in reverse, or both ways.

Every direction runs as a forward-only recurrence with padding *after* the real tokens, so padding can
never reach a real state. The reverse direction reads a per-row reversed copy of the batch (each row's
real tokens last to first, padding left in place), built by one gather from the lengths; a flip of
the padded tensor would be wrong, as its reverse pass would start on padding. This needs no packed
sequences, so it exports to ONNX with dynamic batch and time axes and stays exact there too.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from torch import nn

from nlprnn.errors import UserError
from nlprnn.precision import recur

Cell = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]
Direction = Literal["forward", "reverse", "bidirectional"]


def make_cell(cell: Cell, input_size: int, hidden_size: int) -> nn.RNNBase:
    """The one place a cell name becomes a PyTorch recurrence (single layer, one direction)."""
    if cell in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(input_size, hidden_size, nonlinearity=cell.removeprefix("rnn_"), batch_first=True)
    if cell == "lstm":
        return nn.LSTM(input_size, hidden_size, batch_first=True)
    if cell == "gru":
        return nn.GRU(input_size, hidden_size, batch_first=True)
    raise ValueError(f"unknown cell {cell!r}; use rnn_tanh, rnn_relu, lstm or gru")


def reverse_index(lengths: torch.Tensor, time: int) -> torch.Tensor:
    """(B, T) positions that reverse each row's first `length` steps and keep its padding in place.

    The map is its own inverse, so the same index turns reversed outputs back into reading order.
    """
    t = torch.arange(time, device=lengths.device).unsqueeze(0)  # (1, T)
    n = lengths.unsqueeze(1)  # (B, 1)
    return torch.where(t < n, n - 1 - t, t)


def gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, t], :] for a (B, T, D) tensor and a (B, T) index."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class EncoderOutput(NamedTuple):
    outputs: torch.Tensor  # (B, T, output_dim) per-token states in reading order; zero at padding
    last: torch.Tensor  # (B, output_dim) each direction's state after its last real token


class RNNEncoder(nn.Module):
    def __init__(
        self,
        input_size: int,
        cell: Cell = "lstm",
        hidden_size: int = 128,
        num_layers: int = 2,
        direction: Direction = "bidirectional",
        dropout: float = 0.0,
        residual: bool = False,
    ) -> None:
        """A deep recurrent encoder that reads only each sequence's real tokens.

        Args:
            input_size: width of the input vectors (set by the model from its embedding).
            cell: rnn_tanh or rnn_relu (Elman), lstm, or gru.
            hidden_size: width of each direction's state.
            num_layers: recurrent layers stacked on each other.
            direction: forward (first token to last), reverse (last to first), or bidirectional (both, joined).
            dropout: dropout between stacked layers.
            residual: add each layer's input to its output where the widths match (helps deep stacks train).
        """
        super().__init__()
        # UserErrors: these are options of nlprnn.fit (model.encoder.*), reported as one line there
        if cell not in get_args(Cell):
            raise UserError(f"model.encoder.cell {cell!r} is unknown; use rnn_tanh, rnn_relu, lstm or gru")
        if direction not in get_args(Direction):
            raise UserError(f"model.encoder.direction {direction!r} is unknown; use forward, reverse or bidirectional")
        if num_layers < 1:
            raise UserError(f"model.encoder.num_layers is a number of stacked layers, at least 1: got {num_layers}")
        if hidden_size < 1:
            raise UserError(f"model.encoder.hidden_size is a state width, at least 1: got {hidden_size}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"model.encoder.dropout is a probability in [0, 1): got {dropout}")
        self.cell = cell
        self.direction = direction
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.residual = residual
        self.reads = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}[direction]
        self.output_dim = hidden_size * len(self.reads)
        widths = [input_size] + [self.output_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.ModuleList(make_cell(cell, width, hidden_size) for _ in self.reads) for width in widths
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """x: (B, T, input_size) embedded tokens, real ones first; lengths: (B,) counts of real tokens, all >= 1."""
        batch, time, _ = x.shape
        rev = reverse_index(lengths, time)  # (B, T)
        mask = (torch.arange(time, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)  # (B, T, 1)
        for depth, layer in enumerate(self.layers):
            if depth > 0:
                x = self.dropout(x)
            outputs = []
            for rnn, backwards in zip(layer, self.reads):
                if backwards:
                    outputs.append(gather_time(self._recur(rnn, gather_time(x, rev)), rev))
                else:
                    outputs.append(self._recur(rnn, x))
            y = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]  # (B, T, output_dim)
            x = y + x if self.residual and y.shape == x.shape else y
        # where, not a product: a relu recurrence may run on through padding to inf, and inf * 0 is NaN
        x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        # The state after the last token in each direction's reading order: position length-1 read
        # forward, position 0 read backward.
        last_pos = (lengths - 1).view(batch, 1, 1)
        parts = []
        for i, backwards in enumerate(self.reads):
            part = x[..., i * self.hidden_size : (i + 1) * self.hidden_size]
            parts.append(part[:, 0] if backwards else part.gather(1, last_pos.expand(-1, 1, part.size(-1))).squeeze(1))
        last = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return EncoderOutput(x, last)

    @staticmethod
    def _recur(rnn: nn.RNNBase, x: torch.Tensor) -> torch.Tensor:
        """Run one recurrence; under mixed precision in a dtype its kernels support (see nlprnn.precision)."""
        return recur(rnn, x)
