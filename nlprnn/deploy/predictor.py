"""Predictor: raw texts -> labels and probabilities with a bundle, on onnxruntime, tokenizers and numpy."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import onnxruntime as ort

from nlprnn.data.tokenizer import load_tokenizer
from nlprnn.deploy.bundle import INPUT_NAMES, OUTPUT_NAMES, Bundle, read_bundle
from nlprnn.deploy.inputs import clean_texts
from nlprnn.errors import UserError, first_line
from nlprnn.padding import pad_rows
from nlprnn.threads import available_cores

if TYPE_CHECKING:  # the explainer imports this module, so it is imported where it is used
    from nlprnn.deploy.explain import Explanation

Prediction = tuple[str, dict[str, float]]  # (label, {label: probability})


class Scores(NamedTuple):
    logits: np.ndarray  # (N, classes) float32
    probabilities: np.ndarray  # (N, classes) float32


def make_session(model_file: Path, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session with `threads` threads inside each operator and none across them.

    The graph is one chain of recurrences, so inter-op threads would only wait; intra-op threads
    split each step's matrix products.
    """
    if threads is not None and threads < 1:
        raise UserError(f"threads must be at least 1, not {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about harmless shape-inference merges
    try:
        return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        raise UserError(f"{model_file} is not a loadable ONNX model ({first_line(err)}); export the bundle again") from None


class Predictor:
    def __init__(
        self, bundle: str | Path, batch_size: int = 64, threads: int | None = None, parallel_calls: bool = False
    ) -> None:
        """Classify raw texts with the bundle in folder `bundle`.

        Texts are tokenized as in training and cut to the bundle's max_length tokens. A text with no
        tokens at all (empty, or only whitespace) is read as a single unknown-word token ([UNK]), so it
        gets a prediction like any other text rather than an error; such a prediction carries no
        information and is usually near the label prior. Characters that are not valid Unicode are
        replaced by U+FFFD.

        Args:
            bundle: a folder written by `python -m nlprnn.export`.
            batch_size: texts per model call; texts of similar length are batched together.
            threads: the cores the model uses; default: the cores this process may use (its CPU affinity,
                one per physical core, capped by a cgroup CPU quota). They split each operator's matrix
                products (onnxruntime's intra-op threads), unless `parallel_calls`.
            parallel_calls: run up to `threads` model calls at once, each on one thread, rather than each
                call on all of them. A server's batch is a few small calls, whose matrix products are too
                small to split well: on 2 cores, 64 texts in calls of 8 run at 8,304 texts/s this way against
                5,192 (scripts/bench_batching.py). A single call gets one core.
        """
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, not {batch_size}")
        self.bundle: Bundle = read_bundle(bundle)
        self.labels = self.bundle.labels
        self.max_length = self.bundle.manifest.max_length
        self.pad_id = self.bundle.manifest.pad_id
        self.unk_id = self.bundle.manifest.unk_id
        self.temperature = float(self.bundle.manifest.temperature)
        self.batch_size = batch_size
        try:
            self.tokenizer = load_tokenizer(self.bundle.tokenizer_file)
        except UserError as err:
            raise UserError(f"{err}; export the bundle again") from None
        self.tokenizer.no_padding()  # batches are padded here, to their own longest text
        self.tokenizer.enable_truncation(self.max_length)
        calls = (threads if threads is not None else available_cores()) if parallel_calls else 1
        # onnxruntime's sessions may be run from several threads at once; one thread each runs on its caller.
        self.session = make_session(self.bundle.model_file, 1 if calls > 1 else threads)
        self._calls = ThreadPoolExecutor(calls, thread_name_prefix="nlprnn-call") if calls > 1 else None
        _check_signature(self.session, self.bundle)

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """For each text, its most probable label and the probability of every label."""
        probabilities = self.score(texts).probabilities
        return [
            (self.labels[int(row.argmax())], {label: float(p) for label, p in zip(self.labels, row)})
            for row in probabilities
        ]

    def score(self, texts: Sequence[str]) -> Scores:
        """Logits and probabilities (N, classes) of `texts`, in their order."""
        ids = self.encode(texts)
        classes = len(self.labels)
        logits = np.empty((len(ids), classes), dtype=np.float32)
        probabilities = np.empty((len(ids), classes), dtype=np.float32)
        # Sorting by length puts texts of similar length in one batch, so little padding is computed.
        order = np.argsort([len(row) for row in ids], kind="stable")
        calls = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

        def call(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return self.run(*self.pad([ids[i] for i in rows]))

        results = self._calls.map(call, calls) if self._calls is not None and len(calls) > 1 else map(call, calls)
        for rows, (call_logits, call_probabilities) in zip(calls, results):
            logits[rows], probabilities[rows] = call_logits, call_probabilities
        return Scores(logits, probabilities)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, at most max_length of them and never none."""
        texts = clean_texts(texts)
        encodings = self.tokenizer.encode_batch(texts) if texts else []
        return [e.ids or [self.unk_id] for e in encodings]

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Token id rows -> (B, T) ids padded after the real tokens and (B,) lengths, both int64."""
        return pad_rows(rows, self.pad_id)

    def run(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One model call: (B, T) ids and (B,) lengths -> (B, classes) logits and probabilities."""
        logits, probabilities = self.session.run(list(OUTPUT_NAMES), {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: lengths})
        if self.temperature != 1.0:  # the model's own output is the plain softmax; calibration divides first
            probabilities = softmax(logits / np.float32(self.temperature))
        return logits, probabilities

    def explain(self, texts: Sequence[str]) -> list[Explanation]:
        """Each text's prediction with every word's contribution; see `nlprnn.deploy.explain`."""
        from nlprnn.deploy.explain import explain  # the explainer imports this module

        return explain(self, texts)


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits -> (N, C) probabilities, in the logits' dtype."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))  # no overflow: the largest is exp(0)
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _check_signature(session: ort.InferenceSession, bundle: Bundle) -> None:
    """The model takes input_ids and lengths and gives logits and probabilities over the bundle's labels."""
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = session.get_outputs()
    if inputs != INPUT_NAMES or tuple(o.name for o in outputs) != OUTPUT_NAMES:
        raise UserError(f"{bundle.model_file} is not an nlprnn model (inputs {inputs}); export the bundle again")
    classes = outputs[0].shape[-1]
    if isinstance(classes, int) and classes != len(bundle.labels):
        raise UserError(
            f"{bundle.model_file} predicts {classes} classes but labels.json names {len(bundle.labels)}; "
            "export the bundle again"
        )
