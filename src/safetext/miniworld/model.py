"""MiniWorld's shipped text-to-image model: where its pipeline folder lives inside the package, and its model card.

The folder is a Stable Diffusion pipeline written by `safetext.miniworld.build` (weights in float16 safetensors,
configs in float32) plus `build.json` (the build's record) and `quality.json` (the quality gates, measured by
`safetext miniworld quality`). Every command that takes a model accepts the name `miniworld` for it.
"""

import json
from pathlib import Path

from safetext.miniworld.scenes import SceneDistribution

MODEL_DIR = Path(__file__).with_name("weights") / "pipeline"
"""The shipped pipeline folder; `StableDiffusionPipeline.from_pretrained(MODEL_DIR)` opens it."""

MODEL_CARD = "README.md"


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _device_name(device: dict | None) -> str:
    if device is None:  # records written before stages recorded their device
        return "not recorded"
    if device["type"] == "cuda":
        return device.get("name", "a CUDA GPU")
    return f"{device['type'].upper()}, {device['cpu_threads']} thread(s)"


def _schedule(config: dict) -> str:
    """A stage's steps x batch, and the crops, precision and share of patterned objects it trained with where they
    are not the defaults."""
    text = f"{config['max_train_steps']} x {config['train_batch_size']}"
    if config.get("crop_size"):
        text += f" on {config['crop_size']}x{config['crop_size']} crops"
    if config.get("mixed_precision", "no") != "no":
        text += f", {config['mixed_precision']} autocast"
    if config.get("pattern_rate", SceneDistribution.pattern_rate) != SceneDistribution.pattern_rate:
        text += f", patterns on {config['pattern_rate']:.0%} of carriers"
    return text


def write_model_card(pipeline_dir: str | Path) -> Path:
    """Writes `README.md` of a MiniWorld pipeline folder from its `build.json` and, when present, `quality.json`.

    Returns:
        The model card's path.
    """
    pipeline_dir = Path(pipeline_dir)
    build = json.loads((pipeline_dir / "build.json").read_text())
    quality_file = pipeline_dir / "quality.json"
    quality = json.loads(quality_file.read_text()) if quality_file.is_file() else None
    stages = build["stages"]
    lines = [
        "---",
        "library_name: diffusers",
        "license: apache-2.0",
        "tags: [text-to-image, stable-diffusion, safetext, miniworld, synthetic]",
        "---",
        "",
        "# MiniWorld",
        "",
        "A small text-to-image model in Stable Diffusion v1's architecture (CLIP text encoder, `AutoencoderKL`, "
        "`UNet2DConditionModel`, PNDM scheduler), trained from scratch by `safetext miniworld build` on MiniWorld, "
        "a synthetic world of 64x64 scenes. It is the stage on which safetext's alignment, generation, evaluation "
        "and attacks are measured end to end on a CPU. Its restricted concept `striped` (and the second one, "
        "`crowned`) stands in for unsafe content; nothing it draws is harmful.",
        "",
        "## Build",
        "",
        "| stage | parameters | steps x batch | first 10% loss | last 10% loss | seconds | trained on |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, stage in stages.items():
        parameters = stage["parameters"]
        if isinstance(parameters, dict):  # the mini-CLIP stage counts its text and vision towers apart
            parameters = ", ".join(f"{tower} {count:,}" for tower, count in parameters.items())
        else:
            parameters = f"{parameters:,}"
        lines.append(
            f"| {name} | {parameters} | {_schedule(stage['config'])} | "
            f"{stage['loss_first_10pct']:.4f} | {stage['loss_last_10pct']:.4f} | {stage['wall_time_s']:.0f} | "
            f"{_device_name(stage.get('device'))} |"
        )
    machines = {_device_name(stage.get("device")) for stage in stages.values()}
    where = (
        f"on {build['provenance']['device']['platform']} ({build['provenance']['num_threads']} thread(s))"
        if len(machines) == 1
        else "summed over stages trained on different machines (see the table), so not one machine's time"
    )
    lines += [
        "",
        f"Wall time {build['wall_time_s']:.0f} s {where}; folder size {build['size_bytes'] / 1e6:.1f} MB; "
        f"seed {build['config']['seed']}. The full record is `build.json`.",
        "",
        f"The recipe's time budget is {build['config']['time_budget_s']:.0f} s on two CPU cores; this build "
        + ("kept to it." if build["within_time_budget"] else "went over it.")
        + (
            " Its GPU stages took less time than they take on two CPU cores."
            if any((stage.get("device") or {}).get("type") == "cuda" for stage in stages.values())
            else ""
        ),
        "",
        "## Quality gates",
        "",
    ]
    if quality is None:
        lines.append("Not measured yet: run `safetext miniworld quality --model DIR`.")
    else:
        lines += [
            "Measured by `" + quality["command"] + "`; the full record is `quality.json`.",
            "",
            "| gate | measured | required | passed |",
            "| --- | ---: | ---: | :---: |",
        ]
        for gate in quality["gates"]:
            lines.append(
                f"| {gate['name']} | {_percent(gate['value'])} | {_percent(gate['required'])} | "
                f"{'yes' if gate['passed'] else 'NO'} |"
            )
        unasked = quality.get("restricted_unasked")
        if unasked:
            lines += [
                "",
                f"Restricted concepts found unasked, on the prompts of `{unasked['set']}` that name the concept's "
                "subjects and no attribute (the floor under a removal rate's after-rate): "
                + ", ".join(
                    f"{concept} {_percent(entry['concept_present'])} of {entry['prompts']}"
                    for concept, entry in unasked["by_concept"].items()
                )
                + ".",
            ]
        ceiling = quality.get("autoencoder_ceiling")
        if ceiling:
            recall = ceiling["recall_reconstructed"]
            lines += [
                "",
                "The autoencoder's ceiling (detector recall on reconstructions of fresh renders; no UNet on this VAE "
                "can do better): " + ", ".join(f"{label} {_percent(value)}" for label, value in recall.items()) + ".",
            ]
        separation = quality.get("attribute_separation")
        if separation:
            pairs = {**separation["pairs"], **separation["reference"]}
            lines += [
                "",
                "How differently the text encoder reads the pattern words (cosine of the hidden states the UNet "
                'attends to, in "a {pattern} {noun}"; lower is further apart): '
                + ", ".join(f"{pair} {value:.2f}" for pair, value in pairs.items())
                + ".",
            ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "from safetext.miniworld.model import MODEL_DIR",
        "",
        "pipeline = StableDiffusionPipeline.from_pretrained(MODEL_DIR)",
        'image = pipeline("a red striped fish at the seaside", height=64, width=64).images[0]',
        "```",
        "",
        "or `safetext generate --model miniworld ...`, `safetext align --model miniworld ...`.",
        "",
    ]
    path = pipeline_dir / MODEL_CARD
    path.write_text("\n".join(lines))
    return path
