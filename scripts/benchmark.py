"""Training, tokenization, inference and memory benchmarks of nlprnn, in one run on one machine.

    .venv/bin/python scripts/benchmark.py --out docs/

writes docs/benchmarks.json, docs/benchmarks.md and docs/benchmarks.png; sections of an existing benchmarks.md
that it does not write (the write-ups of scripts/bench_quantized.py and scripts/bench_stream.py) are kept after
its own. What it measures:

1. Training throughput, in real (non-padding) tokens per second through forward, backward and optimizer
   step, of the nlprnn pipeline (TextDataModule + TextClassifier + Trainer, built from the same config as
   `python -m nlprnn.fit`) against a plain PyTorch loop over the same model sizes, data and batch size that
   pads random batches to their longest text and packs them for one fused nn.LSTM/GRU/RNN. Both are timed
   over a fixed number of optimizer steps after warm-up, interleaved `--repeats` times.
2. The ceiling: the same RNNEncoder's forward + backward on random tensors of the batch size and the data's
   mean length, with no data, embedding, head or optimizer; achieved GFLOP/s beside the machine's float32
   matrix-multiply GFLOP/s.
3. Tokenization: TextDataModule.prepare_data in a fresh cache vs tokenizer.encode_batch on the same texts.
4. Inference: onnxruntime vs PyTorch eager at batch 1 and 64 (scripts/bench_inference.py).
5. Memory: peak RSS of the default training job, `python -m nlprnn.fit`.

Arguments after `--` go to the training configuration, e.g. `-- --data.batch_size 32`; `--config` picks
another recipe. Threads default to the physical cores this process may use.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
# FLOPs per token per layer and direction, in units of H * (input width + H): four gates for LSTM,
# three for GRU, one for a vanilla RNN, two FLOPs per multiply-add.
GATE_FLOPS = {"lstm": 8, "gru": 6, "rnn_tanh": 2, "rnn_relu": 2}
TARGETS = {  # name: (lower bound, description); memory is an upper bound, in MB
    "pipeline_vs_plain": (1.3, "pipeline tokens/s over the plain loop's"),
    "pipeline_vs_ceiling": (0.7, "pipeline tokens/s as a fraction of the ceiling"),
    "tokenize_vs_direct": (0.5, "DataModule tokenization texts/s as a fraction of direct encode_batch"),
}
MEMORY_LIMIT_MB = 2000.0


# --- the machine ----------------------------------------------------------------------------------


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and which of its vector-instruction extensions matter to float32 kernels."""
    name, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in value.split()]
    return name, flags


def machine_info(threads: int, device: str) -> dict:
    import torch

    from nlprnn.threads import available_cores

    name, flags = cpu_model()
    info = {
        "cpu_model": name,
        "cpu_flags": flags,
        "logical_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores_available": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "threads_requested": threads,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- building the pipeline from the training configuration --------------------------------------


def build_pipeline(config: Path, overrides: list[str]):
    """(model, datamodule, trainer settings, data settings) as `python -m nlprnn.fit --config CONFIG ...` makes them."""
    from lightning.pytorch.cli import LightningCLI

    from nlprnn.data.datamodule import TextDataModule
    from nlprnn.fit import FitCLI
    from nlprnn.models.classifier import TextClassifier

    class SettingsOnly(FitCLI):
        """FitCLI's parser, links and config; the trainer settings are kept instead of a run folder made."""

        def instantiate_trainer(self, **kwargs):
            self.trainer_settings = dict(self.config_init.trainer)
            return LightningCLI.instantiate_trainer(self, logger=False, enable_checkpointing=False)

    cli = SettingsOnly(
        TextClassifier, TextDataModule, run=False, args=["--config", str(config), *overrides],
        seed_everything_default=42, save_config_callback=None, auto_configure_optimizers=False,
    )
    return cli.model, cli.datamodule, cli.trainer_settings, cli.config.data.as_dict()


def encoder_shape(model) -> dict:
    """What the plain loop and the FLOP count need to know of the model's sizes."""
    encoder = model.encoder
    return {
        "cell": encoder.cell,
        "embedding_dim": model.hparams.embedding_dim,
        "hidden_size": encoder.hidden_size,
        "num_layers": encoder.num_layers,
        "directions": len(encoder.reads),
        "direction": encoder.direction,
        "between_layer_dropout": encoder.dropout.p,
    }


def flops_per_token(shape: dict) -> float:
    """Forward FLOPs of the recurrence per token: GATE_FLOPS * H * (input width + H) per layer and direction."""
    h, dirs = shape["hidden_size"], shape["directions"]
    widths = [shape["embedding_dim"]] + [h * dirs] * (shape["num_layers"] - 1)
    return float(sum(GATE_FLOPS[shape["cell"]] * h * (w + h) * dirs for w in widths))


# --- timing ---------------------------------------------------------------------------------------


@dataclass
class Timing:
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    padded_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "padded_tokens": self.padded_tokens, "steps": self.steps,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s}


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def make_step_timer(warmup: int, device: str):
    """A callback timing the optimizer steps after `warmup`: from the end of step `warmup` to the end of the last."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.timing = Timing()
            self._start = None
            self._real = []  # (B,) lengths of the timed batches; summed once at the end, not per step

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self._start is not None:
                self._real.append(batch["lengths"])
                self.timing.padded_tokens += batch["input_ids"].numel()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == warmup:
                synchronize(device)
                self._start = time.perf_counter()
            elif trainer.global_step == trainer.max_steps:
                synchronize(device)
                self.timing.seconds = time.perf_counter() - self._start
                self.timing.steps = trainer.global_step - warmup
                self.timing.tokens = int(sum(int(x.sum()) for x in self._real))

    return StepTimer()


def time_pipeline(model, data, settings: dict, warmup: int, steps: int, device: str, progress_bar: bool) -> Timing:
    """Train `warmup + steps` optimizer steps with a Trainer and time the last `steps`; no validation, logger, checkpoints."""
    from lightning.pytorch import Trainer

    from nlprnn.callbacks.nonfinite import NonFiniteLossGuard

    timer = make_step_timer(warmup, device)
    trainer = Trainer(**{
        **settings,
        # the training job's per-step callback; those for logging and checkpoints are off, as is validation
        "callbacks": [*(settings.get("callbacks") or []), NonFiniteLossGuard(), timer],
        "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
        "enable_progress_bar": progress_bar, "limit_val_batches": 0, "num_sanity_val_steps": 0,
        "max_epochs": -1, "max_steps": warmup + steps,
        "accelerator": "gpu" if device == "cuda" else "cpu", "devices": 1, "strategy": "auto",
    })
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):  # the progress bar's output
        trainer.fit(model, datamodule=data)
    return timer.timing


def plain_loop_data(data):
    """The training split as one (N,) tensor per example, made once (data preparation, not timed)."""
    import numpy as np
    import torch

    data.setup()
    split = data.splits["train"].with_format("numpy", columns=["input_ids", "label"])
    ids = [torch.from_numpy(x.astype("int64")) for x in split["input_ids"]]
    labels = torch.as_tensor(np.asarray(split["label"]), dtype=torch.long)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return ids, labels, lengths


def make_plain_model(model, shape: dict):
    """The textbook model of the same sizes: embedding, one fused nn.LSTM/GRU/RNN of all layers on packed input, head."""
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    hp = model.hparams
    if shape["direction"] == "reverse":
        raise SystemExit("the plain loop has no reverse-only recurrence; benchmark a forward or bidirectional encoder")
    kinds = {"lstm": (nn.LSTM, {}), "gru": (nn.GRU, {}), "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
             "rnn_relu": (nn.RNN, {"nonlinearity": "relu"})}
    rnn_class, options = kinds[shape["cell"]]
    dirs = shape["directions"]

    class PlainClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(hp.vocab_size, hp.embedding_dim, padding_idx=hp.pad_id)
            self.embedding_dropout = nn.Dropout(hp.embedding_dropout)
            self.rnn = rnn_class(
                hp.embedding_dim, shape["hidden_size"], num_layers=shape["num_layers"], bidirectional=dirs == 2,
                batch_first=True, dropout=shape["between_layer_dropout"] if shape["num_layers"] > 1 else 0.0, **options,
            )
            self.head = nn.Sequential(nn.Dropout(hp.dropout), nn.Linear(shape["hidden_size"] * dirs, hp.num_classes))

        def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            x = self.embedding_dropout(self.embedding(ids))  # (B, T, E)
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, h = self.rnn(packed)
            h = h[0] if isinstance(h, tuple) else h  # (layers * dirs, B, H), last layer last
            return self.head(torch.cat(list(h[-dirs:]), dim=-1))  # (B, classes)

    return PlainClassifier()


def time_plain_loop(model, shape: dict, data_arrays, batch_size: int, clip: float | None, warmup: int, steps: int,
                    seed: int, device: str) -> Timing:
    """Random batches padded to their longest text and packed; AdamW and clipping as the pipeline's."""
    import numpy as np
    import torch
    from torch.nn.utils.rnn import pad_sequence

    ids, labels, lengths = data_arrays
    torch.manual_seed(seed)
    plain = make_plain_model(model, shape).to(device).train()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=model.hparams.lr, weight_decay=model.hparams.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    timing = Timing()

    def batches():
        while True:  # epoch after epoch of random batches, the last one of an epoch possibly short
            order = rng.permutation(len(ids))
            yield from (order[i : i + batch_size] for i in range(0, len(order), batch_size))

    start = None
    for step, index in enumerate(batches(), start=1):
        if step > warmup + steps:
            break
        batch_lengths = lengths[index]
        padded = pad_sequence([ids[i] for i in index], batch_first=True, padding_value=model.hparams.pad_id)  # (B, T)
        logits = plain(padded.to(device, non_blocking=True), torch.from_numpy(batch_lengths))
        loss = loss_fn(logits, labels[index].to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
        optimizer.step()
        if step > warmup:
            timing.tokens += int(batch_lengths.sum())
            timing.padded_tokens += padded.numel()
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
    synchronize(device)
    timing.seconds = time.perf_counter() - start
    timing.steps = steps
    return timing


def time_ceiling(model, batch_size: int, length: int, warmup: int, steps: int, device: str) -> Timing:
    """The model's own encoder, forward + backward on random (B, T, E) inputs, all T long: no data, no optimizer."""
    import torch

    encoder = copy.deepcopy(model.encoder).to(device).train()
    x = torch.randn(batch_size, length, model.hparams.embedding_dim, device=device, requires_grad=True)  # (B, T, E)
    lengths = torch.full((batch_size,), length, device=device)
    timing = Timing()
    for step in range(1, warmup + steps + 1):
        encoder.zero_grad(set_to_none=True)
        x.grad = None
        encoder(x, lengths).last.sum().backward()
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
    synchronize(device)
    timing.seconds = time.perf_counter() - start
    timing.steps = steps
    timing.tokens = timing.padded_tokens = steps * batch_size * length
    return timing


def matmul_gflops(device: str, n: int = 1024, seconds: float = 1.0) -> float:
    """float32 GFLOP/s of torch.mm on (n, n) matrices, with the current thread settings."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
        if device == "cuda" and reps % 50 == 0:
            synchronize(device)
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def loader_seconds(data) -> tuple[float, int]:
    """Seconds to read one epoch of training batches (sampling, Arrow reads, collation) and the batch count."""
    loader = data.train_dataloader()
    start = time.perf_counter()
    count = sum(1 for _ in loader)
    return time.perf_counter() - start, count


def benchmark_training(args, model, data, settings: dict) -> dict:
    import numpy as np

    shape = encoder_shape(model)
    arrays = plain_loop_data(data)
    lengths = arrays[2]
    batch_size = data.batch_size
    epoch_steps = int(np.ceil(len(lengths) / batch_size))
    # One epoch of warm-up first: each new batch shape builds its oneDNN kernels once. Every measurement
    # replays the same batches, so later repeats find them built and need only a short warm-up.
    warmup = args.warmup_steps if args.warmup_steps is not None else epoch_steps
    later_warmup = args.warmup_steps if args.warmup_steps is not None else min(epoch_steps, 20)
    steps = args.steps if args.steps is not None else epoch_steps
    mean_length = float(lengths.mean())
    clip = settings.get("gradient_clip_val")
    initial = copy.deepcopy(model.state_dict())

    runs: dict[str, list[Timing]] = {"plain": [], "pipeline": [], "pipeline_progress_bar": [], "ceiling": []}
    for repeat in range(args.repeats):
        order = ["plain", "pipeline"] if repeat % 2 == 0 else ["pipeline", "plain"]
        order += ["pipeline_progress_bar", "ceiling"]
        first = warmup if repeat == 0 else later_warmup
        for name in order:
            model.load_state_dict(initial)
            if name == "plain":
                timing = time_plain_loop(model, shape, arrays, batch_size, clip, first, steps, args.seed, args.device)
            elif name == "ceiling":  # one shape: a few steps build its kernels
                timing = time_ceiling(model, batch_size, max(1, round(mean_length)), min(first, 10), steps, args.device)
            else:
                timing = time_pipeline(model, data, settings, first, steps, args.device, name != "pipeline")
            runs[name].append(timing)
            log(f"  repeat {repeat + 1}/{args.repeats} {name}: {timing.tokens_per_s:,.0f} tokens/s")
    model.load_state_dict(initial)

    def median(name: str) -> float:
        return statistics.median(t.tokens_per_s for t in runs[name])

    def per_repeat_ratio(a: str, b: str) -> float:
        return statistics.median(x.tokens_per_s / y.tokens_per_s for x, y in zip(runs[a], runs[b]))

    train_flops = 3 * flops_per_token(shape)
    load_s, load_batches = loader_seconds(data)
    matmul = matmul_gflops(args.device)
    result = {
        "model": shape,
        "batch_size": batch_size,
        "train_examples": len(lengths),
        "mean_length": mean_length,
        "ceiling_length": max(1, round(mean_length)),
        "warmup_steps": warmup,
        "warmup_steps_later_repeats": later_warmup,
        "steps": steps,
        "repeats": args.repeats,
        "gradient_clip_val": clip,
        "forward_flops_per_token": flops_per_token(shape),
        "training_flops_per_token": train_flops,
        "matmul_gflops": matmul,
        "loader_seconds_per_epoch": load_s,
        "loader_batches_per_epoch": load_batches,
        "runs": {name: [t.as_dict() for t in timings] for name, timings in runs.items()},
    }
    for name in runs:
        timings = runs[name]
        result[name] = {
            "tokens_per_s": median(name),
            "padding_efficiency": sum(t.tokens for t in timings) / max(sum(t.padded_tokens for t in timings), 1),
            "gflops": median(name) * train_flops / 1e9,
            "seconds_per_step": statistics.median(t.seconds / max(t.steps, 1) for t in timings),
        }
    result["pipeline_vs_plain"] = per_repeat_ratio("pipeline", "plain")
    result["pipeline_vs_ceiling"] = per_repeat_ratio("pipeline", "ceiling")
    result["progress_bar_cost"] = 1 - per_repeat_ratio("pipeline_progress_bar", "pipeline")
    result["loader_share_of_epoch"] = load_s / (load_batches * result["pipeline"]["seconds_per_step"])
    return result


# --- tokenization ---------------------------------------------------------------------------------


def benchmark_tokenization(args, data_settings: dict, repeats: int = 3) -> dict:
    """prepare_data in a fresh cache (only the downloaded raw files copied in) vs encode_batch on the same texts."""
    import datasets

    import nlprnn.data.datamodule as datamodule_module
    from nlprnn.cache import cache_dir
    from nlprnn.data.sources import SPLITS
    from nlprnn.data.tokenizer import TokenizerConfig

    datasets.disable_progress_bars()
    phases: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    source_cache = cache_dir()
    fresh = Path(tempfile.mkdtemp(prefix="nlprnn-bench-cache-"))
    old_env = os.environ.get("NLPRNN_CACHE")
    names = ("load_splits", "train_tokenizer", "tokenize_splits")
    originals = {name: getattr(datamodule_module, name) for name in names if hasattr(datamodule_module, name)}
    try:
        if (source_cache / "downloads").is_dir():  # raw downloads only: no parsed, split or tokenized data
            shutil.copytree(source_cache / "downloads", fresh / "downloads")
        os.environ["NLPRNN_CACHE"] = str(fresh)
        for name, function in originals.items():
            setattr(datamodule_module, name, timed(name, function))
        tokenizer_config = TokenizerConfig(**data_settings["tokenizer"])
        data = datamodule_module.TextDataModule(**{**data_settings, "tokenizer": tokenizer_config})
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            data.prepare_data()
        prepare_s = time.perf_counter() - start
        for name, function in originals.items():
            setattr(datamodule_module, name, function)
        splits = originals["load_splits"](data.source)
        texts = [text for split in SPLITS for text in splits[split]["text"]]
        data.setup()  # loads what prepare_data wrote
        tokenizer = data.tokenizer()
        tokenizer.no_truncation()  # the DataModule tokenizes untruncated too, then cuts and counts
        direct = []
        for _ in range(repeats):
            start = time.perf_counter()
            encodings = tokenizer.encode_batch(texts)
            direct.append(time.perf_counter() - start)
        tokens = sum(len(e.ids) for e in encodings)
    finally:
        for name, function in originals.items():
            setattr(datamodule_module, name, function)
        if old_env is None:
            os.environ.pop("NLPRNN_CACHE", None)
        else:
            os.environ["NLPRNN_CACHE"] = old_env
        shutil.rmtree(fresh, ignore_errors=True)
    direct_s = min(direct)
    tokenize_s = phases.get("tokenize_splits")
    return {
        "texts": len(texts),
        "tokens": tokens,
        "direct_encode_batch_s": direct_s,
        "direct_texts_per_s": len(texts) / direct_s,
        "prepare_data_s": prepare_s,
        "prepare_texts_per_s": len(texts) / prepare_s,
        "phases_s": phases,
        "datamodule_tokenize_texts_per_s": len(texts) / tokenize_s if tokenize_s else None,
        "tokenize_vs_direct": direct_s / tokenize_s if tokenize_s else None,
        "prepare_vs_direct": direct_s / prepare_s,
    }


# --- inference ------------------------------------------------------------------------------------


def benchmark_inference(args, run_dir: Path, data, workdir: Path) -> dict:
    """onnxruntime vs PyTorch eager on the memory job's trained model, by scripts/bench_inference.py.

    Single-text latency (batch 1) and batch-64 throughput, on texts of the data's test split.
    """
    from nlprnn.data.sources import load_splits

    texts = workdir / "test-texts.jsonl"
    with texts.open("w") as f:
        for text in load_splits(data.source)["test"]["text"][: args.inference_texts]:
            f.write(json.dumps({"text": text}) + "\n")
    out = workdir / "inference.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_inference.py"), str(run_dir), "--input", str(texts),
               "--texts", str(args.inference_texts), "--batch_size", "64", "--threads", str(args.threads),
               "--json", str(out)]
    if args.inference_runs:
        command += ["--runs", str(args.inference_runs), "--warmup", str(min(20, args.inference_runs)), "--rounds", "1"]
    completed = subprocess.run(command, env=child_env(args.threads), capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    measured = json.loads(out.read_text())
    engines = measured["engines"]
    ort, eager = engines["onnxruntime"], engines["pytorch eager"]
    return {
        **measured,
        "onnxruntime_vs_eager": {
            "batch_1_latency": eager["p50_ms"] / ort["p50_ms"],  # > 1: onnxruntime answers sooner
            "batch_64_throughput": ort["throughput_texts_per_s"] / eager["throughput_texts_per_s"],
        },
    }


# --- memory ---------------------------------------------------------------------------------------


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads), WANDB_MODE=env.get("WANDB_MODE", "offline"),
               WANDB_SILENT="true", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.pop("NLPRNN_RUN_NAME", None)
    return env


def benchmark_memory(args, config: Path, overrides: list[str], workdir: Path) -> dict:
    """Peak RSS of `python -m nlprnn.fit` (the largest process of the job, by wait4's rusage)."""
    job = ["--config", str(config), *overrides, "--trainer.enable_progress_bar", "false"]
    if args.memory_epochs:
        job += ["--trainer.max_epochs", str(args.memory_epochs)]
    command = [sys.executable, "-m", "nlprnn.fit", *job, "--output_dir", str(workdir / "runs"), "--run_name", "memory"]
    log_file = workdir / "memory-job.log"
    start = time.perf_counter()
    with log_file.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=child_env(args.threads), cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log_file.read_text()[-3000:]}")
    metrics_file = workdir / "runs" / "memory" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return {
        "command": " ".join(["python", "-m", "nlprnn.fit", *(relative(a) for a in job)]),
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports kilobytes
        "wall_s": seconds,
        "max_epochs": args.memory_epochs,
        "test_acc": metrics.get("test_acc"),
    }


# --- report ---------------------------------------------------------------------------------------


def targets(results: dict) -> dict:
    found = {}
    training, tokenization, memory = results.get("training"), results.get("tokenization"), results.get("memory")
    values = {
        "pipeline_vs_plain": training and training["pipeline_vs_plain"],
        "pipeline_vs_ceiling": training and training["pipeline_vs_ceiling"],
        "tokenize_vs_direct": tokenization and tokenization["tokenize_vs_direct"],
    }
    for name, (bound, description) in TARGETS.items():
        value = values[name]
        found[name] = {"value": value, "target": f">= {bound}", "met": None if value is None else value >= bound,
                       "what": description}
    rss = memory and memory["peak_rss_mb"]
    found["peak_rss_mb"] = {"value": rss, "target": f"< {MEMORY_LIMIT_MB:.0f}",
                            "met": None if rss is None else rss < MEMORY_LIMIT_MB,
                            "what": "peak RSS of the default training job, MB"}
    return found


def write_plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    panels = [k for k in ("training", "tokenization", "inference") if results.get(k)]
    fig = Figure(figsize=(5 * max(len(panels), 1), 4))
    for i, panel in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        if panel == "training":
            t = results["training"]
            names = ["plain loop", "pipeline", "pipeline +\nprogress bar", "ceiling\n(encoder only)"]
            values = [t[k]["tokens_per_s"] for k in ("plain", "pipeline", "pipeline_progress_bar", "ceiling")]
            ax.bar(names, values, color=["#999999", "#1f77b4", "#6baed6", "#2ca02c"])
            ax.set_ylabel("real tokens / s (forward + backward + step)")
            ax.set_title("Training throughput")
        elif panel == "tokenization":
            t = results["tokenization"]
            names = ["prepare_data\n(all of it)", "DataModule\ntokenize step", "encode_batch\n(direct)"]
            values = [t["prepare_texts_per_s"], t["datamodule_tokenize_texts_per_s"] or 0, t["direct_texts_per_s"]]
            ax.bar(names, values, color=["#999999", "#1f77b4", "#2ca02c"])
            ax.set_ylabel("texts / s")
            ax.set_title("Tokenization")
        else:
            rows = [r for r in inference_rows(results["inference"]) if "tokenizer" not in r["engine"]]
            labels = [f"{r['engine']}\nbatch {r['batch_size']}" for r in rows]
            colors = ["#1f77b4" if r["engine"] == "onnxruntime" else "#ff7f0e" for r in rows]
            ax.bar(labels, [r["texts_per_s"] for r in rows], color=colors)
            ax.set_ylabel("texts / s (batch 1: 1 / median latency)")
            ax.set_yscale("log")
            ax.set_title("Inference")
        for container in ax.containers:
            ax.bar_label(container, fmt="{:,.0f}", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def inference_rows(inference: dict) -> list[dict]:
    """Rows of (engine, batch size, p50 / p99 latency in ms, texts/s) from scripts/bench_inference.py's results."""
    rows = []
    for engine in ("onnxruntime", "pytorch eager", "onnxruntime + tokenizer"):
        r = inference["engines"].get(engine)
        if r is None:
            continue
        rows.append({"engine": engine, "batch_size": 1, "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                     "texts_per_s": 1e3 / r["p50_ms"]})
        if r.get("throughput_texts_per_s"):
            batch = inference["batch_size"]
            rows.append({"engine": engine, "batch_size": batch, "p50_ms": None, "p99_ms": None,
                         "texts_per_s": r["throughput_texts_per_s"]})
    return rows


def fmt(value, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def write_markdown(results: dict, path: Path, plot_name: str) -> None:
    m = results["machine"]
    lines = ["# Benchmarks", ""]
    if results.get("note"):
        lines += [f"> **{results['note']}**", ""]
    lines += [
        f"Reproduce with `` {results['command']} `` (about {results['wall_s'] / 60:.0f} minutes here). "
        f"Taken {results['date']}.", "",
        "## Machine", "",
        f"- CPU: {m['cpu_model']} ({', '.join(m.get('cpu_flags') or []) or 'vector extensions unknown'}); {m['logical_cpus']} logical "
        f"CPUs available, {m['physical_cores_available']} "
        f"physical cores; load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'] or [])}",
        f"- torch {m['torch']} ({m['device']}), {m['torch_threads']} intra-op / {m['torch_interop_threads']} inter-op "
        f"threads; environment {', '.join(f'{k}={v}' for k, v in m['env'].items() if v) or 'sets no thread variables'}",
        f"- Python {m['python']}, {m['platform']}", "",
        f"![benchmarks]({plot_name})", "",
        "## Targets", "",
        "| what | measured | target | met |", "|---|---|---|---|",
    ]
    for name, t in results["targets"].items():
        value = fmt(t["value"], ",.0f" if name == "peak_rss_mb" else ".2f")
        lines.append(f"| {t['what']} | {value} | {t['target']} | {'n/a' if t['met'] is None else 'yes' if t['met'] else 'NO'} |")
    if results.get("training"):
        t = results["training"]
        s = t["model"]
        lines += [
            "", "## Training throughput", "",
            f"- Model: {s['num_layers']}-layer {s['direction']} {s['cell']}, embedding {s['embedding_dim']}, hidden "
            f"{s['hidden_size']}; batch {t['batch_size']}; {t['train_examples']} training texts of mean length "
            f"{t['mean_length']:.1f} tokens.",
            f"- Timing: {t['steps']} optimizer steps after {t['warmup_steps']} warm-up steps ({t['warmup_steps_later_repeats']} "
            f"in later repeats, which replay the same batches); plain loop and pipeline interleaved, {t['repeats']} "
            "repeats; medians shown, ratios are medians of per-repeat ratios. Tokens are real (non-padding) tokens.",
            "- Pipeline: as `python -m nlprnn.fit` trains (same config, fused AdamW, gradient clipping, non-finite-loss "
            "guard), without validation, logger or checkpoints. Its progress-bar run refreshes the bar every step "
            "(Lightning's default; nlprnn.fit refreshes it every log_every_n_steps).",
            "- Plain loop: random batches padded to their longest text and packed (pack_padded_sequence) into one "
            f"nn.{s['cell'].upper().split('_')[0]}(num_layers={s['num_layers']}, bidirectional={s['directions'] == 2}); "
            "torch.optim.AdamW with its defaults, the same learning rate, weight decay and clipping.",
            f"- Ceiling: the pipeline's RNNEncoder alone, forward + backward on random ({t['batch_size']}, "
            f"{t['ceiling_length']}, {s['embedding_dim']}) inputs: no data, embedding, head or optimizer.",
            f"- GFLOP/s: {t['training_flops_per_token'] / 1e6:.2f} MFLOP per real token (3 x the recurrence's forward "
            f"FLOPs); this machine's float32 matrix multiply (torch.mm, 1024 x 1024, same threads) reaches "
            f"{t['matmul_gflops']:,.0f} GFLOP/s.", "",
            "| | real tokens/s | GFLOP/s | s/step | padding efficiency |", "|---|---|---|---|---|",
        ]
        names = {"plain": "plain PyTorch loop", "pipeline": "nlprnn pipeline (DataModule + TextClassifier + Trainer)",
                 "pipeline_progress_bar": "nlprnn pipeline, progress bar on", "ceiling": "ceiling (encoder alone)"}
        for key, label in names.items():
            r = t[key]
            lines.append(f"| {label} | {r['tokens_per_s']:,.0f} | {r['gflops']:.1f} | {r['seconds_per_step']:.4f} | "
                         f"{r['padding_efficiency']:.0%} |")
        lines += [
            "",
            f"- pipeline / plain loop: **{t['pipeline_vs_plain']:.2f}x**; pipeline / ceiling: "
            f"**{t['pipeline_vs_ceiling']:.0%}**",
            f"- progress bar on vs off: {-t['progress_bar_cost']:+.1%} throughput (differences of a few percent are noise)",
            f"- reading one epoch of batches (sampling, Arrow reads, collation) takes {t['loader_seconds_per_epoch']:.2f} s "
            f"for {t['loader_batches_per_epoch']} batches, {t['loader_share_of_epoch']:.1%} of a training epoch: "
            "loader worker processes would have little to take over",
        ]
    if results.get("tokenization"):
        t = results["tokenization"]
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in t["phases_s"].items())
        lines += [
            "", "## Tokenization", "",
            f"{t['texts']:,} texts ({t['tokens']:,} tokens), all three splits.", "",
            "| | seconds | texts/s |", "|---|---|---|",
            f"| tokenizer.encode_batch directly (best of 3) | {t['direct_encode_batch_s']:.3f} | {t['direct_texts_per_s']:,.0f} |",
            f"| DataModule tokenize step (datasets.map into Arrow, with truncation counts) | "
            f"{fmt(t['phases_s'].get('tokenize_splits'), '.3f')} | {fmt(t['datamodule_tokenize_texts_per_s'])} |",
            f"| DataModule prepare_data, fresh cache (parse, split, train tokenizer, tokenize, save) | "
            f"{t['prepare_data_s']:.3f} | {t['prepare_texts_per_s']:,.0f} |",
            "", f"prepare_data phases: {phases}. It runs once per dataset and tokenizer; later runs read the cache.",
        ]
    if results.get("inference"):
        inf = results["inference"]
        speedup = inf["onnxruntime_vs_eager"]
        lines += [
            "", "## Inference", "",
            f"The memory job's trained model, exported to ONNX, on {inf['texts']} test texts "
            f"({inf['tokens']['min']}-{inf['tokens']['max']} tokens, mean {inf['tokens']['mean']:.1f}), "
            f"{inf['threads']} thread(s), onnxruntime {inf['versions']['onnxruntime']} (scripts/bench_inference.py). "
            "Batch 1 is one text per call (token ids in, logits out; the last row adds the tokenizer); batch "
            f"{inf['batch_size']} pads each batch of texts, in file order, to its longest.", "",
            "| engine | batch | p50 ms | p99 ms | texts/s |", "|---|---|---|---|---|",
        ]
        for r in inference_rows(inf):
            lines.append(f"| {r['engine']} | {r['batch_size']} | {fmt(r['p50_ms'], '.3f')} | {fmt(r['p99_ms'], '.3f')} | "
                         f"{r['texts_per_s']:,.0f} |")
        lines += ["", f"onnxruntime over PyTorch eager: {speedup['batch_1_latency']:.2f}x at batch 1 (median latency), "
                  f"{speedup['batch_64_throughput']:.2f}x at batch {inf['batch_size']} (throughput)."]
    if results.get("memory"):
        mem = results["memory"]
        lines += ["", "## Memory", "", f"Peak RSS of `{mem['command']}`: **{mem['peak_rss_mb']:,.0f} MB** "
                  f"(its largest process; {mem['wall_s']:.0f} s, test accuracy {fmt(mem['test_acc'], '.3f')})."]
    kept = written_elsewhere(path, OWN_SECTIONS)  # a section skipped this time goes, rather than stay stale
    path.write_text("\n".join(lines) + "\n" + "".join(f"\n{section}" for section in kept))


# the sections this script writes: the rest of benchmarks.md (other scripts' write-ups) is kept as it is
OWN_SECTIONS = {"## Machine", "## Targets", "## Training throughput", "## Tokenization", "## Inference", "## Memory"}


def written_elsewhere(path: Path, generated: set[str]) -> list[str]:
    """The sections of an existing report that this script does not write (other benchmarks' write-ups), kept as they are."""
    if not path.is_file():
        return []
    sections = re.split(r"^(?=## )", path.read_text(), flags=re.MULTILINE)[1:]
    return [section.rstrip("\n") + "\n" for section in sections if section.splitlines()[0] not in generated]


def relative(arg: str) -> str:
    """A path inside the repository as a relative path, for commands shown in the report."""
    return os.path.relpath(arg, ROOT) if os.path.isabs(arg) and Path(arg).is_relative_to(ROOT) else arg


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for benchmarks.{json,md,png}")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (as for nlprnn.fit)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: $OMP_NUM_THREADS, else the physical cores available)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default: one epoch)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each training measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-epochs", type=int, default=None,
                        help="epochs of the memory job (default: the config's, i.e. the real default job)")
    parser.add_argument("--inference-texts", type=int, default=512, help="test texts timed for inference")
    parser.add_argument("--inference-runs", type=int, default=None,
                        help="timed single-text calls per engine (default: bench_inference.py's)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="run folder or checkpoint for the inference test when the memory job is skipped")
    parser.add_argument("--skip", nargs="*", default=[], choices=("training", "tokenization", "inference", "memory"))
    parser.add_argument("--note", default=None, help="a line shown at the top of benchmarks.md")
    return parser.parse_args(argv), overrides


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, overrides = parse_args(argv)
    if (args.warmup_steps is not None and args.warmup_steps < 1) or (args.steps is not None and args.steps < 1):
        raise SystemExit("--warmup-steps and --steps must be at least 1")
    env_threads = os.environ.get("OMP_NUM_THREADS", "")
    from nlprnn.threads import available_cores

    args.threads = args.threads or (int(env_threads) if env_threads.isdigit() else available_cores())
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # before tokenizers starts its pool
    import datasets
    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; quieted below)
    import torch

    datasets.disable_progress_bars()

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # this script's own argv
    for name in ("lightning.pytorch", "lightning.fabric"):  # one "GPU available" note per Trainer is noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # only possible before any inter-op work
        torch.set_num_interop_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {
        "command": shlex.join([".venv/bin/python", "scripts/benchmark.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "note": args.note,
        "machine": machine_info(args.threads, args.device),
        "config": relative(str(args.config)),
        "overrides": overrides,
    }
    workdir = Path(tempfile.mkdtemp(prefix="nlprnn-bench-"))
    try:
        log("preparing the data and model")
        model, data, settings, data_settings = build_pipeline(args.config, overrides)
        for section in ("tokenization", "training", "memory", "inference"):
            if section in args.skip:
                results[section] = None
                continue
            log(section)
            if section == "training":
                results[section] = benchmark_training(args, model, data, settings)
            elif section == "tokenization":
                results[section] = benchmark_tokenization(args, data_settings)
            elif section == "memory":
                results[section] = benchmark_memory(args, args.config, overrides, workdir)
            elif args.checkpoint or results.get("memory"):
                run_dir = args.checkpoint or workdir / "runs" / "memory"
                results[section] = benchmark_inference(args, run_dir, data, workdir)
            else:
                log("  skipped: it times the memory job's model; give --checkpoint to measure it without that job")
                results[section] = None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["targets"] = targets(results)
    results["wall_s"] = time.perf_counter() - started
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    write_plot(results, args.out / "benchmarks.png")
    write_markdown(results, args.out / "benchmarks.md", "benchmarks.png")
    log(f"wrote {args.out / 'benchmarks.md'}, benchmarks.json and benchmarks.png")
    return results


if __name__ == "__main__":
    main()
