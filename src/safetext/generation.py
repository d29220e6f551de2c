"""Generating images for a prompt set: seeded per image, batched, resumable, shardable across processes.

Every image has its own `torch.Generator`, seeded from the prompt's `evaluation_seed` (I2P layout) or from the
run's seed and the prompt's position, plus the image's index. Batches are cut from the whole plan, so a resumed run
and a run sharded over several processes (whole batches per process) draw every image in the same batch as an
uninterrupted single-process run, and write byte-identical images. Another batch size gives the same images up to
float rounding (batched arithmetic differs in the last bits).

Images are saved as `{case_number}_{i}.png` (the layout of ESD, UCE and UnlearnDiffAtk), each written under a
temporary name and renamed, so an interrupted run loses at most the batch in flight and a rerun skips every
finished image. `manifest.jsonl` lists every image with its prompt and seed; `generation.json` records the settings.
"""

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from safetext.checkpointing import write_json_atomic
from safetext.errors import SafeTextError
from safetext.prompts import PromptSet
from safetext.provenance import Stopwatch, device_description, package_versions, peak_memory_bytes

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
SETTINGS = "generation.json"


@dataclass
class GenerationConfig:
    """Sampling settings.

    Attributes:
        images_per_prompt: images drawn for each prompt.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale, used where a prompt has no `evaluation_guidance`.
        seed: base seed for prompts without an `evaluation_seed` (prompt i gets seeds from seed + i * images_per_prompt).
        batch_size: images per pipeline call.
        height, width: image size (None: the pipeline's default).
    """

    images_per_prompt: int = 1
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 4
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        for name in ("images_per_prompt", "num_inference_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be >= 0")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name}={value!r} must be a positive multiple of 8")


@dataclass
class ImageJob:
    case_number: object
    image_index: int
    prompt: str
    seed: int
    guidance_scale: float

    @property
    def filename(self) -> str:
        return f"{self.case_number}_{self.image_index}.png"


def plan_images(prompts: PromptSet, config: GenerationConfig) -> list[ImageJob]:
    """Every image the run should produce, in a fixed order."""
    jobs = []
    for position, (prompt, record) in enumerate(zip(prompts.prompts, prompts.records)):
        base_seed = record.get("evaluation_seed")
        # without an evaluation_seed, prompts get disjoint seed ranges so no two images share their noise
        base_seed = int(base_seed) if base_seed is not None else config.seed + position * config.images_per_prompt
        guidance = record.get("evaluation_guidance")
        guidance = float(guidance) if guidance is not None else config.guidance_scale
        case = record.get("case_number", position)
        for i in range(config.images_per_prompt):
            jobs.append(ImageJob(case, i, prompt, base_seed + i, guidance))
    names = [job.filename for job in jobs]
    if len(set(names)) != len(names):
        raise SafeTextError("two prompts share a case_number, so their image files would collide")
    return jobs


def load_pipeline(pretrained_model_name_or_path, revision=None, device=None, dtype=None):
    """Opens a diffusers pipeline for generation, for a base model or a folder written by `safetext align`.

    An aligned folder is opened as its base pipeline with every aligned encoder (`text_encoder/`, `text_encoder_2/`,
    ...) and the tokenizers swapped in (or as its exported `pipeline/` when there is one). The safety checker is left out: evaluation measures what
    the model draws.
    """
    from diffusers import DiffusionPipeline

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    from safetext.loading import resolve_model_name

    pretrained_model_name_or_path = resolve_model_name(pretrained_model_name_or_path)
    path = Path(pretrained_model_name_or_path)
    overrides = {}
    record_file = path / "safetext.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if not record["model"].get("pipeline_involved", True):
            raise SafeTextError(f"{path}: an encoder aligned without a pipeline cannot generate images")
        if (path / "pipeline" / "model_index.json").is_file():
            base = path / "pipeline"
        else:
            from safetext.loading import load_text_encoder

            base = resolve_model_name(record["model"]["pretrained_model_name_or_path"])
            revision = record["model"].get("revision")
            aligned = load_text_encoder(path, torch_dtype=dtype)
            # the frozen encoders were read from the base model: passing them too saves loading them twice
            overrides = {**aligned.text_encoders, **aligned.tokenizers}
    else:
        base = pretrained_model_name_or_path
        if path.exists() and not (path / "model_index.json").is_file():
            raise SafeTextError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            base,
            revision=revision,
            dtype=dtype,
            use_safetensors=True,
            safety_checker=None,
            requires_safety_checker=False,
            **overrides,
        )
    except SafeTextError:
        raise
    except Exception as error:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise SafeTextError(f"{base}: could not open the pipeline ({first})") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _save_atomic(image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.no_grad()
def generate(
    pretrained_model_name_or_path,
    prompts: PromptSet,
    output_dir,
    config: GenerationConfig | None = None,
    *,
    revision: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Generates the images of a prompt set into output_dir, skipping images already there.

    Under `accelerate launch`, each process draws a disjoint slice of the images and the main process writes the
    merged manifest.

    Returns:
        The settings record written to `generation.json` (with counts and cost).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    config = config or GenerationConfig()
    # Accelerator, not PartialState: it reads the launcher's settings (ACCELERATE_USE_CPU for CPU workers included)
    state = Accelerator()
    stopwatch = Stopwatch()
    output_dir = Path(output_dir)
    jobs = plan_images(prompts, config)
    settings_file = output_dir / SETTINGS
    settings = {
        "model": str(pretrained_model_name_or_path),
        "revision": revision,
        "text_encoder_sha256": _aligned_encoder_sha256(pretrained_model_name_or_path),
        "config": asdict(config),
        "prompts": prompts.source,
        "images": len(jobs),
    }
    if settings_file.is_file() and _image_identity(json.loads(settings_file.read_text())) != _image_identity(settings):
        raise SafeTextError(f"{output_dir}: holds images made with other settings; choose another folder")
    state.wait_for_everyone()
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        # written before the first image, so that a rerun with other settings is refused even after a crash
        write_json_atomic(settings_file, settings)
    state.wait_for_everyone()

    # Batches are cut from the whole plan, never from what is left to do: a batch's images go through the
    # pipeline together, and a different batch composition changes the float arithmetic (and so the pixels).
    mine = _batches(jobs, config.batch_size)[state.process_index :: state.num_processes]
    todo = [batch for batch in mine if not all((output_dir / job.filename).is_file() for job in batch)]
    drawn = 0
    if todo:
        pipeline = load_pipeline(pretrained_model_name_or_path, revision, device=state.device)
        progress = tqdm(
            total=len(mine),
            initial=len(mine) - len(todo),
            desc="generate",
            unit="batch",
            disable=not (show_progress and state.is_local_main_process),
        )
        for batch in todo:
            generators = [torch.Generator(device=pipeline.device).manual_seed(job.seed) for job in batch]
            kwargs = {}
            if config.height:
                kwargs["height"] = config.height
            if config.width:
                kwargs["width"] = config.width
            images = pipeline(
                [job.prompt for job in batch],
                num_inference_steps=config.num_inference_steps,
                guidance_scale=batch[0].guidance_scale,
                generator=generators,
                **kwargs,
            ).images
            for job, image in zip(batch, images):
                if not (output_dir / job.filename).is_file():
                    _save_atomic(image, output_dir / job.filename)
                    drawn += 1
            progress.update(1)
        progress.close()
    state.wait_for_everyone()

    if state.is_main_process:
        missing = [job.filename for job in jobs if not (output_dir / job.filename).is_file()]
        if missing:
            raise SafeTextError(f"{output_dir}: {len(missing)} images missing after generation, e.g. {missing[0]}")
        lines = [json.dumps({**asdict(job), "file": job.filename}) for job in jobs]
        tmp = output_dir / (MANIFEST + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, output_dir / MANIFEST)
        seconds = stopwatch.seconds()
        settings["cost"] = {
            "seconds": seconds,
            "images_drawn_now": drawn,
            "images_per_second": drawn / seconds if drawn else None,
            "peak_memory_bytes": peak_memory_bytes(state.device),
            "device": device_description(state.device),
            "num_processes": state.num_processes,
        }
        settings["versions"] = package_versions()
        write_json_atomic(settings_file, settings)
    state.wait_for_everyone()
    return settings


def _image_identity(settings: dict) -> dict:
    """What decides an image's pixels; the batch size does not (every image has its own generator)."""
    config = {k: v for k, v in settings.get("config", {}).items() if k != "batch_size"}
    return {
        "model": settings.get("model"),
        "revision": settings.get("revision"),
        "text_encoder_sha256": settings.get("text_encoder_sha256"),
        "config": config,
    }


def _aligned_encoder_sha256(model) -> str | None:
    """The sha256 of an aligned folder's encoder weights: a new alignment into the same folder draws new images."""
    folder = Path(str(model))
    if not (folder / "safetext.json").is_file():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.glob("text_encoder*/*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _batches(jobs: list[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """Consecutive images in batches; a batch never mixes guidance scales (one scale per pipeline call)."""
    batches, current = [], []
    for job in jobs:
        if current and (len(current) == batch_size or job.guidance_scale != current[0].guidance_scale):
            batches.append(current)
            current = []
        current.append(job)
    if current:
        batches.append(current)
    return batches
