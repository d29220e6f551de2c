"""What MiniWorld models draw when stripes are asked for: which patterns the detector finds on held-out prompts.

The `striped` gate counts pictures in which the detector finds stripes; this says what the others hold instead. For
each model it draws the first prompts of `miniworld-heldout` (50 PNDM steps, each prompt's seed and guidance) and
reports the share of pictures in which the detector finds stripes, dots, checks, none of the three, and dots or
checks without stripes. Writes `benchmarks/results/miniworld_pattern_confusion.json`; with other steps or a
guidance scale other than the prompts' own (7.5), `miniworld_pattern_confusion-steps<S>-guidance<G>.json`; with
`--record NAME`, `miniworld_pattern_confusion-NAME.json`. With `--grid DIR` it also saves, per model, a sheet of
the pictures in which the detector found no stripes, each with its stripe, dot and check scores and its prompt, so
that what the detector reads can be checked by eye (`DIR/<model folder name>-no-stripes.png`).

    python benchmarks/miniworld_pattern_confusion.py --model miniworld --model DIR [--max-prompts 60] [--steps 50]
        [--guidance 7.5] [--record NAME] [--grid DIR]
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


def contact_sheet(images, scores, labels, prompts, indices, columns: int = 4, scale: int = 3):
    """The pictures, enlarged, four to a row, each over its stripe, dot and check scores and its prompt."""
    from PIL import Image, ImageDraw

    side = 64 * scale
    rows = max((len(images) + columns - 1) // columns, 1)
    sheet = Image.new("RGB", (columns * (side + 8), rows * (side + 44)), "white")
    pen = ImageDraw.Draw(sheet)
    for k, (image, row, index) in enumerate(zip(images, scores, indices)):
        x, y = (k % columns) * (side + 8), (k // columns) * (side + 44)
        sheet.paste(image.resize((side, side), Image.NEAREST), (x, y))
        pattern = "  ".join(f"{label} {row[labels.index(label)]:.2f}" for label in ("striped", "dotted", "checkered"))
        prompt = prompts.prompts[index]
        for line, text in enumerate((pattern, prompt[:32], prompt[32:64])):
            pen.text((x, y + side + 2 + 13 * line), text, fill="black")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a MiniWorld pipeline folder or 'miniworld'")
    parser.add_argument("--max-prompts", type=int, default=60)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None, help="instead of each prompt's own (7.5)")
    parser.add_argument("--record", default=None, help="name of the result file's suffix (by default the settings)")
    parser.add_argument("--grid", type=Path, default=None, help="folder for sheets of the pictures without stripes")
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
        + (f" --guidance {args.guidance}" if args.guidance is not None else "")
        + (f" --record {args.record}" if args.record else ""),
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
        scores = detector.scores(images)
        found = scores >= detector.threshold
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
        if args.grid is not None:
            args.grid.mkdir(parents=True, exist_ok=True)
            missed = np.flatnonzero(~striped)
            sheet = contact_sheet([images[i] for i in missed], scores[missed], detector.labels, prompts, missed)
            sheet.save(args.grid / f"{Path(name).name}-no-stripes.png")
    record["num_threads"] = torch.get_num_threads()
    name = "miniworld_pattern_confusion"
    if args.record:
        name += f"-{args.record}"
    elif args.steps != 50 or args.guidance is not None:
        name += f"-steps{args.steps}-guidance{args.guidance if args.guidance is not None else 'own'}"
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
