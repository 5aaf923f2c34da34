"""Where the cache lives, and the atomic writes every output goes through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nlprnn import atomic
from nlprnn.cache import cache_dir


def test_the_cache_follows_nlprnn_cache_then_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("NLPRNN_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("NLPRNN_CACHE")
    if os.name == "posix" and not os.uname().sysname == "Darwin":
        assert cache_dir() == tmp_path / "xdg" / "nlprnn"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert cache_dir() == Path.home() / ".cache" / "nlprnn"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    atomic.write_json(target, {"acc": 1})
    with pytest.raises(RuntimeError), atomic.replacing(target) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "acc": 1\n}\n'
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]
    assert oct(target.stat().st_mode & 0o777) == "0o644"


def test_a_folder_is_published_whole_or_not_at_all(tmp_path):
    final = tmp_path / "bundle"
    with pytest.raises(RuntimeError), atomic.publishing(final) as scratch:
        (scratch / "model.onnx").write_bytes(b"x")
        raise RuntimeError("export check failed")
    assert list(tmp_path.iterdir()) == []
    with atomic.publishing(final) as scratch:
        (scratch / "a").write_text("first")
    with atomic.publishing(final) as scratch:  # another process published first: its copy stays
        (scratch / "a").write_text("second")
    assert (final / "a").read_text() == "first"
    with atomic.publishing(final, replace=True) as scratch:
        (scratch / "a").write_text("third")
    assert (final / "a").read_text() == "third" and [p.name for p in tmp_path.iterdir()] == ["bundle"]
