"""Every recipe in configs/ parses with the real CLI and builds its model, data module and trainer.

Training is replaced by a stub and the data by the tiny generated CSV, so nothing is downloaded and
nothing trains. Recipes written for GPUs are parsed as they are, then built on the CPU with the
device settings this machine lacks turned down to one CPU process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import nlprnn.fit
from nlprnn.data.datamodule import TextDataModule
from nlprnn.models.classifier import TextClassifier

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("*.yml")])
LOW_PRECISION_16 = {"16", "16-mixed", "16-true"}  # fp16: CUDA only; bf16 runs on CPUs too
MULTI_PROCESS_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def raw(config: Path) -> dict:
    return yaml.safe_load(config.read_text()) or {}


def gpus_needed(trainer: dict) -> int:
    """How many CUDA devices the trainer section asks for (0 when it runs on a CPU as it is)."""
    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", "auto")
    if isinstance(devices, list):
        count = len(devices)
    elif isinstance(devices, int) or str(devices).isdigit():
        count = int(devices)
    else:
        count = 1
    wants_gpu = accelerator in ("gpu", "cuda") or str(trainer.get("precision")) in LOW_PRECISION_16
    multi = count > 1 or int(trainer.get("num_nodes", 1) or 1) > 1
    return max(count, 1) if wants_gpu or multi else 0


def cpu_overrides(trainer: dict) -> list[str]:
    """CLI overrides that build a GPU or multi-process trainer section as one CPU process instead."""
    if gpus_needed(trainer) <= torch.cuda.device_count():
        return []
    overrides = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1"]
    if any(s in str(trainer.get("strategy", "auto")) for s in MULTI_PROCESS_STRATEGIES):
        overrides += ["--trainer.strategy", "auto"]
    if str(trainer.get("precision")) in LOW_PRECISION_16:
        overrides += ["--trainer.precision", "bf16-mixed"]
    return overrides


# What each named recipe promises, checked on the file as the CLI parses it.
RECIPE_ESSENTIALS = {
    "reverse_gru.yaml": {"model.encoder.init_args.cell": "gru", "model.encoder.init_args.direction": "reverse"},
    "deep_residual_gru.yaml": {
        "model.encoder.init_args.cell": "gru", "model.encoder.init_args.num_layers": 4,
        "model.encoder.init_args.residual": True,
    },
    "vanilla_rnn.yaml": {"model.encoder.init_args.cell": "rnn_tanh"},
    "bigru_attention.yaml": {
        "model.encoder.init_args.cell": "gru", "model.encoder.init_args.direction": "bidirectional",
        "model.pooling": "attention",
    },
    "keras_lstm.yaml": {
        "data.tokenizer.vocab_size": 10000, "data.max_length": 100, "model.embedding_dim": 128,
        "model.encoder.init_args.cell": "lstm", "model.encoder.init_args.hidden_size": 64,
        "model.encoder.init_args.num_layers": 1, "model.encoder.init_args.direction": "forward",
        "model.pooling": "last", "model.lr": 1e-3, "model.weight_decay": 0.0, "data.batch_size": 64,
    },
}


@pytest.fixture
def build(monkeypatch, tmp_path, tiny_csv):
    """Run `python -m nlprnn.fit --config FILE` up to the point where training would start; return the CLI."""

    def build(config: Path) -> nlprnn.fit.FitCLI:
        built = {}

        def stop_before_training(cli, test=True):
            built["cli"] = cli
            return {}

        monkeypatch.setattr(nlprnn.fit, "fit_and_test", stop_before_training)
        data = ["--data.train_file", str(tiny_csv), "--data.validation_file", "null", "--data.test_file", "null",
                "--data.text_column", "text", "--data.label_column", "label", "--data.num_workers", "0"]
        run = ["--output_dir", str(tmp_path / "runs"), "--run_name", config.stem]
        nlprnn.fit.main(["--config", str(config), *data, *run, *cpu_overrides(raw(config).get("trainer") or {})])
        return built["cli"]

    return build


def test_the_documented_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"default.yaml", "reverse_gru.yaml", "deep_residual_gru.yaml", "vanilla_rnn.yaml",
            "bigru_attention.yaml", "keras_lstm.yaml"} <= names


DEVICE_KEYS = ("accelerator", "devices", "strategy", "precision", "num_nodes")


@pytest.mark.parametrize("name", ["gpu_bf16.yaml", "multi_gpu_ddp.yaml"])
def test_the_gpu_recipes_are_the_default_recipe_on_gpus(name):
    """They say they are the default recipe on GPUs: only the trainer's device settings may differ from it."""
    default, gpu = raw(CONFIGS / "default.yaml"), raw(CONFIGS / name)
    device = {k: gpu["trainer"].pop(k) for k in DEVICE_KEYS if k in gpu["trainer"]}
    assert device["accelerator"] == "gpu" and device["precision"] == "bf16-mixed"
    assert gpu == default


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: p.name)
def test_recipe_says_what_it_is_on_its_first_line(config):
    first = config.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 10, f"{config.name} needs a comment line on top saying what it is"


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: p.name)
def test_recipe_builds_its_model_data_and_trainer(config, build):
    spec = raw(config)
    cli = build(config)
    # the real parser takes the file exactly as written, GPU settings included
    as_written = cli.parser.parse_args(["--config", str(config)])
    for key, value in RECIPE_ESSENTIALS.get(config.name, {}).items():
        assert as_written[key] == value, f"{config.name}: {key} should be {value!r}"
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    assert isinstance(model, TextClassifier) and isinstance(data, TextDataModule)

    # what the data knows reached the model
    assert (model.hparams.vocab_size, model.hparams.num_classes, model.hparams.pad_id) == (
        data.vocab_size, data.num_classes, data.pad_id)
    # the recipe's own values reached the objects
    model_spec = spec.get("model") or {}
    for key, value in model_spec.items():
        if not isinstance(value, dict):  # nested classes (the encoder) are checked on the built object
            assert model.hparams[key] == value, f"model.{key}"
    for key, value in ((model_spec.get("encoder") or {}).get("init_args") or {}).items():
        attribute = getattr(model.encoder, key)
        assert (attribute.p if isinstance(attribute, nn.Dropout) else attribute) == value, f"model.encoder.{key}"
    trainer_spec = spec.get("trainer") or {}
    for key in ("max_epochs", "gradient_clip_val", "accumulate_grad_batches"):
        if trainer_spec.get(key) is not None:  # null: left open, derived from the data
            assert getattr(trainer, key) == trainer_spec[key], f"trainer.{key}"
    data_spec = spec.get("data") or {}
    for key in ("batch_size", "max_length"):
        if data_spec.get(key) is not None:
            assert getattr(data, key) == data_spec[key], f"data.{key}"
    if "vocab_size" in (data_spec.get("tokenizer") or {}):
        assert data.tokenizer_config.vocab_size == data_spec["tokenizer"]["vocab_size"]

    # and the model runs on a batch of the data
    batch = next(iter(data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["lengths"])
    assert logits.shape == (len(batch["labels"]), data.num_classes) and torch.isfinite(logits).all()
