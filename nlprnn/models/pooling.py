"""Pooling of per-token states into one vector per sequence, over real tokens only."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from nlprnn.errors import UserError
from nlprnn.models.encoder import EncoderOutput

PoolingKind = Literal["last", "mean", "max", "attention"]


class Pooling(nn.Module):
    def __init__(self, kind: PoolingKind, dim: int) -> None:
        """last: each direction's final state; mean / max: over real tokens; attention: a learned weighted sum."""
        super().__init__()
        if kind not in get_args(PoolingKind):  # model.pooling, an option of nlprnn.fit: one line there
            raise UserError(f"model.pooling {kind!r} is unknown; use last, mean, max or attention")
        self.kind = kind
        # no bias: softmax ignores a score shift shared by all tokens, so a bias would never learn
        self.score = nn.Linear(dim, 1, bias=False) if kind == "attention" else None

    def forward(self, encoded: EncoderOutput, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, D) states and (B,) lengths -> (B, D)."""
        if self.kind == "last":
            return encoded.last
        states = encoded.outputs
        mask = torch.arange(states.size(1), device=states.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        if self.kind == "mean":  # masked (by where: inf * 0 is NaN), so padding states need not be zero or finite
            real = torch.where(mask.unsqueeze(-1), states, torch.zeros((), dtype=states.dtype, device=states.device))
            return real.sum(1) / lengths.unsqueeze(1).to(states.dtype)
        if self.kind == "max":
            return states.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        scores = self.score(states).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)  # (B, T, 1)
        real = torch.where(mask.unsqueeze(-1), states, torch.zeros((), dtype=states.dtype, device=states.device))
        return (weights * real).sum(1)
