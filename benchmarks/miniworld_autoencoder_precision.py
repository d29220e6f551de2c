"""Does MiniWorld's autoencoder learn as well under bfloat16 autocast as in float32, and how much faster is it?

Trains the recipe's autoencoder on whole pictures (`AutoencoderConfig()`: the recipe's widths, batch, learning
rate and losses; the recipe itself also trains on 32x32 crops) twice for the same short schedule, on the same
pictures from the same initialisation, once under bf16 autocast and once in float32, and measures each: training
loss over the last tenth of the steps, L1 on held-out renders, seconds per step, and the gates' ceiling
(detector recall on reconstructions of fresh renders, `autoencoder_ceiling`). A short schedule says whether bf16
changes what the network learns, not what a full build reaches. Prints one line per precision and, as its last
line, `speedup=<x>` (float32's seconds per step over bf16's, in the same run); writes
`benchmarks/results/miniworld_autoencoder_precision.json`.

    python benchmarks/miniworld_autoencoder_precision.py [--steps 400]
"""

import argparse
import json
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from safetext.miniworld.autoencoder_training import AutoencoderConfig, train_autoencoder
from safetext.miniworld.detector import MiniWorldDetector
from safetext.miniworld.quality import autoencoder_ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps of each run")
    args = parser.parse_args()
    recipe = AutoencoderConfig()
    detector = MiniWorldDetector()
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for precision in ("bf16", "no"):
            config = replace(
                recipe,
                max_train_steps=args.steps,
                # each picture used about four times, as in the recipe (5,000 x 64 on 48,000 renders: 6.7)
                num_pictures=recipe.train_batch_size * args.steps // 4,
                mixed_precision=precision,
            )
            record = train_autoencoder(config, Path(folder) / precision)
            ceiling = autoencoder_ceiling(Path(folder) / precision, detector)
            recall = ceiling["recall_reconstructed"]
            runs[precision] = {
                "config": record["config"],
                "loss_last_10pct": record["loss_last_10pct"],
                "held_out_reconstruction_l1": record["held_out_reconstruction_l1"],
                "seconds_per_step": record["seconds_per_step"],
                "ceiling_mean_recall": sum(recall.values()) / len(recall),
                "ceiling_striped": recall["striped"],
                "ceiling": ceiling,
            }
            print(
                f"{precision:>4}: loss {record['loss_last_10pct']:.4f}  held-out L1 "
                f"{record['held_out_reconstruction_l1']:.4f}  ceiling mean {runs[precision]['ceiling_mean_recall']:.3f}"
                f"  striped {recall['striped']:.3f}  {record['seconds_per_step']:.2f} s/step",
                flush=True,
            )
    speedup = runs["no"]["seconds_per_step"] / runs["bf16"]["seconds_per_step"]
    result = {
        "command": "python benchmarks/miniworld_autoencoder_precision.py"
        + ("" if args.steps == 400 else f" --steps {args.steps}"),
        "steps": args.steps,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "runs": runs,
        "speedup": speedup,
    }
    out = Path(__file__).parent / "results" / "miniworld_autoencoder_precision.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
