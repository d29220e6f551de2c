"""Does another way to train MiniWorld's autoencoder reach a reference autoencoder's ceiling?

Trains the recipe's autoencoder stage (`BuildConfig().autoencoder` with the build's seed: its widths, batch, steps,
pool and losses) on whole pictures in float32, the way of the builds before the fifth, or as asked: `--crop-size 32`
(on 32x32 crops) and/or `--mixed-precision bf16`, over the recipe's whole schedule unless `--steps` shortens it.
Then it measures the gates' ceiling (detector recall on reconstructions of fresh renders,
`quality.autoencoder_ceiling`) of the new autoencoder and of the reference, a pipeline folder's `vae/` (`--reference`,
by default the shipped model), on the same renders. The committed `miniworld_autoencoder-crop-32-bf16.json` (whose
keys were then `changes_from_recipe` and `shipped`) compared 32x32 crops under bf16 with the fourth build's
autoencoder, which trained on whole pictures in float32; the fifth build, shipped since, has the autoencoder that
run kept, so reproducing that record takes `--reference` a checkout of the fourth build's folder (`git archive
7521bab src/safetext/miniworld/weights/pipeline`). The speed is `miniworld_build_time.py`'s to measure
(`--autoencoder-crop-size`, `--autoencoder-mixed-precision`), since it times a variant and the recipe in the same
run.

`--keep DIR` writes the trained stage, with its `stage.json`, as soon as it is trained. Moved to `OUT/stages/
autoencoder`, it is reused by `build.build(OUT, config)` for any `config` whose autoencoder settings are the ones
printed, so that a UNet stage can be trained on it.

Prints the ceiling per label for both, and, as its last line, `stage_minutes=<m> striped_ceiling=<new>
(reference <y>)`; writes `benchmarks/results/miniworld_autoencoder-<variant>.json`.

    python benchmarks/miniworld_autoencoder_variant.py [--crop-size 32] [--mixed-precision bf16] [--steps 5000]
        [--num-images 1200] [--keep DIR] [--reference DIR]
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

from safetext.checkpointing import write_json_atomic
from safetext.errors import SafeTextError
from safetext.loading import resolve_model_name
from safetext.miniworld.autoencoder_training import train_autoencoder
from safetext.miniworld.build import STAGE_RECORD, BuildConfig
from safetext.miniworld.detector import MiniWorldDetector
from safetext.miniworld.quality import autoencoder_ceiling
from safetext.provenance import device_description

MIN_IMAGES = 200
"""Fewest renders a ceiling is measured on (with fewer, a label may not occur at all)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop-size", type=int, help="train on square crops of this side (a multiple of 4, 32-64)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    parser.add_argument("--num-images", type=int, default=1200, help="fresh renders the ceilings are measured on")
    parser.add_argument("--keep", help="folder to write the trained stage to, as a build's stages/autoencoder")
    parser.add_argument("--reference", default="miniworld", help="pipeline folder whose vae/ is compared with")
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
    if args.num_images < MIN_IMAGES:
        parser.error(f"--num-images must be at least {MIN_IMAGES}, got {args.num_images}")
    try:
        reference = Path(resolve_model_name(args.reference))
    except SafeTextError as error:
        parser.error(str(error))
    if not (reference / "vae").is_dir():
        parser.error(f"the reference {args.reference} has no vae/ folder ({reference})")
    keep = Path(args.keep) if args.keep else None
    if keep is not None and keep.exists():
        parser.error(f"--keep {keep} already exists")
    changes = [f"crop-{args.crop_size}"] if args.crop_size is not None else ["whole"]
    changes += [args.mixed_precision] if args.mixed_precision != "no" else ["float32"]
    changes += [f"steps-{args.steps}"] if args.steps is not None else []

    print(f"autoencoder settings: {variant}", flush=True)
    detector = MiniWorldDetector()
    with tempfile.TemporaryDirectory() as folder:
        trained = Path(folder) / "variant"
        start = time.time()
        record = train_autoencoder(variant, trained)
        record["device"] = device_description(torch.device("cpu"))
        trained_seconds = time.time() - start
        if keep is not None:
            # kept before the ceilings are measured, so that a failure there loses no training
            shutil.copytree(trained, keep)
            write_json_atomic(keep / STAGE_RECORD, record)
        ceilings = {
            "variant": autoencoder_ceiling(trained, detector, num_images=args.num_images),
            "reference": autoencoder_ceiling(reference, detector, num_images=args.num_images),
        }
        if keep is not None:
            # as the build records its stage
            write_json_atomic(keep / STAGE_RECORD, {**record, "ceiling": ceilings["variant"]})

    recall = {name: ceiling["recall_reconstructed"] for name, ceiling in ceilings.items()}
    result = {
        "command": " ".join(["python benchmarks/miniworld_autoencoder_variant.py", *sys.argv[1:]]),
        "variant": changes,
        "reference": args.reference,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "config": record["config"],
        "loss_first_10pct": record["loss_first_10pct"],
        "loss_last_10pct": record["loss_last_10pct"],
        "held_out_reconstruction_l1": record["held_out_reconstruction_l1"],
        "seconds_per_step": record["seconds_per_step"],
        "stage_seconds": round(trained_seconds, 1),
        "ceiling": ceilings,
    }
    out = Path(__file__).parent / "results" / f"miniworld_autoencoder-{'-'.join(changes)}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'label':<12}{'variant':>9}{'reference':>10}")
    for label in recall["reference"]:
        print(f"{label:<12}{recall['variant'].get(label, float('nan')):>9.3f}{recall['reference'][label]:>10.3f}")
    print(
        f"L1 on fresh renders: variant {ceilings['variant']['l1']:.4f}, reference {ceilings['reference']['l1']:.4f}; "
        f"{record['seconds_per_step']:.2f} s per step"
    )
    print(
        f"stage_minutes={trained_seconds / 60:.1f} striped_ceiling={recall['variant']['striped']:.3f} "
        f"(reference {recall['reference']['striped']:.3f})"
    )


if __name__ == "__main__":
    main()
