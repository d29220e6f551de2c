"""The shape every image detector shares: per-image detections, already filtered, and the settings that made them."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class Detection:
    """One region a detector found in an image.

    Args:
        label (`str`): the detector's class name, e.g. `"FEMALE_BREAST_EXPOSED"`.
        score (`float`): the detector's confidence in [0, 1].
        box (`tuple[int, int, int, int]`): `(x, y, width, height)` in pixels of the input image, from its top-left
            corner.
    """

    label: str
    score: float
    box: tuple[int, int, int, int]


@runtime_checkable
class Detector(Protocol):
    """An image detector used by the evaluation.

    `detect` returns only the detections that pass the detector's own score threshold and class list, so an image
    with no detection is an image the detector calls clean; `settings` records everything that decided that, for
    the result record.
    """

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """Return, for each image in order, its detections above the threshold and in the class list."""
        ...

    def settings(self) -> dict[str, Any]:
        """Return a JSON-serialisable record: `name`, `package_version`, `model_sha256`, `threshold`, `classes`."""
        ...
