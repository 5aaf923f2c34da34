"""Are occlusion explanations faithful? Deleting a text's top word should cost its label more than a random word.

    python scripts/explain_faithfulness.py BUNDLE [--limit N] [--seed 0]

Over the movie-snippets test split, for each text the bundle classifies correctly: the drop in the probability of
its label when its top-contributing word is deleted, against the drop when a random word (seeded) is deleted.
Both drops are contributions of `nlprnn.deploy.explain`, i.e. p(label | text) - p(label | text without the word).
Needs the `train` extra (datasets) to read the split.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np

from nlprnn.data.sources import SourceSpec, load_splits
from nlprnn.deploy.explain import explain
from nlprnn.deploy.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle folder written by `python -m nlprnn.export`")
    parser.add_argument("--limit", type=int, default=None, help="use the first N test texts only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random word choice")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    options = parser.parse_args()

    test = load_splits(SourceSpec(dataset="movie-snippets"))["test"]
    if options.limit is not None:
        test = test.select(range(min(options.limit, len(test))))
    label_names = test.features["label"].names  # a ClassLabel, named by the training split
    predictor = Predictor(options.bundle, threads=options.threads)
    rng = random.Random(options.seed)
    top, rand = [], []
    texts, labels = test["text"], test["label"]
    for text, gold, explanation in zip(texts, labels, explain(predictor, texts)):
        # Words past max_length were never read (contribution 0): they are left out of both choices.
        offsets = predictor.tokenizer.encode(text).offsets
        read_end = offsets[-1][1] if offsets else 0
        read = [w.contribution for w in explanation.words if w.start < read_end]
        if explanation.label != label_names[gold] or not read:
            continue
        top.append(max(read))
        rand.append(rng.choice(read))
    result = {
        "texts": len(texts),
        "correct": len(top),
        "top_word_drop": float(np.mean(top)),
        "random_word_drop": float(np.mean(rand)),
        "seed": options.seed,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
