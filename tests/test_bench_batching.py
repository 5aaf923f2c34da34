"""scripts/bench_batching.py: one tiny run (a check that it works, not a measurement)."""

from __future__ import annotations

import re
import sys

import pytest

from conftest import load_script, make_examples, write_csv
from deploy.tiny_bundles import build_bundle


@pytest.mark.parametrize("flags", [[], ["--parallel_calls", "--threads", "2"]])
def test_prints_a_rate_for_each_model_batch_size(tmp_path, monkeypatch, capsys, flags):
    bundle = build_bundle(tmp_path / "bundle")
    texts = write_csv(tmp_path / "texts.csv", make_examples(200))
    monkeypatch.setattr(sys, "argv", ["bench_batching.py", str(bundle), "--texts", str(texts), "--group", "16",
                                      "--sizes", "16,4,1", "--limit", "160", *flags])
    load_script("bench_batching").main()
    lines = capsys.readouterr().out.splitlines()
    assert [int(re.search(r"model calls of +(\d+)", line).group(1)) for line in lines] == [16, 4, 1]
    assert all(float(re.search(r"([\d,]+) texts/s", line).group(1).replace(",", "")) > 0 for line in lines)
