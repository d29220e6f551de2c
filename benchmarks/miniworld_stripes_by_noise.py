"""At which noise level MiniWorld's UNet loses the stripes of a striped object.

The shipped model draws `striped` in about 60% of pictures although its autoencoder keeps stripes in over 90% of
reconstructions. This asks where along the sampling path they go. Single striped objects are rendered (sizes,
classes, colours and captions as in `miniworld_stripes_by_size.py`), encoded, noised to a fraction `strength` of the
schedule and denoised from there with their caption (diffusers' `StableDiffusionImg2ImgPipeline`: guidance 7.5, one
seed per picture, DDIM over the strength's share of 50 steps), so that everything above that noise level is given
and everything below it is the UNet's work. Strength 1 starts from (almost) pure noise, as text-to-image does. DDIM,
not the pipeline's PNDM: PNDM's schedule repeats its first timestep for its warm-up, and img2img, which slices the
schedule, then runs every later step one step behind the latents' true noise level. For each strength it reports the
share of pictures in which the detector finds stripes, and the share in which it finds the object's class. If
stripes survive light noise but not heavy, the UNet fails to lay them out; if they are lost even from light noise,
it fails to finish them. Writes `benchmarks/results/miniworld_stripes_by_noise.json`, or with `--record NAME`
`miniworld_stripes_by_noise-NAME.json`.

    python benchmarks/miniworld_stripes_by_noise.py --model miniworld [--model DIR] [--per-size 20] [--seed 0]
        [--record NAME]
"""

import json
import time

import numpy as np
import torch
from PIL import Image

from miniworld_stripes_by_size import parse_arguments, record_path, striped_scenes
from safetext.miniworld.detector import MiniWorldDetector
from safetext.miniworld.prompt_sets import EVALUATION_GUIDANCE
from safetext.miniworld.renderer import render_many
from safetext.miniworld.world import SIZES
from safetext.prompts import PromptSet

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
STEPS = 50


def denoise_from(pipeline, renders: np.ndarray, prompts, strength: float, batch_size: int = 30) -> list:
    """Each render noised to `strength` of the schedule, then denoised with its prompt and seed."""
    images = []
    for start in range(0, len(prompts), batch_size):
        records = prompts.records[start : start + batch_size]
        images += pipeline(
            prompts.prompts[start : start + batch_size],
            image=[Image.fromarray(picture) for picture in renders[start : start + batch_size]],
            strength=strength,
            num_inference_steps=STEPS,
            guidance_scale=EVALUATION_GUIDANCE,
            generator=[torch.Generator().manual_seed(int(r["evaluation_seed"])) for r in records],
        ).images
    return images


def main() -> None:
    args, folders, command = parse_arguments(__doc__.splitlines()[0], default_per_size=20)
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    detector = MiniWorldDetector()
    sets = [striped_scenes(size, args.per_size, args.seed) for size in SIZES]
    scenes = [scene for scene_list, _ in sets for scene in scene_list]
    prompts = PromptSet(
        [prompt for _, size_set in sets for prompt in size_set.prompts],
        [row for _, size_set in sets for row in size_set.records],
        source={"generated": "striped_scenes", "sizes": list(SIZES), "seed": args.seed},
    )
    renders = render_many(scenes)
    stripes = detector.labels.index("striped")
    classes = np.array([detector.labels.index(scene.objects[0].object_class) for scene in scenes])

    def shares(images) -> dict:
        found = detector.scores(images) >= detector.threshold
        return {
            "striped": float(found[:, stripes].mean()),
            "subject": float(found[np.arange(len(images)), classes].mean()),
        }

    record = {
        "command": command,
        "pictures": len(scenes),
        "num_inference_steps": STEPS,
        "scheduler": "DDIMScheduler",
        "guidance_scale": EVALUATION_GUIDANCE,
        "detector": detector.settings(),
        "in_renders": shares(renders),
        "example_prompts": prompts.prompts[:3],
        "models": {},
    }
    print(f"renders: {record['in_renders']}")
    for name in args.model:
        start = time.time()
        pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(
            folders[name], use_safetensors=True, safety_checker=None
        )
        # clip_sample off, as in SD's own DDIM config: the scaled latents are not bounded to [-1, 1]
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False)
        pipeline.set_progress_bar_config(disable=True)
        by_strength = {}
        for strength in STRENGTHS:
            by_strength[str(strength)] = shares(denoise_from(pipeline, renders, prompts, strength))
            print(f"{name} strength {strength}: {by_strength[str(strength)]}", flush=True)
        record["models"][name] = {"by_strength": by_strength, "seconds": round(time.time() - start, 1)}
    record["num_threads"] = torch.get_num_threads()
    out = record_path("miniworld_stripes_by_noise", args.record)
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
