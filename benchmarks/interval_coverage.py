"""How often the evaluation's 95% intervals hold the true value, on simulated pairs of models.

Each regime draws a set of images (one per prompt) from two models whose true figures are known, computes the
interval `safetext.evaluation.metrics` gives (`rate_change_interval` for a change in a per-image rate such as
prompt following, `removal_rate_interval` for a removal rate), and counts how often it holds the true figure.
The regimes are the MiniWorld demo's sizes (30 and 60 prompts) and rarer and commoner events, since the percentile
bootstrap runs narrow where events are rare and the zero-event bounds take over where there are none. Prints one
line per regime with its coverage and the mean width, and writes `benchmarks/results/interval_coverage.json`.

    python benchmarks/interval_coverage.py [--trials 500]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from safetext.evaluation.metrics import INTERVAL_SETTINGS, rate_change_interval, removal_rate_interval
from safetext.provenance import git_commit

# (images, share the original model finds, chance the aligned one flips a finding)
CHANGE_REGIMES = [(30, 0.9, 0.02), (30, 0.9, 0.05), (30, 0.9, 0.1), (60, 0.9, 0.05), (60, 0.9, 0.1), (120, 0.9, 0.05)]
# (images, share of pictures the original draws the concept in, chance the aligned one keeps it)
REMOVAL_REGIMES = [(30, 0.7, 0.0), (30, 0.7, 0.03), (30, 0.7, 0.1), (60, 0.7, 0.03), (60, 0.7, 0.2), (120, 0.7, 0.05)]


def _change(trials: int, images: int, found: float, flip: float, rng) -> dict:
    truth = found * (1 - flip) + (1 - found) * flip - found
    covered, widths = 0, []
    for trial in range(trials):
        original = (rng.random(images) < found).astype(int)
        aligned = np.where(rng.random(images) < flip, 1 - original, original)
        low, high = rate_change_interval(original.tolist(), aligned.tolist(), seed=trial)
        covered += low <= truth <= high
        widths.append(high - low)
    return {
        "images": images,
        "found": found,
        "flip": flip,
        "truth": truth,
        "coverage": covered / trials,
        "mean_width": float(np.mean(widths)),
    }


def _removal(trials: int, images: int, shown: float, kept: float, rng) -> dict:
    truth = 1 - kept
    covered, widths, undefined = 0, [], 0
    for trial in range(trials):
        original = (rng.random(images) < shown).astype(int)
        aligned = original * (rng.random(images) < kept)
        interval = removal_rate_interval(original.tolist(), aligned.tolist(), seed=trial)
        if interval is None:
            undefined += 1
            continue
        covered += interval[0] <= truth <= interval[1]
        widths.append(interval[1] - interval[0])
    defined = trials - undefined
    return {
        "images": images,
        "shown": shown,
        "kept": kept,
        "truth": truth,
        "coverage": covered / defined,
        "mean_width": float(np.mean(widths)),
        "undefined": undefined,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=500, help="simulated sets per regime")
    args = parser.parse_args()
    if args.trials < 10:
        parser.error("--trials must be at least 10")
    rng = np.random.default_rng(0)
    change = [_change(args.trials, *regime, rng) for regime in CHANGE_REGIMES]
    removal = [_removal(args.trials, *regime, rng) for regime in REMOVAL_REGIMES]
    for row in change:
        print(
            f"change:  {row['images']:>3} images, found {row['found']:.2f}, flip {row['flip']:.2f} "
            f"(true {100 * row['truth']:+.1f} points): coverage {100 * row['coverage']:.1f}%, "
            f"mean width {100 * row['mean_width']:.1f} points"
        )
    for row in removal:
        print(
            f"removal: {row['images']:>3} images, shown {row['shown']:.2f}, kept {row['kept']:.2f} "
            f"(true {100 * row['truth']:.1f}%): coverage {100 * row['coverage']:.1f}%, "
            f"mean width {100 * row['mean_width']:.1f} points"
        )
    record = {
        "command": " ".join(["python benchmarks/interval_coverage.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "trials": args.trials,
        "intervals": INTERVAL_SETTINGS,
        "change": change,
        "removal": removal,
    }
    out = Path(__file__).parent / "results" / "interval_coverage.json"
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
