"""Compare rules for choosing the checkpoint, on the validation split alone.

    .venv/bin/python scripts/selection_rules.py                      # the built-in datasets, seeds 1 2 3
    .venv/bin/python scripts/selection_rules.py --datasets trec6 --seeds 1

Each dataset is trained once per seed with the default recipe (`python -m nlprnn.fit --data.dataset NAME`,
the test split never read) for its whole derived budget, recording every epoch's validation logits. Each rule,
with the derived patience, then picks an epoch from a random 80% of the validation examples and is scored on
the other 20%, over many random splits: an estimate of how well it chooses, free of the optimism of scoring an
epoch on the examples that chose it. Rules:

- first: the highest accuracy; of tied epochs the first (Lightning's ModelCheckpoint and EarlyStopping);
- lowest_loss: the highest accuracy; of tied epochs the one with the lowest loss (nlprnn.callbacks.selection);
- within_one: an epoch beats the best so far with an accuracy higher by more than one example, or within one
  example of it and a lower loss (measured, not adopted: docs/defaults.md).

Every rule is scored on the same random splits, so the comparison is paired.

The curves go to --curves_dir (reused when there: a stopped comparison continues; delete a dataset's curves
after a change to the default recipe or the model that it uses), the comparison to <out>/selection.json and the
console.
One run at a time; nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from accuracy_table import check_distinct_seeds

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ["movie-snippets", "trec6", "sms-spam", "bbc-news"]
RULES = ("first", "lowest_loss", "within_one")
CHOOSE_SHARE = 0.8  # of the validation examples: where a rule chooses; it is scored on the rest


def choose(acc: np.ndarray, loss: np.ndarray, rule: str, patience: int | None, examples: int) -> int:
    """The epoch a rule keeps from per-epoch accuracy and loss over `examples` examples, stopping after
    `patience` epochs without a better one."""
    tolerance = 1.5 / examples if rule == "within_one" else 0.0  # accuracies differ by whole examples
    best = 0
    for epoch in range(1, len(acc)):
        margin = acc[epoch] - acc[best]
        level = rule != "first" and abs(margin) <= tolerance
        if (loss[epoch] < loss[best]) if level else margin > 0:
            best = epoch
        elif patience is not None and epoch - best >= patience:
            break
    return best


def held_out_accuracy(correct: np.ndarray, losses: np.ndarray, rule: str, patience: int | None,
                      splits: int, rng: np.random.Generator) -> float:
    """Mean accuracy, on the examples left out, of the epoch `rule` chose on CHOOSE_SHARE of them.

    correct and losses: (epochs, examples), each example's correctness and loss after each epoch.
    """
    n = correct.shape[1]
    cut = int(round(CHOOSE_SHARE * n))
    scores = []
    for _ in range(splits):
        order = rng.permutation(n)
        chosen, left_out = order[:cut], order[cut:]
        epoch = choose(correct[:, chosen].mean(1), losses[:, chosen].mean(1), rule, patience, cut)
        scores.append(correct[epoch, left_out].mean())
    return float(np.mean(scores))


def record_curve(data_args: list[str], seed: int, path: Path) -> None:
    """Train the default recipe on the data `data_args` name (and any further fit flags in it) for its whole
    derived budget; save each epoch's validation logits, labels and the derived patience to `path` (.npz)."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from nlprnn import fit
    from nlprnn.atomic import replacing
    from nlprnn.calibration import collect_logits
    from nlprnn.callbacks.selection import BestCheckpoint

    class Recorder(Callback):
        def __init__(self) -> None:
            self.logits: list[np.ndarray] = []
            self.labels: np.ndarray | None = None
            self.patience: int | None = None

        def on_fit_start(self, trainer, pl_module) -> None:
            for callback in trainer.checkpoint_callbacks:  # the whole budget: the rules simulate the stop
                if isinstance(callback, BestCheckpoint):
                    self.patience, callback.patience = callback.patience, None

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            with torch.random.fork_rng(devices=[]):  # a loader's iterator draws a seed: leave training's RNG alone
                logits, labels = collect_logits(pl_module, trainer.datamodule.whole_split_loader("validation"),
                                                pl_module.device)
            self.logits.append(logits.numpy())
            self.labels = labels.numpy()

    recorder = Recorder()
    runs = path.parent / "runs"
    shutil.rmtree(runs / path.stem, ignore_errors=True)  # what a stopped recording left
    fit.run([*data_args, "--seed_everything", str(seed), "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--run_name", path.stem, "--output_dir", str(runs),
             "--baseline", "false", "--calibrate", "false"], callbacks=[recorder], test=False)
    with replacing(path) as f:  # whole or absent: a curve on disk is reused as it is
        np.savez(f, logits=np.stack(recorder.logits), labels=recorder.labels, patience=recorder.patience or -1)
    shutil.rmtree(runs / path.stem, ignore_errors=True)  # its checkpoints are not needed


def example_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(epochs, examples) cross-entropy of each example after each epoch."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[:, np.arange(len(labels)), labels]


def compare(curves: list[Path], splits: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {rule: [] for rule in RULES}
    for path in curves:
        saved = np.load(path)
        logits, labels, patience = saved["logits"], saved["labels"], int(saved["patience"])
        correct = logits.argmax(-1) == labels
        losses = example_losses(logits, labels)
        split_seed = rng.integers(2**32)  # every rule is scored on the same splits: the comparison is paired
        for rule in RULES:
            scores[rule].append(held_out_accuracy(correct, losses, rule, None if patience < 0 else patience,
                                                  splits, np.random.default_rng(split_seed)))
    return {rule: float(np.mean(values)) for rule, values in scores.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--splits", type=int, default=300, help="random splits of the validation examples")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--curves_dir", type=Path, default=ROOT / "checkpoints" / "selection-curves")
    args = parser.parse_args(argv)
    check_distinct_seeds(parser, args.seeds)
    curves_dir = args.curves_dir
    curves_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)  # before any training: not a failure after hours of curves
    results = {}
    for dataset in args.datasets:
        curves = []
        for seed in args.seeds:
            path = curves_dir / f"{dataset}-seed{seed}.npz"
            if not path.exists():
                record_curve(["--data.dataset", dataset], seed, path)
            curves.append(path)
        results[dataset] = compare(curves, args.splits)
        scores = ", ".join(f"{rule} {100 * results[dataset][rule]:.2f}%" for rule in RULES)
        print(f"{dataset}: held-out accuracy {scores}", flush=True)
    (args.out / "selection.json").write_text(json.dumps(
        {"seeds": args.seeds, "splits": args.splits, "choose_share": CHOOSE_SHARE, "held_out_accuracy": results},
        indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
