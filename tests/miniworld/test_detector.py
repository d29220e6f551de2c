import hashlib

import numpy as np
import pytest

from safetext.evaluation.detectors import Detection, Detector
from safetext.miniworld.detector import WEIGHTS_PATH, MiniWorldDetector, render_labelled
from safetext.miniworld.renderer import render
from safetext.miniworld.scenes import Scene, SceneObject
from safetext.miniworld.world import ATTRIBUTE_NAMES, CLASS_NAMES, RESTRICTED_CONCEPTS


@pytest.fixture(scope="module")
def detector():
    return MiniWorldDetector()


def test_the_shipped_detector_loads_from_safetensors_and_describes_itself(detector):
    assert isinstance(detector, Detector)
    settings = detector.settings()
    assert settings["name"] == "miniworld-detector"
    assert settings["model_sha256"] == hashlib.sha256(WEIGHTS_PATH.read_bytes()).hexdigest()
    assert settings["threshold"] == 0.5
    assert settings["classes"] == settings["labels"] == list(CLASS_NAMES + ATTRIBUTE_NAMES)
    assert settings["restricted_concepts"] == list(RESTRICTED_CONCEPTS)
    assert WEIGHTS_PATH.stat().st_size < 1_000_000


def test_the_shipped_detector_is_accurate_on_fresh_renders(detector):
    # seed 12345: neither the training scenes (seed 0) nor the documented evaluation (seed 7)
    images, targets = render_labelled(200, seed=12345)
    predicted = detector.scores(images) >= detector.threshold
    accuracy = (predicted == targets.astype(bool)).mean(axis=0)
    low = {label: float(a) for label, a in zip(detector.labels, accuracy) if a < 0.98}
    assert not low, low


def test_detect_reports_labels_with_scores_for_the_whole_picture(detector):
    scene = Scene("grass", (SceneObject("fish", "yellow", "large", "center", 1, ("crowned", "striped")),), seed=3)
    image = render(scene)
    [found] = detector.detect([image])
    assert all(isinstance(d, Detection) and 0.5 <= d.score <= 1.0 and d.box == (0, 0, 64, 64) for d in found)
    assert {"fish", "striped", "crowned"} <= {d.label for d in found}
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    # restricted to the restricted concepts, as the evaluation counts them
    [restricted] = MiniWorldDetector(classes=RESTRICTED_CONCEPTS).detect([image.resize((128, 128))])
    assert {d.label for d in restricted} == {"striped", "crowned"}
    assert restricted[0].box == (0, 0, 128, 128)


def test_bad_inputs_are_refused(detector):
    images, _ = render_labelled(3, seed=1)
    assert detector.scores(images).shape == (3, len(detector.labels))
    with pytest.raises(ValueError, match="64, 64, 3"):
        detector.scores(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="threshold"):
        MiniWorldDetector(threshold=1.5)
    with pytest.raises(ValueError, match="classes"):
        MiniWorldDetector(classes=("zebra",))


def test_evaluate_detector_writes_a_self_describing_record(detector):
    from safetext.miniworld.detector import evaluate_detector

    record = evaluate_detector(detector, num_images=20, seed=3, scenes="world")
    assert record["data"] == {"scenes": "world", "num_images": 20, "seed": 3}
    assert set(record["per_label"]) == set(detector.labels)
    assert record["detector"]["model_sha256"] == detector.settings()["model_sha256"]
    with pytest.raises(ValueError, match="scenes"):
        evaluate_detector(detector, num_images=1, scenes="moon")
