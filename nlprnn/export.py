"""python -m nlprnn.export CKPT --out DIR: a checkpoint becomes a bundle, checked with onnxruntime.

CKPT is a checkpoint written by `python -m nlprnn.fit`, or its run folder (then best.ckpt). The
checkpoint carries its labels, tokenizer and max_length (TextDataModule.state_dict), so it exports
alone, wherever it lies; one written before checkpoints carried them takes them from its run folder's
labels.json, tokenizer.json and config.yaml. The test metrics of a metrics.json beside CKPT go into the
manifest when CKPT is best.ckpt, the checkpoint they were measured on. See nlprnn.deploy.bundle for
the bundle layout.

The model goes through the TorchScript-based exporter (`dynamo=False`) with dynamic batch and time
axes. The encoder reads every direction forward over a per-row reversed copy, so padding always comes
after the real tokens; the exported LSTM/GRU nodes therefore need no sequence lengths and stay exact
on padded batches. (The dynamo exporter of torch 2.13 fixes the time axis of several recurrent shapes
to the example's length.)

The export checks itself: onnxruntime runs the written model on batches of mixed lengths up to
max_length, and when its logits differ from PyTorch's by more than TOLERANCE, export fails with exit
status 1 and leaves no bundle behind.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

import nlprnn
from nlprnn.atomic import publishing
from nlprnn.calibration import temperature_of
from nlprnn.data.datamodule import CHECKPOINT_FORMAT, TextDataModule
from nlprnn.data.tokenizer import PAD, UNK, load_tokenizer, tokenizer_from_json
from nlprnn.deploy.bundle import (
    BUNDLE_FILES, INPUT_NAMES, LABELS_FILE, MANIFEST_FILE, MODEL_FILE, OUTPUT_NAMES, TOKENIZER_FILE, Manifest, read_bundle,
)
from nlprnn.errors import ReportedError, UserError, exit_on_reported_error, first_line
from nlprnn.models.classifier import TextClassifier
from nlprnn.quantize import QUANTIZATIONS, Validation, describe, quantize_bundle, validation_split

TOLERANCE = 1e-4  # largest accepted |logit(ONNX) - logit(PyTorch)|
OPSET = 17
EXAMPLE_LENGTH = 8  # time steps of the tracing example; the exported time axis is dynamic anyway
CHECK_ROWS = 17  # rows of the mixed-length check batch
BEST = "best.ckpt"


class ExportCheckFailed(ReportedError):
    """The exported model does not compute what the PyTorch model computes (exit status 1)."""


class OnnxClassifier(nn.Module):
    """The graph that is exported: ids and lengths in, logits and probabilities out."""

    def __init__(self, model: TextClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids, lengths).float()  # (B, classes)
        return logits, torch.softmax(logits, dim=-1)


def export_onnx(model: TextClassifier, path: Path, example_length: int = EXAMPLE_LENGTH) -> None:
    """Write `model` (in eval mode, on the CPU) as ONNX to `path`, with dynamic batch and time axes."""
    example_ids = (torch.arange(2 * example_length) % model.hparams.vocab_size).view(2, example_length)  # (2, T)
    example_lengths = torch.tensor([example_length, max(example_length // 2, 1)])
    example_ids[1, example_lengths[1] :] = model.hparams.pad_id
    with warnings.catch_warnings():
        # Tracer and deprecation notes about the TorchScript route; the check below is what counts.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            # In eval mode: the exporter restores the wrapper's mode afterwards, and a wrapper left in
            # training mode would switch the model's dropout on for everything that follows.
            OnnxClassifier(model).eval(),
            (example_ids, example_lengths),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "input_ids": {0: "batch", 1: "time"},
                "lengths": {0: "batch"},
                "logits": {0: "batch"},
                "probabilities": {0: "batch"},
            },
        )


def check_batch(rows: int, max_length: int, vocab_size: int, pad_id: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, T) random ids padded with pad_id and (rows,) lengths spread over 1..max_length, both ends included."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(1, max_length, rows).round().astype(np.int64)
    rng.shuffle(lengths)
    ids = rng.integers(0, vocab_size, size=(rows, int(lengths.max())), dtype=np.int64)
    ids[np.arange(ids.shape[1]) >= lengths[:, None]] = pad_id
    return ids, lengths


def max_logit_difference(model: TextClassifier, model_file: Path, max_length: int) -> float:
    """Largest |ONNX - PyTorch| logit on a mixed-length batch and on its longest row alone.

    inf where ONNX gives a NaN or inf that PyTorch does not; NaN where PyTorch's own logits are not finite.
    """
    from nlprnn.deploy.predictor import make_session

    session = make_session(model_file, threads=1)  # a small check; it need not take the machine
    ids, lengths = check_batch(CHECK_ROWS, max_length, model.hparams.vocab_size, model.hparams.pad_id)
    longest = int(lengths.argmax())
    worst = 0.0
    for batch_ids, batch_lengths in ((ids, lengths), (ids[longest : longest + 1], lengths[longest : longest + 1])):
        onnx_logits = session.run([OUTPUT_NAMES[0]], {INPUT_NAMES[0]: batch_ids, INPUT_NAMES[1]: batch_lengths})[0]
        with torch.inference_mode():
            torch_logits = model(torch.from_numpy(batch_ids), torch.from_numpy(batch_lengths)).float().numpy()
        if not np.isfinite(torch_logits).all():
            return math.nan
        gap = np.abs(onnx_logits - torch_logits)  # max() would drop a NaN: max(0.0, nan) is 0.0
        worst = max(worst, float(gap.max()) if np.isfinite(gap).all() else math.inf)
    return worst


def encoder_summary(model: TextClassifier) -> dict:
    """How the network is built, for the manifest."""
    encoder = model.encoder
    summary: dict = {"class": f"{type(encoder).__module__}.{type(encoder).__qualname__}"}
    for key in ("cell", "hidden_size", "num_layers", "direction", "residual", "output_dim"):
        if hasattr(encoder, key):
            summary[key] = getattr(encoder, key)
    hparams = model.hparams
    summary.update(
        pooling=model.pooling.kind,
        embedding_dim=model.embedding.embedding_dim,
        vocab_size=hparams.vocab_size,
        num_classes=hparams.num_classes,
        # what the network reads of a text beside the recurrence, and how much of each prediction is linear
        recurrent_length=hparams.recurrent_length,
        recurrent_tail=hparams.recurrent_tail,
        ngram_dim=model.ngrams.output_dim if model.ngrams is not None else 0,
        linear_blend=hparams.linear_blend,
    )
    return summary


def export_model(
    model: TextClassifier,
    out: Path,
    tokenizer: str | Path | Tokenizer,
    labels: list[str],
    max_length: int,
    test_metrics: dict[str, float] | None = None,
    overwrite: bool = False,
    example_length: int = EXAMPLE_LENGTH,
    quantize: str | None = None,
    validation: Validation | None = None,
    temperature: float = 1.0,
) -> Path:
    """Write the bundle of `model` to folder `out`, checked with onnxruntime; return `out`.

    Everything is written into a scratch folder beside `out` that becomes `out` only once the check
    has passed, so a failure leaves nothing half-written. `model` is moved to the CPU in float32 and
    left in eval mode. `tokenizer` is a tokenizer.json file or a tokenizer (whose padding and
    truncation are then changed). With `quantize="int8"` the checked float model is quantized and
    judged on `validation` (see nlprnn.quantize).
    """
    out = Path(out)
    _check_destination(out, overwrite)
    model = model.to("cpu", torch.float32).eval()
    tokenizer_name = str(tokenizer) if isinstance(tokenizer, (str, Path)) else "the tokenizer"  # for error messages
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(Path(tokenizer))
    _check_matches(model, tokenizer, labels, tokenizer_name)
    if max_length < 1:
        raise UserError(f"max_length must be at least 1, not {max_length}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZATIONS)}")
    if quantize is not None and validation is None:
        raise UserError(f"{quantize} needs validation texts to check the quantized model on")
    unk_id = tokenizer.token_to_id(UNK)
    manifest = Manifest(
        max_length=max_length,
        pad_id=int(model.hparams.pad_id),
        unk_id=int(unk_id if unk_id is not None else model.hparams.pad_id),
        encoder=encoder_summary(model),
        test_metrics=test_metrics,
        temperature=float(temperature),
        nlprnn_version=nlprnn.__version__,
    )
    with publishing(out, replace=True) as scratch:
        export_onnx(model, scratch / MODEL_FILE, example_length)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)  # the bundle's tokenizer cuts texts as the model expects
        tokenizer.save(str(scratch / TOKENIZER_FILE))
        (scratch / LABELS_FILE).write_text(json.dumps(labels, indent=2, ensure_ascii=False) + "\n")
        (scratch / MANIFEST_FILE).write_text(manifest.to_json())
        read_bundle(scratch)  # what we wrote, the reader accepts
        difference = max_logit_difference(model, scratch / MODEL_FILE, max_length)
        if math.isnan(difference):
            raise ExportCheckFailed(
                f"the model's own logits are NaN or infinite on the check batch (its weights hold NaN or inf, or "
                f"overflow); no bundle was written to {out}"
            )
        if not difference <= TOLERANCE:
            raise ExportCheckFailed(
                f"the ONNX model's logits differ from PyTorch's by {difference:.3g} (tolerance {TOLERANCE:g}); "
                f"no bundle was written to {out}"
            )
        if quantize is not None:
            quantize_bundle(scratch, validation, out)
    return out


def load_checkpoint(path: Path) -> TextClassifier:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return TextClassifier.load_from_checkpoint(str(path), map_location="cpu")
    except Exception as err:  # torch and Lightning raise many types for unreadable or foreign files
        raise UserError(f"{path} is not a readable nlprnn checkpoint ({type(err).__name__}: {first_line(err)})") from None


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path | None = None,
    overwrite: bool = False,
    max_length: int | None = None,
    quantize: str | None = None,
) -> Path:
    """Export a checkpoint (or a run folder's best.ckpt) to a bundle; return its folder.

    Labels, tokenizer and max_length come from the checkpoint, or from its run folder when it predates
    checkpoints that carry them; a metrics.json beside best.ckpt gives the manifest its test metrics, and
    the temperature nlprnn.fit calibrated (kept with the labels) its temperature.
    With `quantize="int8"` the validation split named by the checkpoint's data settings checks the
    quantized model, loaded before anything is written.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / BEST
    run_dir = checkpoint.parent
    out = Path(out) if out is not None else run_dir / "bundle"
    _check_destination(out, overwrite)
    model = load_checkpoint(checkpoint)
    saved = checkpoint_data(checkpoint)
    if saved is not None:
        labels = saved["labels"]
        tokenizer = tokenizer_from_json(saved["tokenizer"], f"the tokenizer in {checkpoint}")
        if max_length is None:
            max_length = int(saved["data"]["max_length"])
    else:
        for name in (TOKENIZER_FILE, LABELS_FILE):
            if not (run_dir / name).is_file():
                raise UserError(
                    f"{checkpoint} carries no labels or tokenizer (it was written by an older nlprnn) and {run_dir} "
                    f"has no {name}; export it from the run folder of `python -m nlprnn.fit` that wrote it"
                )
        labels = _read_json(run_dir / LABELS_FILE)
        tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
        if max_length is None:
            max_length = _training_max_length(run_dir)
    metrics = _read_json(run_dir / "metrics.json") if checkpoint.name == BEST and (run_dir / "metrics.json").is_file() else None
    validation = None
    if quantize is not None:
        if saved is None:
            raise UserError(f"{quantize} needs the validation split to check the quantized model on, and {checkpoint} "
                            "carries no data settings (it was written by an older nlprnn)")
        validation = validation_split(saved["data"], labels)
    return export_model(model, out, tokenizer, labels, max_length, metrics, overwrite, quantize=quantize,
                        validation=validation, temperature=temperature_of(saved and saved.get("calibration")))


def checkpoint_data(path: Path) -> dict[str, Any] | None:
    """What TextDataModule.state_dict() saved in checkpoint `path`: labels, tokenizer (JSON text), data settings.

    None for a checkpoint written before checkpoints carried them.
    """
    try:
        # mmap reads the archive's index and this small entry, not the weights
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # torch raises many types for unreadable or foreign files
        raise UserError(f"{path} is not a readable nlprnn checkpoint ({type(err).__name__}: {first_line(err)})") from None
    saved = checkpoint.get(TextDataModule.__qualname__) if isinstance(checkpoint, dict) else None
    if saved is None:
        return None
    readable = (
        isinstance(saved, dict) and saved.get("format") == CHECKPOINT_FORMAT
        and isinstance(saved.get("labels"), list) and isinstance(saved.get("tokenizer"), str)
        and isinstance((saved.get("data") or {}).get("max_length"), int)
    )
    if not readable:
        raise UserError(f"{path} carries data settings in a layout this nlprnn {nlprnn.__version__} cannot read")
    return saved


def export_after_fit(best_checkpoint: str, run_dir: Path) -> Path:
    """`python -m nlprnn.fit --export true`: the best (or else the last) checkpoint to <run folder>/bundle."""
    checkpoint = Path(best_checkpoint) if best_checkpoint else run_dir / "last.ckpt"
    out = export_checkpoint(checkpoint, run_dir / "bundle", overwrite=True)
    print(f"bundle written to {out}")
    return out


def _training_max_length(run_dir: Path) -> int:
    """The max_length the run was trained with: the tokenizer's truncation, else config.yaml."""
    truncation = load_tokenizer(run_dir / TOKENIZER_FILE).truncation
    if truncation and truncation.get("max_length"):
        return int(truncation["max_length"])
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        import yaml

        value = ((yaml.safe_load(config_file.read_text()) or {}).get("data") or {}).get("max_length")
        if isinstance(value, int):
            return value
    raise UserError(f"cannot tell the max_length {run_dir} was trained with; give it with --max_length")


def _check_matches(model: TextClassifier, tokenizer: Tokenizer, labels: object, tokenizer_name: str) -> None:
    """The tokenizer and labels belong to the model: same padding id, vocabulary within range, one label per class."""
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise UserError("labels must be a list of label names")
    if len(labels) != model.hparams.num_classes:
        raise UserError(f"the model has {model.hparams.num_classes} classes but there are {len(labels)} labels")
    if tokenizer.token_to_id(PAD) != model.hparams.pad_id:
        raise UserError(f"{tokenizer_name} pads with id {tokenizer.token_to_id(PAD)}, the model with {model.hparams.pad_id}")
    if tokenizer.get_vocab_size() > model.hparams.vocab_size:
        raise UserError(
            f"{tokenizer_name} has {tokenizer.get_vocab_size()} tokens, more than the model's "
            f"{model.hparams.vocab_size}: it is not this model's tokenizer"
        )


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; choose a folder for the bundle")
    where = out.resolve()
    if Path.cwd().resolve().is_relative_to(where):  # a bundle is published by renaming a folder over `out`
        raise UserError(f"--out {out} is the current folder or holds it; name a folder for the bundle inside it")
    if not (parent := next(p for p in where.parents if p.exists())).is_dir():
        raise UserError(f"cannot make {out}: {parent} is a file")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    # --overwrite replaces the whole folder: only ever a bundle, never a run folder or a folder of runs
    others = sorted(path.name for path in out.iterdir() if path.name not in BUNDLE_FILES)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(f"{out} is not a bundle folder (it holds {shown}); --overwrite replaces only a bundle")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def parse_args(args: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nlprnn.export",
        description="Export a checkpoint to a bundle (model.onnx, tokenizer.json, labels.json, nlprnn.json), "
        "checked against PyTorch with onnxruntime.",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by `python -m nlprnn.fit` (it needs no run folder "
                        "around it), or a run folder (its best.ckpt)")
    parser.add_argument("--out", default=None, help="the bundle folder to write (default: bundle/ beside the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens a text is cut to (default: as in training, from the checkpoint)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                        help="store weights as int8 (onnxruntime dynamic quantization); the bundle is written only "
                        "if its labels agree with the float model's on the checkpoint's validation split")
    return parser.parse_args(args)


def main(args: list[str] | None = None) -> Path:
    options = parse_args(args)
    with exit_on_reported_error("nlprnn.export"):
        out = export_checkpoint(options.checkpoint, options.out, options.overwrite, options.max_length,
                                options.quantize)
    quantization = read_bundle(out).manifest.quantization
    if quantization:
        print(describe(quantization))
    print(f"bundle written to {out}")
    return out


if __name__ == "__main__":
    main()
