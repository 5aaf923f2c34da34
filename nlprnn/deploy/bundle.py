"""The bundle: an exported model with everything needed to run it on raw text.

    model.onnx      inputs  input_ids (batch, time) int64: real tokens first, then padding
                            lengths   (batch,)      int64: real tokens per row, 1 <= length <= time
                    outputs logits        (batch, classes) float32
                            probabilities (batch, classes) float32, softmax of the logits (before the
                                          manifest's temperature, which Predictor applies)
    tokenizer.json  the Hugging Face `tokenizers` tokenizer the model was trained with
    labels.json     the label names, in the order of the model's outputs
    nlprnn.json     the manifest: format version, max_length, padding and unknown-token ids,
                    encoder configuration, test metrics and the nlprnn version that wrote it

Reading a bundle needs only the standard library; this module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nlprnn.errors import UserError

BUNDLE_FORMAT = 1  # bump when a reader of the previous format could not read the new one
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "nlprnn.json"
BUNDLE_FILES = (MODEL_FILE, TOKENIZER_FILE, LABELS_FILE, MANIFEST_FILE)
INPUT_NAMES = ("input_ids", "lengths")
OUTPUT_NAMES = ("logits", "probabilities")


@dataclass(frozen=True)
class Manifest:
    """What nlprnn.json holds.

    Args:
        max_length: texts are cut to this many tokens, as in training.
        pad_id: the token id that fills rows after their real tokens.
        unk_id: the token id a text without any token is read as.
        encoder: how the network is built (cell, layers, direction, pooling, widths), for the record.
        test_metrics: the checkpoint's test-split metrics, when known.
        temperature: calibrated probabilities are softmax(logits / temperature), fitted on the validation
            split after training (nlprnn.calibration); 1.0: the plain softmax.
        quantization: how the weights were quantized and what it cost on the validation split
            ({"type": "int8", "label_agreement", "accuracy_float", "accuracy_int8", ...}); None: float.
        nlprnn_version: the nlprnn version that wrote the bundle.
        format_version: the bundle layout version.
    """

    max_length: int
    pad_id: int
    unk_id: int
    encoder: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, float] | None = None
    temperature: float = 1.0
    quantization: dict[str, Any] | None = None
    nlprnn_version: str = ""
    format_version: int = BUNDLE_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


@dataclass(frozen=True)
class Bundle:
    """A bundle folder whose manifest and labels have been read and checked."""

    root: Path
    manifest: Manifest
    labels: list[str]

    @property
    def model_file(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def tokenizer_file(self) -> Path:
        return self.root / TOKENIZER_FILE


def read_bundle(root: str | Path) -> Bundle:
    """Read and check the bundle in `root`; anything missing, malformed or too new is a `UserError`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"no bundle at {root}: make one with `python -m nlprnn.export CHECKPOINT --out {root}`")
    missing = [name for name in BUNDLE_FILES if not (root / name).is_file()]
    if missing:
        raise UserError(f"{root} is not a complete bundle: {', '.join(missing)} missing; export it again")
    manifest = _read_manifest(root / MANIFEST_FILE)
    labels = _read_json(root / LABELS_FILE)
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise UserError(f"{root / LABELS_FILE} must hold a non-empty JSON list of label names; export the bundle again")
    return Bundle(root, manifest, labels)


def _read_manifest(path: Path) -> Manifest:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a bundle manifest (a JSON object); export the bundle again")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise UserError(f"{path} has no valid format_version; export the bundle again")
    if version > BUNDLE_FORMAT:
        raise UserError(
            f"{path.parent} is a bundle of format {version}, newer than this nlprnn reads (up to {BUNDLE_FORMAT}); "
            "upgrade nlprnn"
        )
    for key in ("max_length", "pad_id", "unk_id"):
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "max_length" else 0):
            raise UserError(f"{path} has no valid {key}; export the bundle again")
    temperature = data.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise UserError(f"{path} has no valid temperature (a positive number); export the bundle again")
    known = {key: data[key] for key in Manifest.__dataclass_fields__ if key in data}
    return Manifest(**known)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); export the bundle again") from None
