"""NgramBag: the pooled embedding of a text's words and word pairs, the wide part beside the recurrent encoder.

A bag of n-grams is what a linear baseline (TF-IDF + logistic regression) sees, and what fastText
(Joulin et al., EACL 2017) averages; beside a recurrent encoder it gives a wide-and-deep model (Cheng
et al., 2016): the bag carries topical words and pairs whatever the text's length, the recurrence
carries order. Bigrams are hashed from the two token ids inside the model, so the tokenizer, the
bundle and the Predictor are unchanged, and the graph exports to ONNX as integer arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from nlprnn.errors import UserError

# A pair (a, b) of token ids goes to row (a * multiplier + b) % buckets: fastText's word n-gram multiplier,
# which fills about as many rows as a random hash would for any bucket count (measured on bbc-news and
# movie-snippets from 100,003 to 2,000,003 buckets). ids * multiplier stays far below 2**63.
PAIR_MULTIPLIER = 116_049_371
# Checkpoints written before the multiplier was saved in them used 1,000,003, which is -12 modulo 200,003 and
# 0 modulo 1,000,003: pairs (a, b) and (a + 1, b + 12) shared a row, so on bbc-news the word pairs filled 65%
# of the rows a random hash fills at 200,003 buckets (9% at 1,000,003).
LEGACY_PAIR_MULTIPLIER = 1_000_003


class NgramBag(nn.Module):
    def __init__(self, vocab_size: int, dim: int, buckets: int, distinct: bool = False, dropout: float = 0.0) -> None:
        """Rows 0..vocab_size-1 embed single tokens; the next `buckets` rows embed hashed token pairs.

        distinct: count each n-gram once per text however often it occurs (a set rather than a bag), so a
            document's common words and pairs do not outweigh its rarer topical ones; found by sorting, which
            exports to ONNX as TopK.
        dropout: while training, leave out each of a text's n-grams with this probability (word dropout, as in
            Iyyer et al., ACL 2015), so the bag cannot lean on a few n-grams that identify a training text.
        """
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"the n-gram bag's dropout must be in [0, 1), got {dropout}")
        self.vocab_size = vocab_size
        self.buckets = buckets
        self.distinct = distinct
        self.dropout = dropout
        self.table = nn.Embedding(vocab_size + buckets, dim)
        # saved with the weights, so a checkpoint's rows are always read with the hash they were trained with
        self.register_buffer("pair_multiplier", torch.tensor(PAIR_MULTIPLIER, dtype=torch.int64))
        nn.init.normal_(self.table.weight, std=0.1)
        self.norm = nn.LayerNorm(dim)
        self.output_dim = dim

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, real tokens first, and (B,) lengths -> (B, dim): the layer-normed sum over real
        uni- and bigrams (each distinct one once, for a distinct bag; while training, those dropout keeps) /
        sqrt(their count).

        A plain mean of hundreds of n-grams shrinks toward zero and learns slowly; a sum over sqrt(count) keeps
        the scale of one embedding at the start but grows with a document's length as the embeddings learn
        to agree, which destabilised training on whole documents. The layer norm makes the bag's scale
        independent of a text's length.
        """
        grams, mask = word_grams(input_ids, lengths, self.vocab_size, self.buckets, self.pair_multiplier)
        if self.distinct:
            grams, mask = first_occurrences(grams, mask, self.vocab_size + self.buckets)
        mask = mask.unsqueeze(-1)  # (B, 2T-1, 1)
        if self.training and self.dropout:
            mask = mask & (torch.rand(mask.shape, device=mask.device) >= self.dropout)
        total = (self.table(grams) * mask).sum(1)  # (B, dim); padding contributes exact zeros
        # a text has at least one real n-gram; only dropout can leave none, and then the sum is 0
        return self.norm(total / mask.sum(1).clamp_min(1).to(total.dtype).sqrt())


def word_grams(input_ids: torch.Tensor, lengths: torch.Tensor, vocab_size: int, buckets: int,
               multiplier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids, real tokens first, and (B,) lengths -> (B, 2T-1) rows and the mask of the real ones.

    Rows 0..vocab_size-1 are the tokens themselves; row vocab_size + (a * multiplier + b) % buckets is the pair
    (a, b) of adjacent tokens. A pair is real when its second token is.
    """
    input_ids = input_ids.long()  # int32 ids times the multiplier would wrap around in 32 bits
    positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)  # (1, T)
    real = positions < lengths.unsqueeze(1)  # (B, T)
    pairs = (input_ids[:, :-1] * multiplier + input_ids[:, 1:]) % buckets + vocab_size
    return torch.cat([input_ids, pairs], dim=1), torch.cat([real, real[:, 1:]], dim=1)


def first_occurrences(grams: torch.Tensor, real: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A text's n-grams sorted (B, N), and the mask of the first of each run of equal ones among the real ones.

    Sorting exports to ONNX as TopK. `rows` is above every n-gram: padding sorts after the real ones.
    """
    grams = grams.masked_fill(~real, rows).sort(dim=1).values
    new = torch.cat([torch.ones_like(grams[:, :1], dtype=torch.bool), grams[:, 1:] != grams[:, :-1]], dim=1)
    return grams.clamp(max=rows - 1), new & (grams < rows)
