"""TextClassifier: every parameter learns, a small batch can be memorised, padding ids are never read."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import CELLS, DIRECTIONS, POOLINGS, STACKS
from nlprnn.errors import UserError
from nlprnn.models.classifier import TextClassifier
from nlprnn.models.encoder import RNNEncoder

VOCAB, CLASSES, PAD = 40, 3, 0


def classifier(cell: str, direction: str, pooling: str, hidden: int = 6, seed: int = 0, **encoder) -> TextClassifier:
    torch.manual_seed(seed)
    return TextClassifier(
        vocab_size=VOCAB, num_classes=CLASSES, pad_id=PAD, embedding_dim=2 * hidden if encoder.get("residual") else 8,
        encoder=functools.partial(RNNEncoder, cell=cell, hidden_size=hidden, direction=direction, **encoder),
        pooling=pooling,
    )


def token_batch(lengths: list[int], seed: int = 0, time: int | None = None) -> dict[str, torch.Tensor]:
    """Random real token ids (never the padding id) padded with PAD after each row's length; random labels."""
    g = torch.Generator().manual_seed(seed)
    time = time or max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), time), generator=g)
    lens = torch.tensor(lengths)
    ids = ids.masked_fill(torch.arange(time).unsqueeze(0) >= lens.unsqueeze(1), PAD)
    return {"input_ids": ids, "lengths": lens, "labels": torch.randint(0, CLASSES, (len(lengths),), generator=g)}


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_reach_every_parameter(cell, direction, pooling, stack):
    model = classifier(cell, direction, pooling, **STACKS[stack])
    batch = token_batch([5, 1, 8, 3], time=12)
    logits = model(batch["input_ids"], batch["lengths"])
    model.loss(logits, batch["labels"]).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, f"{name} gets no gradient"
    assert torch.all(model.embedding.weight.grad[PAD] == 0)  # the padding row stays put


def memorise(model: TextClassifier, batch: dict[str, torch.Tensor], max_steps: int = 400) -> float:
    """Train on one batch until every example is right; the final training accuracy."""
    optimizer = model.configure_optimizers()
    model.train()
    accuracy = 0.0
    for _ in range(max_steps):
        logits = model(batch["input_ids"], batch["lengths"])
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().item()
        if accuracy == 1.0:
            break
        optimizer.zero_grad()
        model.loss(logits, batch["labels"]).backward()
        optimizer.step()
    return accuracy


OVERFIT_CASES = [  # every cell x direction, each pooling three times; then a deep residual GRU and a stacked BiLSTM
    pytest.param(c, d, POOLINGS[(i + j) % 4], {}, id=f"{c}-{d}-{POOLINGS[(i + j) % 4]}")
    for i, c in enumerate(CELLS)
    for j, d in enumerate(DIRECTIONS)
] + [
    pytest.param("gru", "forward", "last", dict(num_layers=4, residual=True), id="gru-4-layer-residual"),
    pytest.param("lstm", "bidirectional", "last", dict(num_layers=2), id="lstm-2-layer-bidirectional"),
]


@pytest.mark.parametrize("cell,direction,pooling,encoder", OVERFIT_CASES)
def test_overfits_one_small_batch(cell, direction, pooling, encoder):
    model = classifier(cell, direction, pooling, hidden=16, **encoder)
    model.hparams.lr = 1e-2
    batch = token_batch([3, 9, 1, 6, 12, 4, 7, 2, 10, 5, 8, 11, 6, 3, 9, 2], seed=1)
    assert memorise(model, batch) == 1.0
    model.eval()  # and it still holds without dropout noise, on the padded batch
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"], batch["lengths"]).argmax(-1), batch["labels"])


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_whatever_sits_in_padding_changes_no_logit(direction, pooling):
    model = classifier(CELLS[POOLINGS.index(pooling)], direction, pooling, num_layers=2).eval()
    batch = token_batch([4, 1, 7], time=20)
    noisy = batch["input_ids"].clone()
    padding = noisy == PAD
    noisy[padding] = torch.randint(1, VOCAB, (int(padding.sum()),))  # real tokens where padding was
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["lengths"])
        assert logits.shape == (3, CLASSES)
        torch.testing.assert_close(model(noisy, batch["lengths"]), logits, rtol=0, atol=1e-5)
        for b, n in enumerate(batch["lengths"].tolist()):
            alone = model(batch["input_ids"][b : b + 1, :n], batch["lengths"][b : b + 1])
            torch.testing.assert_close(alone[0], logits[b], rtol=0, atol=1e-5)


@pytest.mark.parametrize("direction,width", [("forward", 6), ("reverse", 6), ("bidirectional", 12)])
def test_head_sizes_itself_from_the_encoder(direction, width):
    model = classifier("gru", direction, "attention")
    assert model.head[-1].in_features == width and model.head[-1].out_features == CLASSES


def test_learning_rate_warms_up_then_decays_along_a_cosine():
    model = classifier("gru", "forward", "last")
    model.hparams.update(lr=1e-2, warmup_steps=10, lr_decay=True)
    model.trainer = SimpleNamespace(estimated_stepping_batches=110)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(110):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-3) and rates[9] == pytest.approx(1e-2)  # linear from lr / warmup_steps
    assert all(a < b for a, b in zip(rates[:9], rates[1:10]))
    assert rates[60] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 50 / 100)))
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 1e-4


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])  # of the gradients' norm: clipped, at the edge, left alone
def test_gradient_clipping_matches_clip_grad_norm_to_the_bit(scale):
    model = classifier("lstm", "bidirectional", "max")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # clipping reads only its parameter groups
    batch = token_batch([5, 3, 1])
    model.loss(model(batch["input_ids"], batch["lengths"]), batch["labels"]).backward()
    limit = scale * float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    before = [p.grad.clone() for p in model.parameters()]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for copy, grad in zip(copies, before):
        copy.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_(copies, limit)
    # at the edge too, clip_grad_norm_ scales by limit / (norm + 1e-6), just below 1
    assert any(not torch.equal(c.grad, g) for c, g in zip(copies, before)) == (scale <= 1)

    model.configure_gradient_clipping(optimizer, limit, "norm")
    assert all(torch.equal(p.grad, copy.grad) for p, copy in zip(model.parameters(), copies))


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(dropout=1.5), r"model.dropout is a probability in \[0, 1\): got 1.5"),
        (dict(embedding_dropout=-0.1), r"model.embedding_dropout is a probability in \[0, 1\): got -0.1"),
        (dict(ngram_dropout=1.0), r"model.ngram_dropout is a probability in \[0, 1\): got 1.0"),
        (dict(label_smoothing=1.0), r"model.label_smoothing is a probability in \[0, 1\): got 1.0"),
        (dict(embedding_dim=0), "model.embedding_dim must be at least 1: got 0"),
        (dict(ngram_buckets=0), "model.ngram_buckets must be at least 1: got 0"),
        (dict(recurrent_length=-5), "model.recurrent_length must be at least 1: got -5"),
        (dict(ngram_dim=-1), r"model.ngram_dim is a width, 0 \(no n-gram bag\) or more: got -1"),
        (dict(lr=-0.001), "model.lr is a learning rate, 0 or more: got -0.001"),
        (dict(weight_decay=-1.0), "model.weight_decay must be a finite number, 0 or more: got -1.0"),
        (dict(ngram_lr_scale=-1.0), "model.ngram_lr_scale must be a finite number, 0 or more: got -1.0"),
        (dict(branch_loss=math.nan), "model.branch_loss must be a finite number, 0 or more: got nan"),
        (dict(warmup_steps=-1), "model.warmup_steps is a number of optimizer steps, 0 or more: got -1"),
        (dict(class_weights="weird"), "model.class_weights is balanced or null: got 'weird'"),
        (dict(pooling="sum"), "model.pooling 'sum' is unknown; use last, mean, max or attention"),
    ],
)
def test_an_impossible_setting_is_one_line_naming_its_option(setting, message):
    with pytest.raises(UserError, match=message):
        TextClassifier(vocab_size=10, num_classes=2, **setting)
