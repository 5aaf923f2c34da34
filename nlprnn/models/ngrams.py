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

BIGRAM_PRIME = 1_000_003  # mixes the first id into the hash; ids * prime stays far below 2**63


class NgramBag(nn.Module):
    def __init__(self, vocab_size: int, dim: int, buckets: int) -> None:
        """Rows 0..vocab_size-1 embed single tokens; the next `buckets` rows embed hashed token pairs."""
        super().__init__()
        self.vocab_size = vocab_size
        self.buckets = buckets
        self.table = nn.Embedding(vocab_size + buckets, dim)
        nn.init.normal_(self.table.weight, std=0.1)
        self.norm = nn.LayerNorm(dim)
        self.output_dim = dim

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, real tokens first, and (B,) lengths -> (B, dim): the layer-normed sum over real
        uni- and bigrams / sqrt(count).

        A plain mean of hundreds of n-grams shrinks toward zero and learns slowly; a sum over sqrt(count) keeps
        the scale of one embedding at the start but grows with a document's length as the embeddings learn
        to agree, which destabilised training on whole documents. The layer norm makes the bag's scale
        independent of a text's length.
        """
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)  # (1, T)
        real = positions < lengths.unsqueeze(1)  # (B, T)
        pairs = (input_ids[:, :-1] * BIGRAM_PRIME + input_ids[:, 1:]) % self.buckets + self.vocab_size  # (B, T-1)
        grams = torch.cat([input_ids, pairs], dim=1)  # (B, 2T-1)
        mask = torch.cat([real, real[:, 1:]], dim=1).unsqueeze(-1)  # a pair is real when its second token is
        total = (self.table(grams) * mask).sum(1)  # (B, dim); padding contributes exact zeros
        return self.norm(total / mask.sum(1).to(total.dtype).sqrt())  # lengths >= 1, so never a division by zero
