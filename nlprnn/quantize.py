"""int8 bundles: onnxruntime dynamic quantization, accepted only when it keeps the float model's labels.

`quantize_dynamic` stores weights as int8 and quantizes activations on the fly. What it changes in an
exported classifier: every LSTM node becomes a DynamicQuantizeLSTM (a contrib op of onnxruntime's CPU
provider, so the bundle needs nothing beyond onnxruntime), the head's Gemm becomes a MatMulInteger and
the embedding table is stored as 8-bit and dequantized after its lookup. GRU and RNN nodes have no
quantized kernel and stay float.

The tables of the linear model blended in (`model.linear`: an idf and a weight per class for each n-gram) are
quantized too, and the n-gram bag's table.

A logit tolerance does not fit int8, so the quantized model is judged by how often it predicts the float
model's label on the validation split the checkpoint was trained with. When all of it in int8 changes too many
labels, the linear model stays float and the rest is quantized again; then the embedding table as well. Each
table is stored with one scale for all its rows. The linear model's weights at C = 1024 are large, and on a
small default-recipe model (1,057 validation texts) they moved every label int8 moved: 99.72% agreement all
int8, 100% with the linear model float (2.2 MB more), 99.72% with only the embedding table float. On the three
models of the accuracy table whose labels int8 moved most, with the linear model at C = 4, keeping the embedding
table float kept the most labels (trec6, seed 2: 98.70% all int8, 99.26% with the table float, 98.88% with the
LSTM float, no change with the linear model float; docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from nlprnn.errors import ReportedError, UserError

QUANTIZATIONS = ("int8",)
MIN_LABEL_AGREEMENT = 0.99  # share of validation texts whose int8 label must be the float label
FALLBACKS = ((), ("linear",), ("linear", "embedding"))  # parts left float, tried in turn until one agrees enough


class QuantizationRefused(ReportedError):
    """The int8 model's labels differ from the float model's too often (exit status 1)."""


@dataclass(frozen=True)
class Validation:
    """Labelled texts the int8 model is checked on; `labels` index the model's classes."""

    texts: list[str]
    labels: np.ndarray  # (N,) int64


def quantize_int8(source: Path, target: Path, float_parts: Sequence[str] = ()) -> None:
    """Write the dynamically int8-quantized copy of ONNX model `source` to `target`, leaving the nodes of the
    classifier's `float_parts` (submodule names, such as "embedding") float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prefixes = tuple(f"/model/{part}/" for part in float_parts)  # nlprnn.export names the classifier `model`
    kept = [node.name for node in onnx.load(str(source)).graph.node if node.name.startswith(prefixes)]
    if float_parts and not kept:
        raise RuntimeError(f"no node of {', '.join(float_parts)} in {source}: the export's node names changed")
    with _quiet_root_logger():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=kept)


def validation_split(data: dict[str, Any], labels: Sequence[str]) -> Validation:
    """The validation split described by a checkpoint's data settings (TextDataModule.state_dict()["data"]).

    A `UserError` when the data cannot be loaded any more (an offline Hub dataset, moved files) or
    no longer has the checkpoint's labels.
    """
    from nlprnn.data.sources import SourceSpec, load_splits

    import datasets

    spec = SourceSpec(**{f.name: data[f.name] for f in fields(SourceSpec) if f.name in data})
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # an export reports in one line; reading the split is a detail
    try:
        split = load_splits(spec)["validation"]
    except UserError as err:
        relative = [path for path in spec.files.values() if not Path(path).is_absolute() and not Path(path).exists()]
        hint = f" ({relative[0]} is relative to the folder the run was trained in: export from there)" if relative else ""
        raise UserError(f"int8 needs the validation split to check the quantized model on, and it cannot be loaded: "
                        f"{err}{hint}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    names = split.features["label"].names
    if list(names) != list(labels):
        raise UserError(
            f"int8 needs the validation split to check the quantized model on, but the training data now has the "
            f"labels {list(names)}, not the checkpoint's {list(labels)}"
        )
    columns = split.with_format("numpy", columns=["label"])[:]
    return Validation(list(split["text"]), np.asarray(columns["label"], dtype=np.int64))


def compare(float_labels: np.ndarray, int8_labels: np.ndarray, truth: np.ndarray,
            float_parts: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest's `quantization` record: what stayed float, label agreement and both accuracies on the
    validation texts."""
    return {
        "type": "int8",
        "float_parts": list(float_parts),
        "label_agreement": float(np.mean(float_labels == int8_labels)),
        "accuracy_float": float(np.mean(float_labels == truth)),
        "accuracy_int8": float(np.mean(int8_labels == truth)),
        "validation_texts": int(len(truth)),
    }


def describe(record: dict[str, Any]) -> str:
    """One line on a `quantization` record, for the console."""
    kept = f"; the {' and '.join(record['float_parts'])} kept float" if record.get("float_parts") else ""
    return (f"int8 keeps the float model's label on {record['label_agreement']:.2%} of {record['validation_texts']} "
            f"validation texts (accuracy {record['accuracy_float']:.2%} -> {record['accuracy_int8']:.2%}){kept}")


def predicted_labels(bundle: Path, texts: Sequence[str]) -> np.ndarray:
    """(N,) class indices the bundle in folder `bundle` predicts for `texts`."""
    from nlprnn.deploy.predictor import Predictor

    return Predictor(bundle).score(texts).logits.argmax(axis=1)


def _fallbacks(model: Path) -> list[tuple[str, ...]]:
    """FALLBACKS, each without the parts `model` lacks (a model without a linear blend has no linear model)."""
    import onnx

    names = [node.name for node in onnx.load(str(model)).graph.node]
    tries: list[tuple[str, ...]] = []
    for parts in FALLBACKS:
        present = tuple(part for part in parts if any(name.startswith(f"/model/{part}/") for name in names))
        if present not in tries:
            tries.append(present)
    return tries


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """quantize_dynamic logs a pre-processing hint on the root logger; it does not apply to these graphs."""
    root = logging.getLogger()

    def drop(record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()

    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def quantize_bundle(scratch: Path, validation: Validation, out: Path) -> dict[str, Any]:
    """Quantize the float bundle being written in folder `scratch` to int8, in place, and record what it cost.

    Each of FALLBACKS (of the parts the model has) is tried in turn until the int8 model's labels agree with the float model's on at least
    MIN_LABEL_AGREEMENT of the validation texts; when none does, raises QuantizationRefused (naming `out`,
    where the bundle would have gone).
    """
    import dataclasses
    import os

    from nlprnn.deploy.bundle import MANIFEST_FILE, MODEL_FILE, read_bundle

    float_labels = predicted_labels(scratch, validation.texts)
    float_model = scratch / "model.float.onnx"  # each try writes the bundle's model afresh from it
    os.replace(scratch / MODEL_FILE, float_model)
    records = []
    for float_parts in _fallbacks(float_model):
        quantize_int8(float_model, scratch / MODEL_FILE, float_parts)
        records.append(compare(float_labels, predicted_labels(scratch, validation.texts), validation.labels, float_parts))
        if records[-1]["label_agreement"] >= MIN_LABEL_AGREEMENT:
            break
    float_model.unlink()
    record = records[-1]
    if not record["label_agreement"] >= MIN_LABEL_AGREEMENT:
        tried = ", ".join(f"{r['label_agreement']:.2%} with the {' and '.join(r['float_parts'])} float"
                          for r in records if r["float_parts"])
        raise QuantizationRefused(
            f"the int8 model predicts the float model's label on only {records[0]['label_agreement']:.2%} of "
            f"{record['validation_texts']} validation texts{f' ({tried})' if tried else ''} (at least "
            f"{MIN_LABEL_AGREEMENT:.0%} required); no bundle was written to {out}"
        )
    manifest = read_bundle(scratch).manifest
    (scratch / MANIFEST_FILE).write_text(dataclasses.replace(manifest, quantization=record).to_json())
    return record
