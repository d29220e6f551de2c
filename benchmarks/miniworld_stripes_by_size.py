"""How often MiniWorld draws `striped` at each object size, where the stripes' period differs.

The renderer scales a pattern with its object but never below `renderer.PATTERN_MIN_PERIOD` (6 pixels): a small
object's stripes have a period of 6 pixels, a medium one's 6.3 and a large one's 9.1, while the autoencoder halves
the picture twice, so one latent cell covers 4 pixels and the finest period a 16x16 latent can hold is 8 pixels. If
the stripe gap comes from that, the rate should climb with size. For each size this draws single striped objects of
the classes that carry stripes, in random colours on random backgrounds, captioned by the world's own grammar (any
surface-form group, as the UNet was trained on; only captions that name the size), and reports the share in which
the detector finds stripes: on the renders themselves, on the autoencoder's reconstructions (the ceiling) and on
each model's drawings (50 PNDM steps, guidance 7.5, one seed per picture). Writes
`benchmarks/results/miniworld_stripes_by_size.json`, or with `--record NAME` `miniworld_stripes_by_size-NAME.json`.

    python benchmarks/miniworld_stripes_by_size.py --model miniworld [--model DIR] [--per-size 40] [--record NAME]
"""

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from safetext.errors import SafeTextError
from safetext.loading import resolve_model_name
from safetext.miniworld.captions import caption
from safetext.miniworld.detector import MiniWorldDetector
from safetext.miniworld.prompt_sets import EVALUATION_GUIDANCE
from safetext.miniworld.quality import draw, reconstruct
from safetext.miniworld.renderer import OBJECT_EXTENT, PATTERN_MIN_PERIOD, render_many
from safetext.miniworld.scenes import Scene, SceneObject
from safetext.miniworld.world import BACKGROUNDS, COLOURS, SIZES, get_attribute
from safetext.prompts import PromptSet

# the renderer's stripe period for an object of this extent (renderer._pattern_mask)
STRIPES_PER_EXTENT = 3.5


def striped_scenes(size: str, count: int, seed: int) -> tuple[list[Scene], PromptSet]:
    """Single striped objects of one size, and their captions, each seeded with its scene's seed."""
    rng = random.Random(f"{seed}-{size}")
    carriers = get_attribute("striped").carriers
    scenes, prompts, records = [], [], []
    for _ in range(count):
        thing = SceneObject(
            object_class=rng.choice(carriers),
            colour=rng.choice(sorted(COLOURS)),
            size=size,
            attributes=("striped",),
        )
        scene = Scene(background=rng.choice(sorted(BACKGROUNDS)), objects=(thing,), seed=rng.randrange(2**31))
        # the grammar sometimes leaves the size unsaid; only prompts that name it tell the model the size
        prompt = caption(scene, rng)
        while not any(word in prompt.lower().split() for word in SIZES[size]):
            prompt = caption(scene, rng)
        scenes.append(scene)
        prompts.append(prompt)
        records.append(
            {"case_number": len(records), "evaluation_seed": scene.seed, "evaluation_guidance": EVALUATION_GUIDANCE}
        )
    return scenes, PromptSet(prompts, records, source={"generated": "striped_scenes", "size": size, "seed": seed})


def parse_arguments(description: str, default_per_size: int) -> tuple[argparse.Namespace, dict, str]:
    """The command line the stripe benchmarks share: its arguments, the pipeline folder of each `--model` name, and
    the command as it is recorded. A bad value is one argparse error line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", action="append", required=True, help="a MiniWorld pipeline folder or 'miniworld'")
    parser.add_argument("--per-size", type=int, default=default_per_size, help="pictures per object size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--record",
        default=None,
        help="write benchmarks/results/<benchmark>-RECORD.json, keeping the default record as it is",
    )
    args = parser.parse_args()
    if args.per_size < 1:
        parser.error("--per-size must be at least 1")
    if args.record is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.record):
        parser.error("--record must be letters, digits, '.', '_' or '-'")
    folders = {}
    for name in args.model:
        try:
            folders[name] = resolve_model_name(name)
        except SafeTextError as error:
            parser.error(str(error))
        if not (Path(folders[name]) / "model_index.json").is_file():
            parser.error(f"{name} is not a pipeline folder (no model_index.json)")
    command = f"python benchmarks/{parser.prog} " + " ".join(f"--model {name}" for name in args.model)
    command += f" --per-size {args.per_size} --seed {args.seed}"
    return args, folders, command + ("" if args.record is None else f" --record {args.record}")


def record_path(stem: str, record: str | None) -> Path:
    """Where a stripe benchmark writes its record: `results/STEM.json`, or `results/STEM-RECORD.json`."""
    return Path(__file__).parent / "results" / (stem + ("" if record is None else f"-{record}") + ".json")


def main() -> None:
    args, folders, command = parse_arguments(__doc__.splitlines()[0], default_per_size=40)
    from diffusers import StableDiffusionPipeline

    detector = MiniWorldDetector()
    column = detector.labels.index("striped")

    def striped_share(images) -> float:
        return float((detector.scores(images)[:, column] >= detector.threshold).mean())

    sets = {size: striped_scenes(size, args.per_size, args.seed) for size in SIZES}
    record = {
        "command": command,
        "num_inference_steps": 50,
        "guidance_scale": EVALUATION_GUIDANCE,
        "detector": detector.settings(),
        "sizes": {
            size: {
                "stripe_period_px": max(OBJECT_EXTENT[size] / STRIPES_PER_EXTENT, PATTERN_MIN_PERIOD),
                "example_prompts": prompts.prompts[:3],
            }
            for size, (_, prompts) in sets.items()
        },
        "models": {},
    }
    renders = {size: render_many(scenes) for size, (scenes, _) in sets.items()}
    for size in SIZES:
        record["sizes"][size]["striped_in_renders"] = striped_share(renders[size])
    for name in args.model:
        start = time.time()
        pipeline = StableDiffusionPipeline.from_pretrained(folders[name], use_safetensors=True, safety_checker=None)
        pipeline.set_progress_bar_config(disable=True)
        rates = {}
        for size, (_, prompts) in sets.items():
            rates[size] = {
                "striped_in_reconstructions": striped_share(reconstruct(pipeline.vae, renders[size])),
                "striped_in_drawings": striped_share(draw(pipeline, prompts, num_inference_steps=50)),
            }
        record["models"][name] = {"by_size": rates, "seconds": round(time.time() - start, 1)}
        print(name, json.dumps(rates))
    record["num_threads"] = torch.get_num_threads()
    out = record_path("miniworld_stripes_by_size", args.record)
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
