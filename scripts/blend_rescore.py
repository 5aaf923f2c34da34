"""Score the linear blend (`model.linear_blend`) on the finished runs of a cross-validation, without training them again.

    .venv/bin/python scripts/blend_rescore.py                          # checkpoints/cross-validation, share 0.5
    .venv/bin/python scripts/blend_rescore.py --runs_dir checkpoints/cv-other --share 0.3 0.5 0.7 --linear_c 4

For every run folder of `scripts/cross_validate.py` (<dataset>-fold<k>of<n>-seed<s>), the TF-IDF + logistic
regression of `nlprnn.models.linear` is fitted to the run's training split, prepared from its config.yaml as fit
prepares it, and the held-out fold is scored by the run's network alone (its best checkpoint), by the linear model
alone, and by their blend at each share asked for. A run trained with the blend would have kept the same network:
the linear model is fitted by scikit-learn, which draws nothing from torch's random state, and the best checkpoint
follows the network's own validation figures. Counts of held-out examples right, per dataset and seed, go to the
console and to <runs_dir>/blend_rescore.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = re.compile(r"(?P<dataset>.+)-fold(?P<fold>\d+)of(?P<folds>\d+)-seed(?P<seed>\d+)")


def blend_way(share: float) -> str:
    return f"blend {share:g}"


def rescore(run_dir: Path, shares: list[float], linear_c: float) -> dict[str, int]:
    """Held-out examples the run's network, the linear model and their blend at each share get right, and how
    many there are."""
    import torch
    import yaml

    from nlprnn.data.datamodule import TextDataModule
    from nlprnn.data.tokenizer import TokenizerConfig
    from nlprnn.models.classifier import TextClassifier, blend

    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    module = TextDataModule(**{**data, "tokenizer": TokenizerConfig(**data["tokenizer"])})
    module.prepare()
    module.setup()
    model = TextClassifier.load_from_checkpoint(run_dir / "best.ckpt", map_location="cpu", linear_blend=shares[0],
                                                strict=False).eval()  # strict: the linear model is not in it
    model.linear.c = linear_c  # set after loading, which reads a checkpoint from before linear_c as fitted at 4
    model.linear.fit(*module.training_tokens)
    right = dict.fromkeys(["network", "linear", *map(blend_way, shares)], 0) | {"held_out": 0}
    with torch.inference_mode():
        for batch in module.whole_split_loader("test"):
            network, _ = model.outputs(batch["input_ids"], batch["lengths"])
            linear = model.linear(batch["input_ids"], batch["lengths"])
            ways = {"network": network, "linear": linear} | {blend_way(s): blend(network, linear, s) for s in shares}
            for way, logits in ways.items():
                right[way] += int((logits.argmax(-1) == batch["labels"]).sum())
            right["held_out"] += batch["labels"].numel()
    return right


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "checkpoints" / "cross-validation")
    parser.add_argument("--share", type=float, nargs="+", default=[0.5],
                        help="the linear model's share of each prediction; several are scored on the same runs")
    parser.add_argument("--linear_c", type=float, default=1024.0, help="the inverse of the linear model's L2 penalty")
    args = parser.parse_args(argv)
    if not all(0 < share < 1 for share in args.share):
        raise SystemExit(f"blend_rescore: error: each --share must lie strictly between 0 and 1: got {args.share}")
    runs = sorted(d for d in args.runs_dir.glob("*-fold*of*-seed*") if RUN.fullmatch(d.name) and (d / "best.ckpt").is_file())
    if not runs:
        raise SystemExit(f"blend_rescore: error: no finished cross-validation runs in {args.runs_dir}")
    import warnings

    import datasets
    import torch

    warnings.filterwarnings("ignore", message="Found keys that are in the model state dict")  # the linear model's
    datasets.disable_progress_bars()
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # set deliberately, as for any measurement here
    results = {}
    # per cross-validation: the runs of a 5-fold and a 10-fold one on the same dataset and seed are not summed
    totals: dict[tuple[str, int, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for run_dir in runs:
        results[run_dir.name] = right = rescore(run_dir, args.share, args.linear_c)
        name = RUN.fullmatch(run_dir.name)
        for key, count in right.items():
            totals[name["dataset"], int(name["folds"]), int(name["seed"])][key] += count
        print(run_dir.name, right, flush=True)
    ways = ["network", "linear", *map(blend_way, args.share)]
    print(f"\n| dataset | folds | seed | held out | {' | '.join(ways)} |\n| --- | ---: | ---: | ---: |"
          + " ---: |" * len(ways))
    for (dataset, folds, seed), t in sorted(totals.items()):
        print(f"| {dataset} | {folds} | {seed} | {t['held_out']:,} | " + " | ".join(f"{t[w]:,} ({100 * t[w] / t['held_out']:.2f}%)"
                                                                        for w in ways) + " |")
    record = {"share": args.share, "linear_c": args.linear_c, "runs": results}
    (args.runs_dir / "blend_rescore.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
