"""How long `safetext miniworld build`'s recipe takes on this machine, against its budget of one hour on two cores.

Each stage runs a few steps with the recipe's own settings (`BuildConfig()`), on pools far smaller than the
recipe's (pool size does not change a step's cost), and the stage's time is projected as its steps times the
measured seconds per step; the pools' rendering and encoding are left out. The UNet's steps run on the short
mini-CLIP and autoencoder just trained, which have the recipe's shapes. Prints the figures and, as its last line,
`ratio_to_budget=<x>`; writes them to `benchmarks/results/miniworld_build_time.json`.

    python benchmarks/miniworld_build_time.py [--steps 10] [--device cpu]
"""

import argparse
import json
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from safetext.miniworld.autoencoder_training import train_autoencoder
from safetext.miniworld.build import BuildConfig
from safetext.miniworld.clip_training import train_mini_clip
from safetext.miniworld.unet_training import train_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps timed per stage")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    recipe = BuildConfig(device=args.device)
    short = {"max_train_steps": args.steps, "lr_warmup_steps": 1}
    stages = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        clip = replace(recipe.clip, **short, num_scenes=2 * recipe.clip.train_batch_size)
        stages["clip"] = (recipe.clip, train_mini_clip(clip, folder / "stages", args.device))
        autoencoder = replace(recipe.autoencoder, **short, num_pictures=2 * recipe.autoencoder.train_batch_size)
        stages["autoencoder"] = (recipe.autoencoder, train_autoencoder(autoencoder, folder / "stages", args.device))
        unet = replace(recipe.unet, **short, num_scenes=2 * recipe.unet.train_batch_size)
        stages["unet"] = (
            recipe.unet,
            train_unet(unet, folder / "stages", folder / "stages", folder / "pipeline", args.device),
        )
    record = {
        "command": "python benchmarks/miniworld_build_time.py",
        "device": args.device,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "steps_timed": args.steps,
        "stages": {
            name: {
                "steps": config.max_train_steps,
                "train_batch_size": config.train_batch_size,
                "seconds_per_step": record["seconds_per_step"],
                "projected_seconds": record["seconds_per_step"] * config.max_train_steps,
            }
            for name, (config, record) in stages.items()
        },
        "budget_seconds": recipe.time_budget_s,
    }
    record["projected_seconds"] = sum(stage["projected_seconds"] for stage in record["stages"].values())
    record["ratio_to_budget"] = record["projected_seconds"] / recipe.time_budget_s
    out = Path(__file__).parent / "results" / "miniworld_build_time.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    for name, stage in record["stages"].items():
        print(
            f"{name}: {stage['seconds_per_step']:.3f} s per step x {stage['steps']} = "
            f"{stage['projected_seconds'] / 3600:.2f} h"
        )
    print(f"projected {record['projected_seconds'] / 3600:.2f} h against {recipe.time_budget_s / 3600:.2f} h")
    print(f"ratio_to_budget={record['ratio_to_budget']:.2f}")


if __name__ == "__main__":
    main()
