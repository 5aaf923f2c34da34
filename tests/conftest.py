"""Shared fixtures: an isolated cache, tiny generated datasets, one thread per process."""

from __future__ import annotations

import csv
import importlib.util
import os
import random
import sys
from types import ModuleType
from pathlib import Path
from typing import get_args

import pytest
import torch

from nlprnn.models.encoder import Cell, Direction
from nlprnn.models.pooling import PoolingKind

torch.set_num_threads(1)  # tests run tiny models; more threads only fight each other on small machines

# The encoder grid the tests sweep, read from the typed signatures: a new cell or pooling is tested too.
CELLS = list(get_args(Cell))
DIRECTIONS = list(get_args(Direction))
POOLINGS = list(get_args(PoolingKind))
STACKS = {
    "1-layer": dict(num_layers=1),
    "3-layer": dict(num_layers=3),
    "3-layer-residual": dict(num_layers=3, residual=True),
}

POSITIVE = "good great fine superb lovely wonderful excellent charming moving brilliant".split()
NEGATIVE = "bad awful dull boring poor weak terrible messy tedious clumsy".split()
FILLER = "the movie film plot story acting cast was is a an and of this it".split()


def make_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Sentences whose label follows from their sentiment words: learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, rng.randint(2, 8)) + rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], fieldnames: tuple[str, ...] = ("text", "label")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own NLPRNN_CACHE and W&B offline; nothing touches the user's home."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("NLPRNN_CACHE", str(cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("NLPRNN_RUN_NAME", raising=False)
    for name in [n for n in os.environ if n.startswith("SLURM_")]:  # tests run inside a SLURM job are no SLURM tasks
        monkeypatch.delenv(name)
    return cache


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "tiny.csv", make_examples(200))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """A cache that survives across tests, for the real dataset (fetched once per session)."""
    return tmp_path_factory.mktemp("shared-cache")


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py imported as a module (scripts/ is not a package), with scripts/ on the path, as when it runs
    as a script: scripts import each other's helpers."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
