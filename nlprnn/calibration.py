"""Temperature scaling (Guo et al., 2017): one scalar T, fitted on validation logits, that makes
softmax(logits / T) honest about how often the model is right. Dividing by T keeps every argmax,
so accuracy and F1 do not change; only the probabilities do.

fit_temperature minimises the validation NLL over log T with L-BFGS; expected_calibration_error bins
examples by their top probability into equal-width bins; reliability_diagram draws those bins.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from nlprnn.atomic import replacing

BINS = 15
# a fit that reaches these is degenerate
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) on (N, C) logits and (N,) labels.

    Optimised over log T, so T stays positive without constraints. Returns 1.0 when there is nothing
    to fit, the model gets every example right (the NLL then falls as T -> 0, with no minimum: a fit would
    make every later prediction, right or wrong, near certain), the fit does not lower the NLL (as measured
    at T = 1), or it runs to MIN_TEMPERATURE or MAX_TEMPERATURE.
    """
    # clones: tensors made under inference_mode cannot take part in autograd
    logits = logits.detach().to("cpu", torch.float64).clone()
    labels = labels.detach().to("cpu", torch.long).clone()
    if logits.numel() == 0 or not torch.isfinite(logits).all() or bool((logits.argmax(-1) == labels).all()):
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():  # also when called from a no-grad context
        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not MIN_TEMPERATURE < temperature < MAX_TEMPERATURE or nll(logits, labels, temperature) > nll(logits, labels):
        return 1.0
    return temperature


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature): (N, C) logits, (N,) labels."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def reliability_bins(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = BINS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bins,) example counts, summed top probabilities and summed hits, by top probability.

    Bin k holds top probabilities in (k / bins, (k + 1) / bins]; a probability of 0 goes in the first.
    """
    confidence, predicted = probabilities.double().max(dim=-1)  # (N,), (N,)
    hits = (predicted == labels.to(predicted.device)).double()  # (N,)
    index = ((confidence * bins).ceil().long() - 1).clamp(0, bins - 1)  # (N,)
    counts = torch.zeros(bins, dtype=torch.float64, device=confidence.device)
    return (counts.index_add(0, index, torch.ones_like(confidence)), counts.index_add(0, index, confidence),
            counts.index_add(0, index, hits))


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """ECE: sum over equal-width bins of (share of examples) x |accuracy - mean top probability|."""
    counts, confidence, hits = reliability_bins(probabilities, labels, bins)
    total = counts.sum()
    return float((hits - confidence).abs().sum() / total) if total > 0 else 0.0


def reliability_diagram(curves: dict[str, torch.Tensor], labels: torch.Tensor, bins: int = BINS) -> bytes:
    """A PNG of accuracy against mean top probability per bin, one line per {name: (N, C) probabilities}."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for name, probabilities in curves.items():
        counts, confidence, hits = (t.cpu() for t in reliability_bins(probabilities, labels, bins))
        used = counts > 0
        ece = expected_calibration_error(probabilities, labels, bins)
        ax.plot((confidence[used] / counts[used]).numpy(), (hits[used] / counts[used]).numpy(),
                marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean top probability in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title("Test reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


@torch.no_grad()
def collect_logits(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float32 logits and (N,) labels of every batch of `loader`, with the model in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in loader:
            logits.append(model(batch["input_ids"].to(device), batch["lengths"].to(device)).float().cpu())
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def store_calibration(checkpoint: Path, key: str, calibration: dict[str, Any]) -> None:
    """Set checkpoint[key]["calibration"] in the file `checkpoint`, rewriting it atomically."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state.setdefault(key, {})["calibration"] = calibration
    with replacing(checkpoint) as f:
        torch.save(state, f)


def temperature_of(calibration: dict[str, Any] | None) -> float:
    """The temperature a checkpoint's calibration entry holds; 1.0 (no change) when it holds none."""
    value = (calibration or {}).get("temperature", 1.0)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else 1.0
