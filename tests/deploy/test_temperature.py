"""Predictor applies the bundle's temperature to its probabilities, and to nothing else."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nlprnn.deploy import Predictor
from nlprnn.deploy.bundle import MANIFEST_FILE, read_bundle
from nlprnn.errors import UserError

from deploy.tiny_bundles import build_bundle

TEXTS = ["good movie", "the plot was dull and bad", "", "acting great " * 20]


def set_manifest(bundle, **changes) -> None:
    path = bundle / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del manifest[key]
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("temperature") / "bundle")


def test_probabilities_are_the_softmax_of_logits_over_the_temperature(bundle):
    plain = Predictor(bundle).score(TEXTS)
    set_manifest(bundle, temperature=2.0)
    try:
        scores = Predictor(bundle).score(TEXTS)
    finally:
        set_manifest(bundle, temperature=None)
    np.testing.assert_allclose(scores.logits, plain.logits)
    expected = np.exp(plain.logits / 2) / np.exp(plain.logits / 2).sum(-1, keepdims=True)
    np.testing.assert_allclose(scores.probabilities, expected, rtol=1e-5, atol=1e-6)
    assert (scores.probabilities.argmax(-1) == plain.probabilities.argmax(-1)).all()


def test_a_bundle_without_a_temperature_reads_as_one(bundle):
    set_manifest(bundle, temperature=None)
    assert "temperature" not in json.loads((bundle / MANIFEST_FILE).read_text())
    assert read_bundle(bundle).manifest.temperature == 1.0


@pytest.mark.parametrize("bad", [0, -1.5, "2", True])
def test_a_bad_temperature_is_refused(bundle, bad):
    set_manifest(bundle, temperature=bad)
    try:
        with pytest.raises(UserError, match="temperature"):
            read_bundle(bundle)
    finally:
        set_manifest(bundle, temperature=None)
