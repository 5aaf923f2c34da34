"""Pooling reads real tokens only, whatever the padding holds."""

from __future__ import annotations

import pytest
import torch

from nlprnn.errors import UserError
from nlprnn.models.encoder import EncoderOutput
from nlprnn.models.pooling import Pooling

LENGTHS = torch.tensor([4, 1, 6])
TIME, DIM = 9, 5


def states_with_garbage_padding(seed: int = 0, shift: float = 0.0) -> EncoderOutput:
    """(3, 9, 5) states whose padding holds large values a careless pooling would pick up."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(len(LENGTHS), TIME, DIM, generator=g) + shift
    padding = torch.arange(TIME).unsqueeze(0) >= LENGTHS.unsqueeze(1)  # (B, T)
    states = states.masked_fill(padding.unsqueeze(-1), 1e3)
    return EncoderOutput(states, last=torch.randn(len(LENGTHS), DIM, generator=g))


def real(encoded: EncoderOutput, b: int) -> torch.Tensor:
    return encoded.outputs[b, : LENGTHS[b]]  # (L, D)


def test_last_is_the_encoders_last_state():
    encoded = states_with_garbage_padding()
    assert torch.equal(Pooling("last", DIM)(encoded, LENGTHS), encoded.last)


def test_mean_averages_real_tokens_only():
    encoded = states_with_garbage_padding()
    pooled = Pooling("mean", DIM)(encoded, LENGTHS)
    for b in range(len(LENGTHS)):
        torch.testing.assert_close(pooled[b], real(encoded, b).mean(0))


def test_max_ignores_padding_even_below_zero():
    # all real states negative: a max that let zero (or any) padding in would return it
    encoded = states_with_garbage_padding(shift=-10.0)
    encoded = EncoderOutput(encoded.outputs.clamp(max=-1.0), encoded.last)
    pooled = Pooling("max", DIM)(encoded, LENGTHS)
    for b in range(len(LENGTHS)):
        assert torch.equal(pooled[b], real(encoded, b).amax(0))
    assert torch.all(pooled <= -1.0)


def test_attention_is_a_softmax_over_real_tokens():
    torch.manual_seed(0)
    pooling = Pooling("attention", DIM)
    encoded = states_with_garbage_padding()
    pooled = pooling(encoded, LENGTHS)
    for b in range(len(LENGTHS)):
        states = real(encoded, b)
        weights = torch.softmax(states @ pooling.score.weight.squeeze(0), dim=0)  # (L,)
        torch.testing.assert_close(pooled[b], weights @ states)


@pytest.mark.parametrize("kind", ["mean", "max", "attention"])
def test_one_token_pools_to_itself(kind):
    encoded = states_with_garbage_padding()
    pooled = Pooling(kind, DIM)(encoded, LENGTHS)
    torch.testing.assert_close(pooled[1], encoded.outputs[1, 0])  # LENGTHS[1] == 1


@pytest.mark.parametrize("kind", ["mean", "max", "attention"])
def test_changing_padding_changes_nothing(kind):
    torch.manual_seed(0)
    pooling = Pooling(kind, DIM)
    a = states_with_garbage_padding(seed=1)
    b = EncoderOutput(a.outputs.clone(), a.last)
    b.outputs[0, 4:] = -7.0
    b.outputs[1, 1:] = 0.0
    assert torch.equal(pooling(a, LENGTHS), pooling(b, LENGTHS))


def test_every_attention_parameter_learns():
    pooling = Pooling("attention", DIM)
    encoded = states_with_garbage_padding()
    pooling(encoded, LENGTHS).pow(2).sum().backward()
    for name, parameter in pooling.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 1e-4, name


@pytest.mark.parametrize("kind", ["last", "mean", "max"])
def test_parameter_free_poolings_have_no_parameters(kind):
    assert not list(Pooling(kind, DIM).parameters())


def test_rejects_an_unknown_kind():
    with pytest.raises(UserError, match="^model.pooling 'median' is unknown; use last, mean, max or attention$"):
        Pooling("median", DIM)
