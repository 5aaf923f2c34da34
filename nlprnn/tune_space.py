"""The search space of `python -m nlprnn.tune`: fit's own dotted parameters, each mapped to a distribution.

A YAML file such as

    model.lr: {type: float, low: 0.0003, high: 0.01, log: true}
    model.encoder.init_args.hidden_size: {type: categorical, choices: [64, 128, 256]}
    data.batch_size: {type: int, low: 16, high: 128, log: true}

Types: `int` and `float` (low and high inclusive, optional `log: true` or `step`), and `categorical`
(`choices`: numbers, strings, booleans or null). This module reads and checks the file's form; whether each
path and value is one nlprnn.fit accepts is checked against fit's parser (nlprnn.tune).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nlprnn.errors import UserError

KEYS = {"int": {"low", "high", "step", "log"}, "float": {"low", "high", "step", "log"}, "categorical": {"choices"}}
Value = bool | int | float | str | None


class SpaceLoader(yaml.SafeLoader):
    """YAML as written by people: 1e-4 is a float (PyYAML alone reads it as a string, wanting 1.0e-4)."""


SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
               |[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: its dotted fit path and its distribution."""

    path: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Value, ...] = ()

    def suggest(self, trial) -> Value:
        """Sample this parameter for an Optuna trial (named by its path)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.path, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def distribution(self):
        """The Optuna distribution `suggest` samples from, to compare with what a study's trials recorded."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def extremes(self) -> list[Value]:
        """The values that show whether fit accepts this parameter: every choice, or both ends of the range."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


def fit_args(params: dict[str, Value]) -> list[str]:
    """Parameter values as nlprnn.fit's dotted flags: {"model.lr": 0.001} -> ["--model.lr", "0.001"]."""
    args = []
    for path, value in params.items():
        args += [f"--{path}", as_flag_value(value)]
    return args


def as_flag_value(value: Value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def one_line(err: BaseException) -> str:
    """An exception's whole message on one line: jsonargparse's and YAML's span several, and the reason is not
    on the first (so not errors.first_line)."""
    return " ".join(str(err).split()) or type(err).__name__


def load_space(path: str | Path) -> list[Dimension]:
    """Read and check a search-space file; any mistake is a UserError naming the file and the parameter."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=SpaceLoader)
    except FileNotFoundError:
        raise UserError(f"search space file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"cannot read the search space {path}: {one_line(err)}") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"search space {path}: expected a mapping of fit parameters (e.g. model.lr) to "
                        "distributions such as {type: float, low: 0.0003, high: 0.01, log: true}")
    return [parse_dimension(str(name).removeprefix("--"), spec, path) for name, spec in raw.items()]


def parse_dimension(name: str, spec: Any, source: Path) -> Dimension:
    def fail(problem: str) -> UserError:
        return UserError(f"search space {source}: {name}: {problem}")

    if not isinstance(spec, dict) or spec.get("type") not in KEYS:
        raise fail("expected {type: int | float | categorical, ...}")
    kind = spec["type"]
    unknown = sorted(set(spec) - KEYS[kind] - {"type"})
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)} for type {kind} (allowed: {', '.join(sorted(KEYS[kind]))})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail("categorical needs a non-empty list of choices")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise fail("choices must be numbers, strings, booleans or null")
        if len(set(map(repr, choices))) < len(choices):
            raise fail("choices repeat a value")
        return Dimension(name, kind, choices=tuple(choices))

    number = int if kind == "int" else (int, float)
    bounds = {key: spec.get(key) for key in ("low", "high")}
    for key, value in bounds.items():
        if not isinstance(value, number) or isinstance(value, bool) or not math.isfinite(value):
            raise fail(f"{key} must be {'an integer' if kind == 'int' else 'a finite number'}, not {value!r}")
    low, high = bounds["low"], bounds["high"]
    if low > high:
        raise fail(f"empty range: low {low} is above high {high}")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise fail(f"log must be true or false, not {log!r}")
    if log and low <= 0:
        raise fail(f"log needs low > 0, not {low}")
    if step is not None:
        if not isinstance(step, number) or isinstance(step, bool) or not step > 0:
            raise fail(f"step must be a positive {'integer' if kind == 'int' else 'number'}, not {step!r}")
        if log:
            raise fail("log and step cannot be combined")
    return Dimension(name, kind, low=low if kind == "int" else float(low), high=high if kind == "int" else float(high),
                     step=step, log=log)
