"""Does a cheaper way to train MiniWorld's autoencoder reach the shipped one's ceiling, and how much faster is it?

Trains the recipe's autoencoder stage (`BuildConfig().autoencoder` with the build's seed: its widths, batch, steps,
pool and losses) with the asked changes, `--crop-size 32` (train on 32x32 crops) and/or `--mixed-precision bf16`,
over the recipe's whole schedule unless `--steps` shortens it. Then it measures the gates' ceiling (detector recall
on reconstructions of fresh renders, `quality.autoencoder_ceiling`) of the new autoencoder and of the shipped
model's, on the same renders, and times a few steps of the recipe's own autoencoder stage in the same run for the
speed ratio. `--keep DIR` writes the trained stage as a build's `stages/autoencoder` folder (with its `stage.json`),
so that a UNet stage can be trained on it through the build's resume path.

Prints the ceiling per label for both, and, as its last line, `speedup=<x> striped_ceiling=<new> (shipped <y>)`;
writes `benchmarks/results/miniworld_autoencoder-<changes>.json`.

    python benchmarks/miniworld_autoencoder_variant.py [--crop-size 32] [--mixed-precision bf16] [--steps 5000]
        [--num-images 1200] [--keep DIR]
"""

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from safetext.miniworld.autoencoder_training import train_autoencoder
from safetext.miniworld.build import STAGE_RECORD, BuildConfig
from safetext.miniworld.detector import MiniWorldDetector
from safetext.miniworld.model import MODEL_DIR
from safetext.miniworld.quality import autoencoder_ceiling
from safetext.provenance import device_description

REFERENCE_STEPS = 5
"""Steps of the recipe's own autoencoder stage timed in the same run, for the speed ratio."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop-size", type=int, help="train on square crops of this side (a multiple of 4, 32-64)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    parser.add_argument("--num-images", type=int, default=1200, help="fresh renders the ceilings are measured on")
    parser.add_argument("--keep", help="folder to write the trained stage to, as a build's stages/autoencoder")
    args = parser.parse_args()
    recipe = BuildConfig()
    stage = replace(recipe.autoencoder, seed=recipe.seed + 1)
    try:
        variant = replace(stage, crop_size=args.crop_size, mixed_precision=args.mixed_precision)
        if args.steps is not None:
            # each picture used about as often as in the recipe
            ratio = stage.num_pictures / stage.max_train_steps
            variant = replace(
                variant,
                max_train_steps=args.steps,
                lr_warmup_steps=min(stage.lr_warmup_steps, args.steps // 10),
                num_pictures=max(int(ratio * args.steps), stage.train_batch_size),
            )
    except ValueError as error:
        parser.error(str(error))
    if args.num_images < 1:
        parser.error(f"--num-images must be at least 1, got {args.num_images}")
    keep = Path(args.keep) if args.keep else None
    if keep is not None and keep.exists():
        parser.error(f"--keep {keep} already exists")
    changes = [f"crop-{args.crop_size}"] if args.crop_size is not None else []
    changes += [args.mixed_precision] if args.mixed_precision != "no" else []
    changes += [f"steps-{args.steps}"] if args.steps is not None else []
    if not changes:
        parser.error("give at least one change from the recipe: --crop-size, --mixed-precision or --steps")

    detector = MiniWorldDetector()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        start = time.time()
        record = train_autoencoder(variant, folder / "variant")
        record["device"] = device_description(torch.device("cpu"))
        trained_seconds = time.time() - start
        short = {"max_train_steps": REFERENCE_STEPS, "lr_warmup_steps": 1, "num_pictures": 2 * stage.train_batch_size}
        reference = train_autoencoder(replace(stage, **short), folder / "recipe")["seconds_per_step"]
        ceilings = {
            "variant": autoencoder_ceiling(folder / "variant", detector, num_images=args.num_images),
            "shipped": autoencoder_ceiling(MODEL_DIR, detector, num_images=args.num_images),
        }
        record["ceiling"] = ceilings["variant"]
        if keep is not None:
            shutil.copytree(folder / "variant", keep)
            (keep / STAGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    speedup = reference / record["seconds_per_step"]
    recall = {name: ceiling["recall_reconstructed"] for name, ceiling in ceilings.items()}
    result = {
        "command": " ".join(["python benchmarks/miniworld_autoencoder_variant.py", *sys.argv[1:]]),
        "changes_from_recipe": changes,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "config": record["config"],
        "loss_first_10pct": record["loss_first_10pct"],
        "loss_last_10pct": record["loss_last_10pct"],
        "held_out_reconstruction_l1": record["held_out_reconstruction_l1"],
        "seconds_per_step": record["seconds_per_step"],
        "recipe_seconds_per_step": reference,
        "speedup_over_recipe": speedup,
        "projected_recipe_hours": reference * stage.max_train_steps / 3600,
        "stage_hours": trained_seconds / 3600,
        "ceiling": ceilings,
    }
    out = Path(__file__).parent / "results" / f"miniworld_autoencoder-{'-'.join(changes)}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'label':<12}{'variant':>9}{'shipped':>9}")
    for label in recall["shipped"]:
        print(f"{label:<12}{recall['variant'].get(label, float('nan')):>9.3f}{recall['shipped'][label]:>9.3f}")
    print(
        f"L1 on fresh renders: variant {ceilings['variant']['l1']:.4f}, shipped {ceilings['shipped']['l1']:.4f}; "
        f"{record['seconds_per_step']:.2f} s per step against the recipe's {reference:.2f}; "
        f"stage {trained_seconds / 60:.1f} min"
    )
    print(
        f"speedup={speedup:.2f} striped_ceiling={recall['variant']['striped']:.3f} "
        f"(shipped {recall['shipped']['striped']:.3f})"
    )


if __name__ == "__main__":
    main()
