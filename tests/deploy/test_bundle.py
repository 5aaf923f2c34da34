"""Reading a bundle: what export writes is read back; missing, corrupt or too-new bundles are clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nlprnn.deploy.bundle import BUNDLE_FILES, BUNDLE_FORMAT, MANIFEST_FILE, read_bundle
from nlprnn.errors import UserError

from deploy.tiny_bundles import LABELS, MAX_LENGTH, build_bundle


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundles") / "bundle")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def edit_manifest(bundle: Path, **changes: object) -> None:
    path = bundle / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))


def test_export_writes_a_bundle_the_reader_accepts(tiny_bundle):
    assert sorted(p.name for p in tiny_bundle.iterdir()) == sorted(BUNDLE_FILES)
    bundle = read_bundle(tiny_bundle)
    assert bundle.labels == LABELS
    manifest = bundle.manifest
    assert (manifest.format_version, manifest.max_length, manifest.pad_id, manifest.unk_id) == (BUNDLE_FORMAT, MAX_LENGTH, 0, 1)
    assert manifest.encoder["cell"] == "lstm" and manifest.encoder["direction"] == "bidirectional"
    assert manifest.encoder["num_layers"] == 2 and manifest.encoder["pooling"] == "mean"
    assert manifest.test_metrics is None and manifest.nlprnn_version
    tokenizer = json.loads((tiny_bundle / "tokenizer.json").read_text())
    assert tokenizer["truncation"]["max_length"] == MAX_LENGTH and tokenizer["padding"] is None


def test_missing_bundle_folder(tmp_path):
    with pytest.raises(UserError, match=r"no bundle at .*python -m nlprnn.export"):
        read_bundle(tmp_path / "nowhere")


@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_missing_file(bundle_copy, name):
    (bundle_copy / name).unlink()
    with pytest.raises(UserError, match=f"not a complete bundle: {name} missing"):
        read_bundle(bundle_copy)


def test_newer_format_asks_for_an_upgrade(bundle_copy):
    edit_manifest(bundle_copy, format_version=BUNDLE_FORMAT + 1)
    with pytest.raises(UserError, match=f"format {BUNDLE_FORMAT + 1}, newer than .* upgrade nlprnn"):
        read_bundle(bundle_copy)


def test_newer_keys_of_the_same_format_are_ignored(bundle_copy):
    edit_manifest(bundle_copy, added_later={"anything": 1})
    assert read_bundle(bundle_copy).manifest.max_length == MAX_LENGTH


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": None}, "no valid format_version"),
        ({"format_version": "1"}, "no valid format_version"),
        ({"max_length": 0}, "no valid max_length"),
        ({"pad_id": None}, "no valid pad_id"),
        ({"unk_id": True}, "no valid unk_id"),
    ],
)
def test_malformed_manifest(bundle_copy, changes, message):
    edit_manifest(bundle_copy, **changes)
    with pytest.raises(UserError, match=message):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_corrupt_manifest(bundle_copy, content):
    (bundle_copy / MANIFEST_FILE).write_bytes(content)
    with pytest.raises(UserError, match=f"{MANIFEST_FILE} is not (valid JSON|a bundle manifest)"):
        read_bundle(bundle_copy)


@pytest.mark.parametrize("content", ["[]", '{"a": 1}', '["ok", 2]', "oops"])
def test_corrupt_labels(bundle_copy, content):
    (bundle_copy / "labels.json").write_text(content)
    with pytest.raises(UserError, match="labels.json"):
        read_bundle(bundle_copy)
