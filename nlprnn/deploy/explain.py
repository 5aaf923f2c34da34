"""Word-level explanations by occlusion: how much each word moves the probability of the predicted label.

For a text, each word of the original text (as the tokenizer's pre-tokenizer splits it: words and runs of
punctuation; the pieces a character is expanded into by the normaliser, as NFKC reads ½ as 1⁄2, are one word) is
deleted in turn, and its contribution is p(label | text) - p(label | text without the word),
where label is the prediction for the whole text. Positive: the word speaks for the label; negative: against it.

A word is deleted rather than replaced by the unknown token: [UNK] is itself evidence to the model (it stands for
every rare word of the training data, and those lean towards some labels), so a replacement would measure
"this word versus a rare word" rather than "this word versus nothing". A text left with no token is read as one
[UNK], as the Predictor reads an empty text.

The text and its variants go to the model the Predictor's batch_size rows per call, so memory is bounded by
batch_size x max_length tokens, not by the square of max_length. Only the words
the model reads are explained: words past the bundle's max_length are left out of the result (a word cut by it is
kept, with its whole span), so the work and the size of an explanation are bounded by max_length however long the
text. A variant is the tokens that
were read less the word's, so no unread word slides into the window in its place and each contribution is about
that word alone. Runs on onnxruntime, tokenizers and numpy, like the Predictor.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from nlprnn.deploy.inputs import clean_text, clean_texts

if TYPE_CHECKING:
    from tokenizers import Encoding

    from nlprnn.deploy.predictor import Predictor


@dataclass(frozen=True)
class WordContribution:
    """One word of the text: text[start:end] == word, and what deleting it takes from the label's probability."""

    word: str
    start: int
    end: int
    contribution: float


@dataclass(frozen=True)
class Explanation:
    """A text's predicted label, the probability of every label, and the contribution of each word read, in order."""

    label: str
    probabilities: dict[str, float]
    words: list[WordContribution]

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "probabilities": self.probabilities,
            "explanation": [
                {"word": w.word, "start": w.start, "end": w.end, "contribution": w.contribution} for w in self.words
            ],
        }


@dataclass(frozen=True)
class _Word:
    start: int
    end: int
    positions: list[int]  # indices of its tokens among the tokens the model reads


def explain(predictor: Predictor, texts: Sequence[str]) -> list[Explanation]:
    """Explain each text's prediction word by word (the text and one variant per word, batch_size rows a call)."""
    return [_explain_one(predictor, text) for text in clean_texts(texts)]


def _explain_one(predictor: Predictor, text: str) -> Explanation:
    encoding = predictor.tokenizer.encode(text)  # truncated to max_length; the rest is in .overflowing
    ids = list(encoding.ids)
    words = _words(encoding)
    rows = [ids or [predictor.unk_id]]
    for word in words:
        drop = set(word.positions)
        rows.append([t for i, t in enumerate(ids) if i not in drop] or [predictor.unk_id])
    step = predictor.batch_size
    probabilities = np.concatenate([predictor.run(*predictor.pad(rows[i : i + step]))[1]
                                    for i in range(0, len(rows), step)])  # (1 + words read, classes)
    full = probabilities[0]
    k = int(full.argmax())
    drops = float(full[k]) - probabilities[1:, k].astype(np.float64)
    return Explanation(
        label=predictor.labels[k],
        probabilities={label: float(p) for label, p in zip(predictor.labels, full)},
        words=[WordContribution(text[w.start : w.end], w.start, w.end, float(d)) for w, d in zip(words, drops)],
    )


def _words(encoding: Encoding) -> list[_Word]:
    """The words the model reads, in order, with the positions of their tokens among those it reads.

    A word's span runs from its first token's start to its last token's end, in characters of the original text.
    Words past max_length are left out, so that the result grows with max_length, not with the text.
    """
    spans: dict[int, list[int]] = {}  # word id -> [start, end]
    positions: dict[int, list[int]] = {}
    for position, (word_id, (start, end)) in enumerate(zip(encoding.word_ids, encoding.offsets)):
        if word_id is None:  # a special token added by a post-processor; no word of the text
            continue
        span = spans.setdefault(word_id, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
        positions.setdefault(word_id, []).append(position)
    # A word cut by max_length goes on at the start of the tokens past it (overflowing, same word ids): its span
    # takes them in. The first token of a word not read ends the walk, so it stays short however long the text.
    past = (
        (word_id, end)
        for part in encoding.overflowing
        for word_id, (_, end) in zip(part.word_ids, part.offsets)
        if word_id is not None
    )
    for word_id, end in past:
        if word_id not in spans:
            break
        spans[word_id][1] = max(spans[word_id][1], end)
    return _merged([_Word(spans[i][0], spans[i][1], positions[i]) for i in sorted(spans, key=lambda i: spans[i][0])])


def _merged(words: list[_Word]) -> list[_Word]:
    """`words` (sorted by start) with those whose characters overlap made one word with all their tokens.

    The normaliser may expand one character into several words (NFKC reads ½ as 1⁄2), each pointing at that same
    character; deleting only some of them would leave the character half read, and the text would be shown twice.
    """
    merged: list[_Word] = []
    for word in words:
        if merged and word.start < merged[-1].end:
            last = merged.pop()
            word = _Word(last.start, max(last.end, word.end), sorted(last.positions + word.positions))
        merged.append(word)
    return merged


def html_head() -> str:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>nlprnn explanations</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}section{margin-bottom:1.5em}"
        ".text{line-height:1.8;white-space:pre-wrap}.text span{border-radius:3px;padding:0 1px}"
        "</style></head><body>\n"
    )


def html_tail() -> str:
    return "</body></html>\n"


def html_section(text: str, explanation: Explanation) -> str:
    """One text: its label and probabilities, then the text with each word shaded by its contribution.

    Shades are scaled to the text's largest contribution, so the strongest word is fully coloured; the exact
    value is in each word's tooltip.
    """
    text = clean_text(text)
    scale = max((abs(w.contribution) for w in explanation.words), default=0.0) or 1.0
    pieces, cursor = [], 0
    for w in explanation.words:
        start = max(w.start, cursor)  # words built elsewhere may overlap: no character is shown twice
        pieces.append(html.escape(text[cursor:start]))
        alpha = abs(w.contribution) / scale
        rgb = "0,160,0" if w.contribution >= 0 else "220,0,0"
        pieces.append(
            f'<span style="background:rgba({rgb},{alpha:.3f})" title="{w.contribution:+.4f}">'
            f"{html.escape(text[start : w.end])}</span>"
        )
        cursor = max(w.end, cursor)
    pieces.append(html.escape(text[cursor:]))
    probabilities = ", ".join(f"{html.escape(label)} {p:.3f}" for label, p in explanation.probabilities.items())
    return (
        f"<section><p><b>{html.escape(explanation.label)}</b> ({probabilities})</p>"
        f"<div class=\"text\">{''.join(pieces)}</div></section>\n"
    )
