"""How far SafeText's alignment of MiniWorld carries to words it was never trained on, measured on the training
forms alone.

The demo's gate is removal on `striped`'s held-out forms, words that never occur in alignment prompts. Choosing the
alignment's settings on those forms would tune on the test. This benchmark asks the same question of the training
forms instead: for each of the `train` forms of `striped` (striped, stripy, banded, with stripes, in stripes) it
aligns on the recipe's training prompts without that form and measures the prompts that carry it (leave one form
out). Per setting it reports, averaged over the folds:

- `left_out_cosine`: cosine between aligned and original embeddings of the left-out form's prompts, over the
  positions SafeText pushes (`no_bos`); 1 means untouched, the prompts of forms trained on reach about -0.5;
- `trained_cosine`: the same on the recipe's held-out split of the forms trained on;
- `safe_drift`: relative drift of the recipe's held-out safe prompts.

It reads no prompt of the held-out or indirect sets. Prints one line per setting, and as its last line
`best=<setting>`: the lowest left-out cosine among the settings whose safe drift is at most the first setting's.
Every setting is the demo's alignment (`DemoConfig().alignment`) with the changes named in `SETTINGS`; the first
trains the embedding tables, as the demo did before this benchmark chose to freeze them. Writes
`benchmarks/results/miniworld_form_transfer.json`.

    python benchmarks/miniworld_form_transfer.py [--epochs 8]
"""

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from safetext.alignment import align
from safetext.conditioning import TextConditioner, position_mask
from safetext.loading import MINIWORLD, resolve_model_name
from safetext.metrics import unsafe_cosine
from safetext.miniworld.demo import DemoConfig
from safetext.miniworld.quality import miniworld_set
from safetext.miniworld.world import DESIGNATED_CONCEPT
from safetext.recipes import load_recipe

SETTINGS = {
    "tables trained": {"train_embeddings": True},
    "tables frozen": {"train_embeddings": False},
    "tables frozen, lr 3e-3": {"train_embeddings": False, "learning_rate": 3e-3},
    "tables frozen, lambda 1": {"train_embeddings": False, "effectiveness_weight": 1.0},
}


def _cosine(original, aligned, conditioner, prompts) -> float:
    tokens = conditioner.tokenize(prompts)
    reference = conditioner.encode_all(original, tokens, batch_size=64)
    moved = conditioner.encode_all(aligned, tokens, batch_size=64)
    return unsafe_cosine(moved, reference, position_mask(tokens.attention_mask, "no_bos"))


def main() -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="alignment epochs (default: the demo's)")
    args = parser.parse_args()
    base = DemoConfig().alignment
    if args.epochs is not None:
        base = replace(base, num_train_epochs=args.epochs)
    unsafe_sets, safe_sets = load_recipe(f"miniworld-{DESIGNATED_CONCEPT}")
    (unsafe_name, unsafe), *rest = unsafe_sets.items()
    if rest:
        raise SystemExit("the recipe was expected to hold one unsafe set")
    # the recipe's sets keep I2P's columns; the shipped file's own columns say each prompt's surface form
    shipped = miniworld_set(unsafe_name)
    by_prompt = {p: r["form"] for p, r in zip(shipped.prompts, shipped.records)}
    form_of = [by_prompt[p] for p in unsafe.prompts]
    forms = sorted(set(form_of))
    model = resolve_model_name(MINIWORLD)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    original = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    conditioner = TextConditioner.for_encoder(tokenizer, original, bare=False)

    results = {}
    start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        for name, changes in SETTINGS.items():
            config = replace(base, **changes)
            folds = {}
            for form in forms:
                kept = [i for i, f in enumerate(form_of) if f != form]
                left_out = [p for p, f in zip(unsafe.prompts, form_of) if f == form]
                result = align(
                    model,
                    {unsafe_name: unsafe.subset(kept)},
                    safe_sets,
                    Path(folder) / "run",
                    config,
                    overwrite=True,
                    show_progress=False,
                )
                aligned = CLIPTextModel.from_pretrained(result.output_dir / "text_encoder").eval()
                heldout = result.metrics["heldout"]
                folds[form] = {
                    "left_out_prompts": len(left_out),
                    "left_out_cosine": _cosine(original, aligned, conditioner, left_out),
                    "trained_cosine": heldout["unsafe_cosine"]["after"],
                    "safe_drift": heldout["safe_relative_drift"]["after"],
                }
            mean = {key: sum(f[key] for f in folds.values()) / len(folds) for key in next(iter(folds.values()))}
            results[name] = {"changes": changes, "config": config.to_dict(), "mean": mean, "folds": folds}
            print(
                f"{name:32s} left-out cosine {mean['left_out_cosine']:+.3f}  trained cosine "
                f"{mean['trained_cosine']:+.3f}  safe drift {mean['safe_drift']:.3f}",
                flush=True,
            )
    first = next(iter(results.values()))["mean"]["safe_drift"]
    eligible = {name: r for name, r in results.items() if r["mean"]["safe_drift"] <= first}
    best = min(eligible, key=lambda name: eligible[name]["mean"]["left_out_cosine"])
    record = {
        "command": "python benchmarks/miniworld_form_transfer.py",
        "concept": DESIGNATED_CONCEPT,
        "forms": forms,
        "rule": "lowest mean left-out cosine among settings whose mean safe drift is at most the first setting's",
        "best": best,
        "settings": results,
        "seconds": time.time() - start,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
    }
    out = Path(__file__).parent / "results" / "miniworld_form_transfer.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"best={best}")


if __name__ == "__main__":
    main()
