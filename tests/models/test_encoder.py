"""RNNEncoder (with pooling) is exact on padded batches.

Three independent oracles: textbook recurrences written below and run step by step in float64 on the
encoder's own weights; PyTorch's own multi-layer, bidirectional modules on packed sequences; and the
same sequence encoded alone, without any padding (hypothesis draws the lengths and batch mixes).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from conftest import CELLS, DIRECTIONS, POOLINGS, STACKS
from nlprnn.errors import UserError
from nlprnn.models.encoder import RNNEncoder
from nlprnn.models.pooling import Pooling

# In the residual STACKS, bidirectional layers are 2 * HIDDEN = INPUT wide, so their residual reaches the first layer too;
# one-way layers are narrower than the input, so only the upper layers add their input.
INPUT, HIDDEN = 8, 4
TOL = 1e-5
CUDA_TOL = 1e-4  # cuDNN sums float32 products in its own order: 1.3e-5 from the float64 reference was seen on an H200


# --- the textbook reference --------------------------------------------------------------------

# Which of a layer's recurrences read backwards, in the order the encoder lists them.
READS_BACKWARDS = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}


def recurrence(cell: str, rnn: nn.RNNBase, seq: torch.Tensor) -> torch.Tensor:
    """(L, D) inputs read first to last -> (L, H) states, one time step at a time from h_0 = c_0 = 0."""
    w_ih, w_hh = rnn.weight_ih_l0.double(), rnn.weight_hh_l0.double()
    b_ih, b_hh = rnn.bias_ih_l0.double(), rnn.bias_hh_l0.double()
    hidden = rnn.hidden_size
    h = torch.zeros(hidden, dtype=torch.float64)
    c = torch.zeros(hidden, dtype=torch.float64)
    states = []
    for x in seq.double():
        if cell == "rnn_tanh":  # Elman: h_t = tanh(W x_t + b_W + U h_{t-1} + b_U)
            h = torch.tanh(w_ih @ x + b_ih + w_hh @ h + b_hh)
        elif cell == "rnn_relu":
            h = torch.relu(w_ih @ x + b_ih + w_hh @ h + b_hh)
        elif cell == "lstm":  # PyTorch stacks the gate weights as input, forget, cell candidate, output
            w_ii, w_if, w_ig, w_io = w_ih.split(hidden)
            w_hi, w_hf, w_hg, w_ho = w_hh.split(hidden)
            b_ii, b_if, b_ig, b_io = b_ih.split(hidden)
            b_hi, b_hf, b_hg, b_ho = b_hh.split(hidden)
            i = torch.sigmoid(w_ii @ x + b_ii + w_hi @ h + b_hi)
            f = torch.sigmoid(w_if @ x + b_if + w_hf @ h + b_hf)
            g = torch.tanh(w_ig @ x + b_ig + w_hg @ h + b_hg)
            o = torch.sigmoid(w_io @ x + b_io + w_ho @ h + b_ho)
            c = f * c + i * g
            h = o * torch.tanh(c)
        elif cell == "gru":  # PyTorch stacks them as reset, update, candidate
            w_ir, w_iz, w_in = w_ih.split(hidden)
            w_hr, w_hz, w_hn = w_hh.split(hidden)
            b_ir, b_iz, b_in = b_ih.split(hidden)
            b_hr, b_hz, b_hn = b_hh.split(hidden)
            r = torch.sigmoid(w_ir @ x + b_ir + w_hr @ h + b_hr)
            z = torch.sigmoid(w_iz @ x + b_iz + w_hz @ h + b_hz)
            n = torch.tanh(w_in @ x + b_in + r * (w_hn @ h + b_hn))  # r gates the whole recurrent term
            h = (1 - z) * n + z * h
        else:
            raise AssertionError(cell)
        states.append(h)
    return torch.stack(states)


def encode(encoder: RNNEncoder, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One (L, D) sequence -> its (L, output_dim) states in reading order and its (output_dim,) `last`.

    A backward recurrence reads the sequence last token to first; its states are put back in token order.
    `last` is each direction's state after its final step: token L-1 read forwards, token 0 read backwards.
    Dropout is ignored: call this on an encoder in eval mode.
    """
    x = seq.double()
    backwards = READS_BACKWARDS[encoder.direction]
    for layer in encoder.layers:
        parts = [
            recurrence(encoder.cell, rnn, x.flip(0)).flip(0) if back else recurrence(encoder.cell, rnn, x)
            for rnn, back in zip(layer, backwards)
        ]
        y = torch.cat(parts, dim=-1)
        x = y + x if encoder.residual and y.shape == x.shape else y
    hidden = encoder.hidden_size
    last = torch.cat([x[0, i * hidden : (i + 1) * hidden] if back else x[-1, i * hidden : (i + 1) * hidden]
                      for i, back in enumerate(backwards)])
    return x, last


def pool(pooling: Pooling, states: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The pooled (D,) vector of one sequence's (L, D) states, all of them real."""
    if pooling.kind == "last":
        return last
    if pooling.kind == "mean":
        return states.mean(0)
    if pooling.kind == "max":
        return states.amax(0)
    scores = states @ pooling.score.weight.double().squeeze(0)  # (L,)
    return (torch.softmax(scores, dim=0).unsqueeze(-1) * states).sum(0)


# --- helpers -----------------------------------------------------------------------------------


@functools.cache
def model(cell: str, direction: str, pooling: str, stack: str) -> tuple[RNNEncoder, Pooling]:
    """A seeded encoder and pooling in eval mode; dropout is on, so eval mode must switch it off."""
    torch.manual_seed(0)
    encoder = RNNEncoder(INPUT, cell=cell, hidden_size=HIDDEN, direction=direction, dropout=0.5, **STACKS[stack])
    pool_layer = Pooling(pooling, encoder.output_dim)
    return encoder.eval(), pool_layer.eval()


def padded_batch(lengths: list[int], time: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, time, INPUT) random inputs with finite garbage (not zeros) after each row's real tokens, and (B,) lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), time, INPUT, generator=g)
    garbage = 5 * torch.randn(len(lengths), time, INPUT, generator=g) + 3
    real = torch.arange(time).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # (B, T)
    return torch.where(real.unsqueeze(-1), x, garbage), torch.tensor(lengths)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


combinations = pytest.mark.parametrize(
    "cell,direction,pooling,stack",
    [(c, d, p, s) for c in CELLS for d in DIRECTIONS for p in POOLINGS for s in STACKS],
)


# --- reference equations -----------------------------------------------------------------------


@combinations
def test_matches_textbook_equations(cell, direction, pooling, stack):
    encoder, pool_layer = model(cell, direction, pooling, stack)
    lengths = [5, 1, 3, 7]
    x, lens = padded_batch(lengths, time=12, seed=1)
    with torch.no_grad():
        out = encoder(x, lens)
        pooled = pool_layer(out, lens)
        for b, n in enumerate(lengths):
            states, last = encode(encoder, x[b, :n])
            assert max_diff(out.outputs[b, :n], states) <= TOL
            assert max_diff(out.last[b], last) <= TOL
            assert max_diff(pooled[b], pool(pool_layer, states, last)) <= TOL
            assert torch.all(out.outputs[b, n:] == 0)


# --- padding invariance (property-based) ----------------------------------------------------------


@st.composite
def batch_mixes(draw) -> tuple[list[int], int, int]:
    """Lengths of a batch (1 included), padding beyond the longest row, and a data seed."""
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=5))
    if draw(st.booleans()):
        lengths.append(1)
    return lengths, draw(st.integers(0, 40)), draw(st.integers(0, 2**16))


@combinations
@settings(max_examples=8, deadline=None)
@given(mix=batch_mixes())
def test_padding_never_changes_an_encoding(cell, direction, pooling, stack, mix):
    encoder, pool_layer = model(cell, direction, pooling, stack)
    lengths, extra, seed = mix
    time = max(lengths) + extra
    x, lens = padded_batch(lengths, time, seed)
    with torch.no_grad():
        out = encoder(x, lens)
        pooled = pool_layer(out, lens)
        for b, n in enumerate(lengths):
            alone = encoder(x[b : b + 1, :n], lens[b : b + 1])  # no padding at all
            assert max_diff(out.outputs[b, :n], alone.outputs[0]) <= TOL
            assert max_diff(out.last[b], alone.last[0]) <= TOL
            assert max_diff(pooled[b], pool_layer(alone, lens[b : b + 1])[0]) <= TOL
            assert torch.all(out.outputs[b, n:] == 0)


def growing_relu_encoder(direction: str, pooling: str) -> tuple[RNNEncoder, Pooling]:
    """A relu recurrence with gain 1.5: run on through 300 padding steps, its states pass float32's largest value."""
    torch.manual_seed(0)
    encoder = RNNEncoder(INPUT, cell="rnn_relu", hidden_size=HIDDEN, direction=direction, num_layers=2)
    with torch.no_grad():
        for layer in encoder.layers:
            for rnn in layer:
                rnn.weight_hh_l0.copy_(1.5 * torch.eye(HIDDEN))
                rnn.bias_hh_l0.fill_(0.1)
    return encoder.eval(), Pooling(pooling, encoder.output_dim).eval()


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_padding_that_overflows_a_relu_recurrence_changes_nothing(direction, pooling):
    encoder, pool_layer = growing_relu_encoder(direction, pooling)
    x, lens = padded_batch([3, 5], 300, seed=0)
    with torch.no_grad():
        out = encoder(x, lens)
        pooled = pool_layer(out, lens)
        for b, n in enumerate([3, 5]):
            alone = encoder(x[b : b + 1, :n], lens[b : b + 1])
            assert max_diff(pooled[b], pool_layer(alone, lens[b : b + 1])[0]) <= TOL
            assert torch.all(out.outputs[b, n:] == 0)


# --- PyTorch's own stacks on packed sequences -----------------------------------------------------

TORCH_CELLS = {
    "rnn_tanh": lambda **kw: nn.RNN(nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: nn.RNN(nonlinearity="relu", **kw),
    "lstm": nn.LSTM,
    "gru": nn.GRU,
}


def torch_twin(encoder: RNNEncoder) -> nn.RNNBase:
    """PyTorch's multi-layer module with the encoder's weights; a reverse encoder becomes a forward one."""
    twin = TORCH_CELLS[encoder.cell](
        input_size=INPUT, hidden_size=HIDDEN, num_layers=encoder.num_layers,
        bidirectional=encoder.direction == "bidirectional", batch_first=True,
    )
    with torch.no_grad():
        for depth, layer in enumerate(encoder.layers):
            for k, rnn in enumerate(layer):
                suffix = "_reverse" if k == 1 else ""
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(twin, f"{name}_l{depth}{suffix}").copy_(getattr(rnn, f"{name}_l0"))
    return twin


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("num_layers", [1, 3])
def test_matches_torch_on_packed_sequences(cell, direction, num_layers):
    """`last` is torch's h_n: forward at the last real token, backward (or reverse) after reading the first."""
    encoder = model(cell, direction, "last", "3-layer" if num_layers == 3 else "1-layer")[0]
    twin = torch_twin(encoder)
    lengths = [6, 1, 9, 4]
    x, lens = padded_batch(lengths, time=15, seed=2)
    if direction == "reverse":  # torch has no reverse-only module: hand it each row's real tokens flipped
        x_in = x.clone()
        for b, n in enumerate(lengths):
            x_in[b, :n] = x[b, :n].flip(0)
    else:
        x_in = x
    with torch.no_grad():
        packed, h_n = twin(pack_padded_sequence(x_in, lens, batch_first=True, enforce_sorted=False))
        expected, _ = pad_packed_sequence(packed, batch_first=True, total_length=15)  # zero at padding
        h_n = h_n[0] if cell == "lstm" else h_n  # (layers * directions, B, H)
        out = encoder(x, lens)
    if direction == "reverse":
        for b, n in enumerate(lengths):
            expected[b, :n] = expected[b, :n].flip(0)
    expected_last = torch.cat([h_n[-2], h_n[-1]], dim=-1) if direction == "bidirectional" else h_n[-1]
    assert max_diff(out.outputs, expected) <= TOL
    assert max_diff(out.last, expected_last) <= TOL


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_last_is_the_state_after_the_last_token_in_reading_order(direction):
    encoder = model("gru", direction, "last", "1-layer")[0]
    x, lens = padded_batch([5, 2], time=8, seed=3)
    with torch.no_grad():
        out = encoder(x, lens)
    forward_at_end = out.outputs[torch.arange(2), lens - 1, :HIDDEN]  # token length-1
    at_start = out.outputs[:, 0, -HIDDEN:]  # token 0
    expected = {
        "forward": forward_at_end,
        "reverse": at_start,
        "bidirectional": torch.cat([forward_at_end, at_start], dim=-1),
    }[direction]
    assert torch.equal(out.last, expected)


# --- dropout, residual connections, shapes --------------------------------------------------------


def test_dropout_acts_between_layers_and_only_in_training():
    torch.manual_seed(0)
    encoder = RNNEncoder(INPUT, cell="lstm", hidden_size=HIDDEN, num_layers=3, dropout=0.5)
    plain = RNNEncoder(INPUT, cell="lstm", hidden_size=HIDDEN, num_layers=3, dropout=0.0)
    plain.load_state_dict(encoder.state_dict())
    x, lens = padded_batch([4, 7], time=7, seed=4)
    expected = plain(x, lens).outputs
    assert torch.equal(encoder.eval()(x, lens).outputs, expected)
    encoder.train()
    first, second = encoder(x, lens).outputs, encoder(x, lens).outputs
    assert max_diff(first, expected) > 1e-3 and max_diff(first, second) > 1e-3
    # one layer has nothing between layers to drop
    torch.manual_seed(0)
    single = RNNEncoder(INPUT, cell="lstm", hidden_size=HIDDEN, num_layers=1, dropout=0.5).train()
    assert torch.equal(single(x, lens).outputs, single.eval()(x, lens).outputs)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_residual_adds_the_input_where_widths_match(direction):
    hidden = INPUT // 2 if direction == "bidirectional" else INPUT  # output_dim == INPUT
    torch.manual_seed(0)
    residual = RNNEncoder(INPUT, cell="gru", hidden_size=hidden, num_layers=1, direction=direction, residual=True)
    plain = RNNEncoder(INPUT, cell="gru", hidden_size=hidden, num_layers=1, direction=direction)
    plain.load_state_dict(residual.state_dict())
    x, lens = padded_batch([3, 6], time=9, seed=5)
    mask = (torch.arange(9).unsqueeze(0) < lens.unsqueeze(1)).unsqueeze(-1)
    with torch.no_grad():
        assert max_diff(residual(x, lens).outputs, plain(x, lens).outputs + x * mask) <= TOL


def test_residual_skips_layers_whose_widths_differ():
    torch.manual_seed(0)
    residual = RNNEncoder(INPUT, cell="gru", hidden_size=HIDDEN, num_layers=1, direction="forward", residual=True)
    plain = RNNEncoder(INPUT, cell="gru", hidden_size=HIDDEN, num_layers=1, direction="forward")
    plain.load_state_dict(residual.state_dict())
    x, lens = padded_batch([3, 6], time=9, seed=5)
    assert torch.equal(residual(x, lens).outputs, plain(x, lens).outputs)


@pytest.mark.parametrize("direction,width", [("forward", HIDDEN), ("reverse", HIDDEN), ("bidirectional", 2 * HIDDEN)])
def test_output_dim_sizes_every_output(direction, width):
    encoder = RNNEncoder(INPUT, cell="lstm", hidden_size=HIDDEN, num_layers=2, direction=direction)
    out = encoder(*padded_batch([2, 5], time=5, seed=6))
    assert encoder.output_dim == width
    assert out.outputs.shape == (2, 5, width) and out.last.shape == (2, width)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_layers=0), "model.encoder.num_layers is a number of stacked layers, at least 1: got 0"),
        (dict(direction="sideways"), "model.encoder.direction 'sideways' is unknown"),
        (dict(cell="transformer"), "model.encoder.cell 'transformer' is unknown"),
        (dict(hidden_size=0), "model.encoder.hidden_size is a state width, at least 1: got 0"),
        (dict(dropout=1.0), r"model.encoder.dropout is a probability in \[0, 1\): got 1.0"),
        (dict(dropout=-0.1), r"model.encoder.dropout is a probability in \[0, 1\): got -0.1"),
    ],
)
def test_rejects_an_impossible_encoder_in_one_line(kwargs, message):
    with pytest.raises(UserError, match=message):
        RNNEncoder(INPUT, **kwargs)


def test_recurrence_stays_float32_under_cpu_autocast():
    encoder = model("lstm", "bidirectional", "last", "3-layer")[0]
    x, lens = padded_batch([4, 2], time=6, seed=7)
    with torch.no_grad():
        expected = encoder(x, lens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = encoder(x, lens)
    assert got.outputs.dtype == torch.float32
    assert max_diff(got.outputs, expected.outputs) <= TOL


# --- on a CUDA device: the same answers, cuDNN on or off -------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cudnn", [True, False])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cuda_matches_textbook_equations_and_ignores_padding(cell, direction, cudnn):
    encoder, pool_layer = model(cell, direction, "max", "3-layer-residual")
    encoder_gpu, pool_gpu = copy.deepcopy(encoder).cuda(), copy.deepcopy(pool_layer).cuda()
    lengths = [5, 1, 3, 7]
    x, lens = padded_batch(lengths, time=12, seed=4)
    x_gpu, lens_gpu = x.cuda(), lens.cuda()
    # TF32 would round float32 products to 10-bit mantissas, far beyond CUDA_TOL: the check is of the recurrence
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=cudnn, allow_tf32=False):
        out = encoder_gpu(x_gpu, lens_gpu)
        pooled = pool_gpu(out, lens_gpu)
        for b, n in enumerate(lengths):
            states, last = encode(encoder, x[b, :n])
            alone = encoder_gpu(x_gpu[b : b + 1, :n], lens_gpu[b : b + 1])  # no padding at all
            assert max_diff(out.outputs[b, :n].cpu(), states) <= CUDA_TOL
            assert max_diff(out.last[b].cpu(), last) <= CUDA_TOL
            assert max_diff(out.outputs[b, :n], alone.outputs[0]) <= CUDA_TOL
            assert max_diff(pooled[b], pool_gpu(alone, lens_gpu[b : b + 1])[0]) <= CUDA_TOL
            assert torch.all(out.outputs[b, n:] == 0)
