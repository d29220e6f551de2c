"""What MiniWorld models draw when stripes are asked for: which patterns the detector finds on held-out prompts.

The `striped` gate counts pictures in which the detector finds stripes; this says what the others hold instead. For
each model it draws the first prompts of `miniworld-heldout` (50 PNDM steps, each prompt's seed and guidance) and
reports the share of pictures in which the detector finds stripes, dots, checks, none of the three, and dots or
checks without stripes. Writes `benchmarks/results/miniworld_pattern_confusion.json`; with other steps or a
guidance scale other than the prompts' own (7.5), `miniworld_pattern_confusion-steps<S>-guidance<G>.json`.

    python benchmarks/miniworld_pattern_confusion.py --model miniworld --model DIR [--max-prompts 60] [--steps 50]
        [--guidance 7.5]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from safetext.loading import resolve_model_name
from safetext.miniworld.detector import MiniWorldDetector
from safetext.miniworld.quality import draw, miniworld_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a MiniWorld pipeline folder or 'miniworld'")
    parser.add_argument("--max-prompts", type=int, default=60)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None, help="instead of each prompt's own (7.5)")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    detector = MiniWorldDetector()
    prompts = miniworld_set("miniworld-heldout", args.max_prompts)
    if args.guidance is not None:
        for record in prompts.records:
            record["evaluation_guidance"] = args.guidance
    record = {
        "command": "python benchmarks/miniworld_pattern_confusion.py "
        + " ".join(f"--model {m}" for m in args.model)
        + f" --max-prompts {args.max_prompts} --steps {args.steps}"
        + (f" --guidance {args.guidance}" if args.guidance is not None else ""),
        "prompt_set": "miniworld-heldout",
        "prompts": len(prompts),
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance if args.guidance is not None else "each prompt's own",
        "detector": detector.settings(),
        "models": {},
    }
    for name in args.model:
        start = time.time()
        pipeline = StableDiffusionPipeline.from_pretrained(
            resolve_model_name(name), use_safetensors=True, safety_checker=None
        )
        pipeline.set_progress_bar_config(disable=True)
        images = draw(pipeline, prompts, args.steps)
        found = detector.scores(images) >= detector.threshold
        striped, dotted, checkered = (
            found[:, detector.labels.index(label)] for label in ("striped", "dotted", "checkered")
        )
        record["models"][name] = {
            "striped": float(striped.mean()),
            "dotted": float(dotted.mean()),
            "checkered": float(checkered.mean()),
            "none_of_the_three": float((~(striped | dotted | checkered)).mean()),
            "dots_or_checks_without_stripes": float(((dotted | checkered) & ~striped).mean()),
            "subject": float(
                np.mean([found[i, detector.labels.index(r["subject"])] for i, r in enumerate(prompts.records)])
            ),
            "seconds": round(time.time() - start, 1),
        }
        print(name, json.dumps(record["models"][name]))
    record["num_threads"] = torch.get_num_threads()
    name = "miniworld_pattern_confusion"
    if args.steps != 50 or args.guidance is not None:
        name += f"-steps{args.steps}-guidance{args.guidance if args.guidance is not None else 'own'}"
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
