import hashlib
import json
import sys

import pytest

from safetext.errors import SafeTextError
from safetext.evaluation.detectors import Detection, Detector
from safetext.evaluation.nudenet import (
    DEFAULT_THRESHOLD,
    EXTENDED_NUDITY_CLASSES,
    NUDENET_LABELS,
    NUDITY_CLASSES,
    NudeNetDetector,
)

FACES = ["FACE_FEMALE", "FACE_MALE"]


@pytest.fixture(scope="module")
def nudenet():
    return pytest.importorskip("nudenet", reason="NudeNet is in the eval extra: pip install -e '.[eval]'")


@pytest.fixture(scope="module")
def raw_astronaut_detections(nudenet, astronaut, tmp_path_factory):
    # NudeNet's own API on a saved PNG: the way published evaluations call it
    path = tmp_path_factory.mktemp("nudenet") / "astronaut.png"
    astronaut.save(path)
    return nudenet.NudeDetector().detect(str(path))


def test_class_lists_match_the_package(nudenet):
    assert NUDENET_LABELS == tuple(vars(nudenet.nudenet)["__labels"])
    assert set(NUDITY_CLASSES) < set(EXTENDED_NUDITY_CLASSES) <= set(NUDENET_LABELS)
    assert all(name.endswith("_EXPOSED") for name in EXTENDED_NUDITY_CLASSES)


def test_finds_the_astronauts_face(nudenet, astronaut):
    detector = NudeNetDetector(classes=FACES)
    assert isinstance(detector, Detector)

    (detections,) = detector.detect([astronaut])

    assert [d.label for d in detections] == ["FACE_FEMALE"]
    face = detections[0]
    assert isinstance(face, Detection) and face.score >= DEFAULT_THRESHOLD
    # Eileen Collins' face in the 512x512 picture lies around x 180-270, y 80-180
    x, y, width, height = face.box
    assert 150 < x + width / 2 < 260 and 90 < y + height / 2 < 170


def test_matches_nudenet_on_the_saved_file(nudenet, astronaut, raw_astronaut_detections):
    (detections,) = NudeNetDetector(threshold=0.2, classes=NUDENET_LABELS).detect([astronaut])

    expected = sorted(raw_astronaut_detections, key=lambda item: item["score"], reverse=True)
    assert [(d.label, list(d.box)) for d in detections] == [(item["class"], item["box"]) for item in expected]
    assert [d.score for d in detections] == pytest.approx([item["score"] for item in expected], abs=1e-6)


def test_threshold_and_classes_are_applied(nudenet, astronaut, raw_astronaut_detections):
    face_score = max(item["score"] for item in raw_astronaut_detections if item["class"] == "FACE_FEMALE")

    assert NudeNetDetector(threshold=face_score - 0.01, classes=FACES).detect([astronaut])[0]
    assert NudeNetDetector(threshold=face_score + 0.01, classes=FACES).detect([astronaut]) == [[]]
    # the default classes are the nudity ones: a clothed astronaut is clean
    assert NudeNetDetector().detect([astronaut]) == [[]]


def test_batches_give_the_same_detections(nudenet, photos):
    images = [photos[0], photos[1].convert("L"), photos[0].resize((256, 256))]
    one_by_one = NudeNetDetector(threshold=0.3, classes=NUDENET_LABELS, batch_size=1).detect(images)
    batched = NudeNetDetector(threshold=0.3, classes=NUDENET_LABELS, batch_size=2).detect(images)

    assert len(batched) == 3 and any(batched)
    for single, batch in zip(one_by_one, batched):
        assert [(d.label, d.box) for d in single] == [(d.label, d.box) for d in batch]
        assert [d.score for d in single] == pytest.approx([d.score for d in batch], abs=1e-4)
    assert NudeNetDetector().detect([]) == []


def test_settings_record_what_decided_the_detections(nudenet):
    detector = NudeNetDetector(threshold=0.45, classes=["BUTTOCKS_EXPOSED", "ANUS_EXPOSED"])

    settings = detector.settings()

    with open(detector.model_path, "rb") as handle:
        sha256 = hashlib.sha256(handle.read()).hexdigest()
    assert settings == {
        "name": "nudenet",
        "package_version": "3.4.2",
        "model_file": "320n.onnx",
        "model_sha256": sha256,
        "input_size": 320,
        "threshold": 0.45,
        "classes": ["BUTTOCKS_EXPOSED", "ANUS_EXPOSED"],
        "package_min_score": 0.2,
    }
    assert json.loads(json.dumps(settings)) == settings
    defaults = NudeNetDetector().settings()
    assert defaults["threshold"] == 0.6 and defaults["classes"] == list(NUDITY_CLASSES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 0.1}, "threshold=0.1"),
        ({"threshold": 1.5}, "threshold=1.5"),
        ({"classes": ["NAKED"]}, "unknown NudeNet classes"),
        ({"classes": "FACE_FEMALE"}, "non-empty sequence"),
        ({"classes": []}, "non-empty sequence"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NudeNetDetector(**kwargs)


def test_missing_nudenet_names_the_install_command(monkeypatch):
    # a None entry in sys.modules makes `import nudenet` raise ImportError, as on a machine without the extra
    monkeypatch.setitem(sys.modules, "nudenet", None)
    with pytest.raises(SafeTextError, match=r"pip install 'safetext\[eval\]'"):
        NudeNetDetector()
