"""Train, load and save Hugging Face `tokenizers` tokenizers.

A tokenizer is trained on the training split only, so nothing of validation or test leaks into the
vocabulary. Id 0 is padding and id 1 stands for unknown words, whatever the kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from nlprnn.errors import UserError

PAD, UNK = "[PAD]", "[UNK]"
SPECIAL_TOKENS = [PAD, UNK]
TokenizerKind = Literal["wordlevel", "wordpiece", "bpe", "unigram"]


@dataclass(frozen=True)
class TokenizerConfig:
    """How to build the tokenizer.

    Args:
        kind: wordlevel (whole words), wordpiece, bpe or unigram (subwords).
        vocab_size: the most tokens the vocabulary may hold, special tokens included.
        min_frequency: a word seen fewer times in training becomes unknown.
        lowercase: fold case before splitting into tokens.
        file: an existing tokenizer.json to use as it is instead of training one.
    """

    kind: TokenizerKind = "wordlevel"
    vocab_size: int = 20000
    min_frequency: int = 1
    lowercase: bool = True
    file: str | None = None


def _untrained(config: TokenizerConfig) -> tuple[Tokenizer, trainers.Trainer]:
    options = dict(vocab_size=config.vocab_size, special_tokens=SPECIAL_TOKENS)
    if config.kind == "wordlevel":
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(min_frequency=config.min_frequency, **options)
    elif config.kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
        trainer = trainers.WordPieceTrainer(min_frequency=config.min_frequency, **options)
        tokenizer.decoder = decoders.WordPiece()
    elif config.kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(min_frequency=config.min_frequency, **options)
    elif config.kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(unk_token=UNK, **options)
    else:
        raise UserError(f"unknown tokenizer kind {config.kind!r}; use wordlevel, wordpiece, bpe or unigram")
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if config.lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    return tokenizer, trainer


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    """A tokenizer trained on `texts`, or the one in `config.file`."""
    if config.file:
        return load_tokenizer(Path(config.file))
    tokenizer, trainer = _untrained(config)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise UserError(f"{path} is not a tokenizer.json ({err})") from None
    if tokenizer.token_to_id(PAD) is None:
        raise UserError(f"{path} has no {PAD} token; nlprnn pads with it")
    return tokenizer


def batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
