"""Serving an exported bundle: its format, and a Predictor on onnxruntime and tokenizers.

Nothing here imports torch or Lightning, so a serving install needs only the base dependencies.
`Predictor` is loaded on first use, which keeps `import nlprnn.deploy.bundle` free of onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nlprnn.deploy.predictor import Predictor

__all__ = ["Predictor"]


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from nlprnn.deploy.predictor import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
