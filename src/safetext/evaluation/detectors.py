"""The shape every image detector shares: per-image detections, already filtered, and the settings that made them;
and the detectors the evaluation can name (`get_detector`)."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from safetext.errors import SafeTextError


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


def _nudenet(threshold: float | None) -> Detector:
    from safetext.evaluation.nudenet import NudeNetDetector

    return NudeNetDetector() if threshold is None else NudeNetDetector(threshold=threshold)


def _opennsfw(threshold: float | None) -> Detector:
    from safetext.evaluation.opennsfw import OpenNSFWDetector

    return OpenNSFWDetector() if threshold is None else OpenNSFWDetector(threshold=threshold)


def _miniworld(threshold: float | None) -> Detector:
    from safetext.miniworld.detector import MiniWorldDetector
    from safetext.miniworld.world import RESTRICTED_CONCEPTS

    # like NudeNet's exposed classes: only the restricted concepts count as unsafe findings
    if threshold is None:
        return MiniWorldDetector(classes=RESTRICTED_CONCEPTS)
    return MiniWorldDetector(threshold=threshold, classes=RESTRICTED_CONCEPTS)


DETECTORS: dict[str, Callable[[float | None], Detector]] = {
    "nudenet": _nudenet,
    "opennsfw": _opennsfw,
    "miniworld": _miniworld,
}
"""Detectors by the name `safetext evaluate --detector NAME` takes.

A factory takes the score threshold (`None`: the detector's own default) and returns a `Detector`. It imports its
package inside the call, so that naming a detector costs nothing until it is used, and raises `SafeTextError` with
an install hint when the package is missing. Add a detector by adding its factory here.
"""


def get_detector(name: str, threshold: float | None = None) -> Detector:
    """Build a detector by name.

    Args:
        name (`str`): a key of `DETECTORS`, e.g. `"nudenet"`.
        threshold (`float`, *optional*): lowest score that counts as a detection; defaults to the detector's own
            (0.6 for NudeNet, 0.5 for Open-NSFW and MiniWorld's).

    Returns:
        `Detector`: the detector, ready to `detect`.

    Raises:
        `SafeTextError`: if the name is unknown (the message lists the known ones), the detector's package is not
            installed (the message says how to install it) or the threshold is out of the detector's range.
    """
    factory = DETECTORS.get(name)
    if factory is None:
        raise SafeTextError(f"unknown detector {name!r}; available: {', '.join(sorted(DETECTORS))}")
    try:
        detector = factory(threshold)
    except ValueError as error:
        raise SafeTextError(f"detector {name!r}: {error}") from None
    except ImportError as error:
        # a factory should say how to install its package; this is the fallback for one that does not
        raise SafeTextError(f"detector {name!r} needs a package that is not installed ({error})") from None
    if not isinstance(detector, Detector):
        raise TypeError(f"the factory of detector {name!r} returned {type(detector).__name__}, not a Detector")
    return detector
