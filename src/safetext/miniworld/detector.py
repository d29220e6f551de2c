"""The MiniWorld detector: MiniWorld's counterpart of NudeNet, a small CNN that says what a picture shows.

It is multi-label: one sigmoid per object class and per attribute (the restricted concepts `striped` and
`crowned`, and their neighbours `dotted`, `checkered` and `hatted`), each answering "is there such a thing
anywhere in the picture". It is trained on fresh renders of the world, with attributes drawn on every class
so that it judges the attribute rather than guessing from the subject, and with mild blur, noise and contrast
changes so that it keeps working on the softer pictures a diffusion model draws.

Train it (seven minutes on one core of a busy two-core machine, rendering included) and measure it on fresh renders, of the detector's own
scenes (attributes on any class) or of the world's:

    python -m safetext.miniworld.detector --train
    python -m safetext.miniworld.detector --evaluate --num-images 2000 --seed 7 --scenes detector
    python -m safetext.miniworld.detector --evaluate --num-images 2000 --seed 8 --scenes world

The weights ship as `weights/detector.safetensors`, whose metadata entry `detector` holds the labels and the
architecture as JSON.
"""

import argparse
import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

import safetext
from safetext.evaluation.detectors import Detection
from safetext.miniworld.renderer import IMAGE_SIZE, render, to_pixel_values
from safetext.miniworld.scenes import SceneDistribution, sample_scene
from safetext.miniworld.world import ATTRIBUTE_NAMES, CLASS_NAMES, RESTRICTED_CONCEPTS
from safetext.provenance import device_description, git_commit, package_versions, peak_memory_bytes

logger = logging.getLogger(__name__)

LABELS = CLASS_NAMES + ATTRIBUTE_NAMES
"""What the detector reports on: the object classes, then the attributes."""

WEIGHTS_PATH = Path(__file__).with_name("weights") / "detector.safetensors"
DETECTOR_NAME = "miniworld-detector"

DETECTOR_SCENES = SceneDistribution(pattern_rate=0.5, headwear_rate=0.4, attributes_on_any_class=True)
"""The scenes the detector trains on: attributes more often than in the world, and on any class."""

EVALUATION_SCENES = {"detector": DETECTOR_SCENES, "world": SceneDistribution()}
"""Scene distributions the detector can be measured on: its own (the harder one) and the world's."""


class DetectorNet(nn.Module):
    """A space-to-depth stem, four 3x3 conv blocks (conv, batch norm, ReLU; 2x max-pool after the first two),
    global average and max pooling, and a linear layer to one logit per label.

    Args:
        num_labels: number of outputs.
        channels: widths of the four conv blocks.
    """

    def __init__(self, num_labels: int, channels: Sequence[int] = (32, 48, 64, 96)):
        super().__init__()
        # space-to-depth: each 2x2 block of pixels becomes 12 channels, so the first conv sees a 6x6 window at
        # half resolution; fine stripes and dots survive, and the costly full-resolution activations are gone
        blocks, width = [nn.PixelUnshuffle(2)], 12
        for i, out in enumerate(channels):
            blocks += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i < 2:
                blocks.append(nn.MaxPool2d(2))
            width = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * width, num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Maps images in [-1, 1], shape (N, 3, 64, 64), to logits of shape (N, num_labels)."""
        features = self.features(pixel_values)
        # max pooling keeps a small object's evidence that averaging over the picture would dilute
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


def render_labelled(
    num_images: int, seed: int, distribution: SceneDistribution = DETECTOR_SCENES
) -> tuple[np.ndarray, np.ndarray]:
    """Renders fresh scenes with their multi-hot labels.

    Args:
        num_images: how many pictures.
        seed: seed of the scene stream; different seeds give different pictures.
        distribution: the scenes to draw from.

    Returns:
        `(images, targets)`: uint8 array (N, 64, 64, 3) and float32 array (N, len(LABELS)).
    """
    rng = random.Random(seed)
    images = np.empty((num_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    targets = np.zeros((num_images, len(LABELS)), dtype=np.float32)
    for i in range(num_images):
        scene = sample_scene(rng, distribution)
        images[i] = np.asarray(render(scene))
        for name in scene.object_classes() | scene.attributes():
            targets[i, LABELS.index(name)] = 1.0
    return images, targets


def _augment(pixel_values: torch.Tensor, noise_bank: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = pixel_values.shape[0]
    pixel_values = pixel_values.clone()
    # left and right carry no label, so a mirrored picture is as true as the original
    flip = torch.rand(n, generator=generator) < 0.5
    pixel_values[flip] = pixel_values[flip].flip(3)
    # a diffusion model's pictures are softer than renders: blur a third of the batch a little
    soft = torch.rand(n, generator=generator) < 0.3
    if soft.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        chosen = pixel_values[soft]
        blurred = F.conv2d(F.pad(chosen, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        amount = torch.rand(len(chosen), 1, 1, 1, generator=generator)
        pixel_values[soft] = chosen + amount * (blurred - chosen)
    # contrast, brightness and sensor noise in one pass; the noise comes from a fixed bank, drawing fresh
    # Gaussian noise for every picture would cost as much as the network's own step
    contrast = 0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=generator)
    brightness = 0.2 * torch.rand(n, 1, 1, 1, generator=generator) - 0.1
    noise = noise_bank[torch.randint(len(noise_bank), (n,), generator=generator)]
    scale = 0.06 * torch.rand(n, 1, 1, 1, generator=generator)
    return (pixel_values * contrast + brightness + noise * scale).clamp_(-1.0, 1.0)


@dataclass
class TrainDetectorConfig:
    """How the detector is trained.

    Args:
        num_train_images: fresh renders to train on.
        num_epochs: passes over them.
        train_batch_size: pictures per step.
        learning_rate: peak learning rate of AdamW (one-cycle: warm-up over the first 15% of steps, then a cosine
            decay).
        weight_decay: AdamW weight decay.
        channels: widths of the four conv blocks.
        seed: seed of the training scenes, of the initialisation and of the augmentation; evaluation uses others.
        num_threads: torch CPU threads. One is the default: on a shared two-core machine a second thread spends
            more time waiting for a busy core than it saves.
        output_path: where the safetensors file is written.
    """

    num_train_images: int = 20000
    num_epochs: int = 10
    train_batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    channels: tuple[int, ...] = (32, 48, 64, 96)
    seed: int = 0
    num_threads: int = 1
    output_path: str = field(default=str(WEIGHTS_PATH))

    def __post_init__(self):
        for name in ("num_train_images", "num_epochs", "train_batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise ValueError(f"channels must be four positive widths, got {self.channels}")


def _provenance() -> dict:
    cpu = torch.device("cpu")
    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "device": device_description(cpu),
        "peak_memory": peak_memory_bytes(cpu),
    }


def train_detector(config: TrainDetectorConfig | None = None) -> dict:
    """Trains the detector on fresh renders and writes its weights as safetensors.

    Args:
        config: the training settings; the shipped detector's by default.

    Returns:
        A self-describing record: config, final training loss, wall time, sha256 of the weights, provenance
        (package versions, git commit, device, peak memory).
    """
    from safetensors.torch import save_file

    config = config or TrainDetectorConfig()
    start = time.time()
    torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    logger.info("rendering %d training pictures", config.num_train_images)
    images, targets = render_labelled(config.num_train_images, config.seed)
    images, targets = torch.from_numpy(images), torch.from_numpy(targets)

    noise_bank = torch.randn((256, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    model = DetectorNet(len(LABELS), config.channels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = config.num_train_images // config.train_batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.num_epochs * steps_per_epoch, pct_start=0.15
    )
    model.train()
    loss = torch.tensor(0.0)
    progress = tqdm(total=config.num_epochs * steps_per_epoch, desc="detector", disable=None)
    for epoch in range(config.num_epochs):
        order = torch.randperm(config.num_train_images, generator=generator)
        running = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * config.train_batch_size : (step + 1) * config.train_batch_size]
            pixel_values = _augment(to_pixel_values(images[batch].numpy()), noise_bank, generator)
            loss = F.binary_cross_entropy_with_logits(model(pixel_values), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()
            progress.update()
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
        logger.info("epoch %d: mean loss %.4f", epoch, running / steps_per_epoch)
    progress.close()

    model.eval()
    output_path = Path(config.output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # half precision halves the shipped file; the detector computes in float32 after loading
    state = {
        k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype) for k, v in model.state_dict().items()
    }
    # a single metadata entry: safetensors writes a map's entries in no fixed order, so several entries would give
    # identical runs files with different bytes, and different sha256s in the result records
    description = {"name": DETECTOR_NAME, "labels": list(LABELS), "channels": list(config.channels)}
    save_file(state, str(output_path), metadata={"detector": json.dumps(description, sort_keys=True)})
    return {
        "config": asdict(config),
        "final_loss": float(loss.item()),
        "wall_time_s": round(time.time() - start, 1),
        "weights_sha256": hashlib.sha256(output_path.read_bytes()).hexdigest(),
        "provenance": _provenance(),
    }


class MiniWorldDetector:
    """The trained MiniWorld detector, behind the evaluation's `Detector` protocol.

    It judges whole pictures, so each `Detection` it reports has the whole picture as its box.

    Args:
        weights_path: a safetensors file written by `train_detector`; the shipped weights by default.
        threshold: the probability from which a label counts as detected.
        classes: the labels `detect` reports (all of them by default), e.g. `RESTRICTED_CONCEPTS` for the
            restricted-concept rate, as NudeNet is restricted to its exposed classes.

    Raises:
        ValueError: if the threshold is outside (0, 1) or a class is not one of the detector's labels.
        FileNotFoundError: if the weights file does not exist.
    """

    def __init__(
        self, weights_path: str | Path | None = None, threshold: float = 0.5, classes: Sequence[str] | None = None
    ):
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self.weights_path = Path(weights_path) if weights_path is not None else WEIGHTS_PATH
        if not self.weights_path.is_file():
            raise FileNotFoundError(f"no detector weights at {self.weights_path}")
        with safe_open(str(self.weights_path), framework="pt") as f:
            description = json.loads(f.metadata()["detector"])
        self.labels = tuple(description["labels"])
        if classes is not None and (isinstance(classes, str) or not set(classes) <= set(self.labels) or not classes):
            raise ValueError(f"classes must be a non-empty selection of {self.labels}, got {classes!r}")
        self.threshold = threshold
        self.classes = tuple(classes) if classes is not None else self.labels
        self.model = DetectorNet(len(self.labels), description["channels"])
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(self.weights_path)).items()}
        self.model.load_state_dict(state)
        self.model.eval()
        self.model_sha256 = hashlib.sha256(self.weights_path.read_bytes()).hexdigest()

    def settings(self) -> dict[str, Any]:
        """What decided the detections, for the result record: `name`, `package_version`, `model_file`,
        `model_sha256`, `threshold`, `classes` (the labels reported), `labels` (all outputs) and
        `restricted_concepts`."""
        return {
            "name": DETECTOR_NAME,
            "package_version": safetext.__version__,
            "model_file": self.weights_path.name,
            "model_sha256": self.model_sha256,
            "threshold": self.threshold,
            "classes": list(self.classes),
            "labels": list(self.labels),
            "restricted_concepts": [label for label in self.labels if label in RESTRICTED_CONCEPTS],
        }

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        """Probabilities of every label for every picture.

        Args:
            images: PIL images (converted to RGB and resized to 64x64 if needed) or a uint8 array of shape
                (N, 64, 64, 3).

        Returns:
            Float array (N, len(labels)), columns in the order of `labels`.
        """
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or images.dtype != np.uint8:
                raise ValueError(f"expected a uint8 array of shape (N, 64, 64, 3), got {images.dtype} {images.shape}")
            array = images
        elif len(images) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        else:
            array = np.stack(
                [np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)) for image in images]
            )
        probabilities = [
            torch.sigmoid(self.model(to_pixel_values(array[i : i + 256]))) for i in range(0, len(array), 256)
        ]
        return torch.cat(probabilities).numpy() if probabilities else np.zeros((0, len(self.labels)), np.float32)

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """What each picture shows: the labels in `classes` whose probability reaches the threshold.

        Args:
            images: PIL images of any size and mode.

        Returns:
            For each picture in order, its `Detection`s, most certain first, each boxed as the whole picture;
            an empty list means the picture shows none of `classes`.
        """
        detections = []
        for image, row in zip(images, self.scores(images)):
            box = (0, 0, image.width, image.height)
            found = [
                Detection(label=label, score=float(row[j]), box=box)
                for j, label in enumerate(self.labels)
                if label in self.classes and row[j] >= self.threshold
            ]
            detections.append(sorted(found, key=lambda detection: detection.score, reverse=True))
        return detections


def evaluate_detector(
    detector: MiniWorldDetector, num_images: int = 2000, seed: int = 7, scenes: str = "detector"
) -> dict:
    """Measures the detector on fresh renders.

    Args:
        detector: the detector to measure.
        num_images: how many pictures.
        seed: seed of the scenes; the shipped detector trained on seed 0, so any other seed gives unseen pictures.
        scenes: `"detector"` (attributes on any class, as in training) or `"world"` (the world's own scenes).

    Raises:
        ValueError: if `scenes` is unknown.

    Returns:
        A self-describing record with, per label, accuracy (share of pictures where presence is judged right),
        recall, precision and prevalence, and the lowest accuracy over all labels.
    """
    if scenes not in EVALUATION_SCENES:
        raise ValueError(f"scenes must be one of {tuple(EVALUATION_SCENES)}, got {scenes!r}")
    start = time.time()
    images, targets = render_labelled(num_images, seed, EVALUATION_SCENES[scenes])
    predicted = detector.scores(images) >= detector.threshold
    present = targets.astype(bool)
    per_label = {}
    for j, label in enumerate(detector.labels):
        hits = int((predicted[:, j] & present[:, j]).sum())
        per_label[label] = {
            "accuracy": float((predicted[:, j] == present[:, j]).mean()),
            "recall": hits / max(int(present[:, j].sum()), 1),
            "precision": hits / max(int(predicted[:, j].sum()), 1),
            "prevalence": float(present[:, j].mean()),
        }
    return {
        "detector": detector.settings(),
        "data": {"scenes": scenes, "num_images": num_images, "seed": seed},
        "per_label": per_label,
        "min_accuracy": min(m["accuracy"] for m in per_label.values()),
        "wall_time_s": round(time.time() - start, 1),
        "provenance": _provenance(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train or measure the MiniWorld detector.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--train", action="store_true", help="train on fresh renders and write the weights")
    action.add_argument("--evaluate", action="store_true", help="measure per-label accuracy on fresh renders")
    parser.add_argument("--weights", default=str(WEIGHTS_PATH), help="safetensors file to write or read")
    parser.add_argument("--num-images", type=int, default=2000, help="pictures to evaluate on")
    parser.add_argument("--seed", type=int, default=7, help="seed of the evaluation scenes (training uses 0)")
    parser.add_argument("--scenes", choices=tuple(EVALUATION_SCENES), default="detector", help="scenes to evaluate on")
    parser.add_argument("--output", help="also write the JSON record to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.train:
        record = train_detector(TrainDetectorConfig(output_path=args.weights))
    else:
        torch.set_num_threads(1)
        record = evaluate_detector(
            MiniWorldDetector(args.weights), num_images=args.num_images, seed=args.seed, scenes=args.scenes
        )
    text = json.dumps(record, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
