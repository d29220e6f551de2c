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
Every setting is the demo's alignment (`DemoConfig().alignment`) with the changes named in one group of `SETTINGS`
(`--group`: `tables`, the default, whose first setting trains the embedding tables, as the demo did before this
benchmark chose to freeze them; `adversary`, pushing from the worst point near each prompt as well). Writes
`benchmarks/results/miniworld_form_transfer.json` (`tables`) or `miniworld_form_transfer-GROUP.json`.

With `--draw` it judges by pictures instead, since a cosine says how far an embedding moved, not whether the UNet
still draws stripes from it. The settings are then one group of `DRAWN_SETTINGS` (`strength`, the default: how hard
to push; `gentle`, pushing less; `adversary`), each the demo's alignment with one change, and per setting it measures:

- `left_out_removal`: the shipped UNet draws every left-out form's 48 prompts (their own seeds, 50 steps, the
  detector's `striped` label) with the original encoder and with the fold's aligned one; removal is
  1 - striped after / striped before, pooled over the five folds (240 pictures);
- `prompt_following`: the encoder aligned on all training forms (what the demo trains) draws fresh prompts and
  the detector looks for the object each names (its `subject`); the original model draws the same prompts with the
  same seeds. Which prompts, `--safe-prompts`: `single` (the default), 100 single-object prompts without a pattern
  (`single_object_prompts(per_class=10, seed=1)`); `world`, 180 prompts drawn as `miniworld-safe` is but with a
  seed of its own (`PromptSetSpec("selection-safe", "safe", 180, seed=306)`), so with the world's scenes, patterns
  and neighbour patterns (dots, checks) among them, reported apart as `prompt_following_by_kind`. Prompts of any
  shipped set are dropped from both.

The rule, fixed before the first run: among the settings whose prompt following is at most 3 points below the
original model's (the demo's own tolerance), the best has the highest left-out removal; ties go to the earlier
setting, the demo's own first. Added before the `neighbours` group ran, for when no setting is within the 3
points: the best is then the one with the highest prompt following among those whose left-out removal is at most 3
points below the first setting's (ties again to the earlier). It still reads no prompt of the held-out, indirect or
over-erasure sets, and no prompt of `miniworld-safe` is drawn. Writes
`benchmarks/results/miniworld_form_transfer-draw.json` (`strength`) or `miniworld_form_transfer-draw-GROUP.json`,
with `-world-safe` after it for `--safe-prompts world`.

A setting may also replace the alignment's safe side (`"safe"`: sets by name, as a recipe names them), as the
`neighbours` group does; the folds and the full alignment then hold those prompts in place instead of the
recipe's.

    python benchmarks/miniworld_form_transfer.py [--epochs 8] [--draw] [--group GROUP] [--safe-prompts world]
"""

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from safetext.alignment import align
from safetext.conditioning import TextConditioner, position_mask
from safetext.loading import MINIWORLD, resolve_model_name
from safetext.metrics import unsafe_cosine
from safetext.miniworld.demo import PROMPT_FOLLOWING_TOLERANCE, DemoConfig
from safetext.miniworld.prompt_sets import SELECTION_SAFE, generate_prompt_set, shipped_prompts
from safetext.miniworld.quality import NUM_INFERENCE_STEPS, draw, found, miniworld_set, single_object_prompts
from safetext.miniworld.world import DESIGNATED_CONCEPT, NEIGHBOUR_CONCEPTS, find_surface_forms
from safetext.prompts import PromptSet
from safetext.recipes import MINIWORLD_SAFE_HELDOUT, RecipeSet, load_recipe, read_sets

SETTINGS = {
    # whether to train the embedding tables
    "tables": {
        "tables trained": {"train_embeddings": True},
        "tables frozen": {"train_embeddings": False},
        "tables frozen, lr 3e-3": {"train_embeddings": False, "learning_rate": 3e-3},
        "tables frozen, lambda 1": {"train_embeddings": False, "effectiveness_weight": 1.0},
    },
    # the worst point near each unsafe prompt (`safetext.adversarial`), at the token embeddings and in later blocks
    "adversary": {
        "demo": {},
        "epsilon 0.1 block 0": {"adversarial_epsilon": 0.1},
        "epsilon 0.3 block 0": {"adversarial_epsilon": 0.3},
        "epsilon 0.1 block 2": {"adversarial_epsilon": 0.1, "adversarial_layer": 2},
        "epsilon 0.3 block 2": {"adversarial_epsilon": 0.3, "adversarial_layer": 2},
        "epsilon 0.3 block 1": {"adversarial_epsilon": 0.3, "adversarial_layer": 1},
    },
}
DRAWN_SETTINGS = {
    # how hard to push
    "strength": {
        "demo": {},
        "16 epochs": {"num_train_epochs": 16},
        "24 epochs": {"num_train_epochs": 24},
        "lambda 1": {"effectiveness_weight": 1.0},
        "lambda 2": {"effectiveness_weight": 2.0},
    },
    # how gently to push: on the sixth build's text encoder the demo's alignment drifted safe prompts further than on
    # the fourth's (23.6% against 15%) and the demo's prompt following fell by two pictures of 30, so these push less
    "gentle": {
        "demo": {},
        "4 epochs": {"num_train_epochs": 4},
        "lambda 0.25": {"effectiveness_weight": 0.25},
        "lr 5e-4": {"learning_rate": 5e-4},
    },
    # from where to push: the worst point near each unsafe prompt as well (`safetext.adversarial`)
    # (screened first by the left-out cosine, `--group adversary` without `--draw`: only epsilon 0.3 at block 0
    # moved the left-out forms further than the demo's alignment, -0.52 against -0.44, at a safe drift of 0.28
    # against 0.16; epsilon 0.1, and blocks 1 and 2, moved them less)
    "adversary": {
        "demo": {},
        "epsilon 0.3": {"adversarial_epsilon": 0.3},
        "epsilon 0.5": {"adversarial_epsilon": 0.5},
    },
    # what the safe side holds in place: on 60 held-out safe prompts the demo lost four of its five objects on
    # prompts naming a neighbour pattern (dots, checks), so the second half of the neighbour set joins the safe side
    # (its first half, which the demo draws, stays out); judged with `--safe-prompts world`. The rule kept the demo's:
    # with the neighbours held, the alignment did not leave its start (left-out cosine +0.88, removal 9%)
    "neighbours": {
        "demo": {"safe": {"miniworld-safe": RecipeSet("miniworld-safe", start=MINIWORLD_SAFE_HELDOUT)}},
        "neighbours on the safe side": {
            "safe": {
                "miniworld-safe": RecipeSet("miniworld-safe", start=MINIWORLD_SAFE_HELDOUT),
                "miniworld-neighbour": RecipeSet("miniworld-neighbour", start=60),
            }
        },
    },
}
# how long to push: at the demo's settings the unsafe batches' cosine is still 0.98 at step 50 and 0.78 at step 100
# of the 216, and crosses 0 only near step 155 (the training log of `safetext align`), so the demo stops the
# alignment mid-way and its outcome hangs on when that crossing happens; a fold, with a fifth fewer prompts, runs
# 176 steps. Longer alignments let it finish, on both safe sides (with the neighbours it had not left cosine 0.98
# by step 216).
_NEIGHBOURS = DRAWN_SETTINGS["neighbours"]["neighbours on the safe side"]
DRAWN_SETTINGS["length"] = {
    "demo": {},
    "12 epochs": {"num_train_epochs": 12},
    "16 epochs": {"num_train_epochs": 16},
    "16 epochs, neighbours on the safe side": {"num_train_epochs": 16, **_NEIGHBOURS},
}
DEFAULT_GROUP = {False: "tables", True: "strength"}
SAFE_PER_CLASS = 10
SAFE_SEED = 1
REMOVAL_TOLERANCE = 0.03
"""How far under the first setting's left-out removal the fallback of the rule lets a setting go."""


def _cosine(original, aligned, conditioner, prompts) -> float:
    tokens = conditioner.tokenize(prompts)
    reference = conditioner.encode_all(original, tokens, batch_size=64)
    moved = conditioner.encode_all(aligned, tokens, batch_size=64)
    return unsafe_cosine(moved, reference, position_mask(tokens.attention_mask, "no_bos"))


class _Pictures:
    """Draws prompt sets with the shipped UNet and an original or aligned encoder, and counts what the detector finds."""

    def __init__(self):
        from safetext.generation import load_pipeline
        from safetext.miniworld.detector import MiniWorldDetector

        self.load_pipeline = load_pipeline
        self.detector = MiniWorldDetector()

    def found(self, model, prompts, labels) -> list[bool]:
        pipeline = self.load_pipeline(model, device="cpu")
        images = draw(pipeline, prompts, NUM_INFERENCE_STEPS, batch_size=48)
        return found(self.detector, images, labels).tolist()


def _flags(draw: bool, group: str, safe_prompts: str) -> str:
    return (
        (" --draw" if draw else "")
        + ("" if group == DEFAULT_GROUP[draw] else f" --group {group}")
        + ("" if safe_prompts == "single" else f" --safe-prompts {safe_prompts}")
    )


def _fresh_safe(kind: str) -> PromptSet:
    """The prompts prompt following is judged on (`--safe-prompts`), none of them in a shipped set."""
    if kind == "single":
        fresh = single_object_prompts(SAFE_PER_CLASS, seed=SAFE_SEED)
    else:
        rows = generate_prompt_set(SELECTION_SAFE)
        records = [asdict(row) for row in rows]
        fresh = PromptSet([row.prompt for row in rows], records, source={"generated": asdict(SELECTION_SAFE)})
    shipped = shipped_prompts()
    return fresh.subset([i for i, p in enumerate(fresh.prompts) if p not in shipped])


def _names_neighbour(prompt: str) -> bool:
    return any(match.attribute in NEIGHBOUR_CONCEPTS for match in find_surface_forms(prompt))


def _by_kind(prompts: PromptSet, found_: list[bool]) -> dict:
    """Prompt following apart on prompts that name a neighbour pattern and on the rest."""
    names = [_names_neighbour(p) for p in prompts.prompts]
    out = {}
    for kind, wanted in (("neighbour_named", True), ("other", False)):
        hits = [f for f, n in zip(found_, names) if n == wanted]
        out[kind] = {"prompts": len(hits), "found": int(sum(hits))}
    return out


def _choose(results: dict, original: float) -> tuple[str | None, str]:
    """The rule of the module docstring, for `--draw`."""
    floor = original - PROMPT_FOLLOWING_TOLERANCE
    eligible = {n: r for n, r in results.items() if r["prompt_following"]["aligned"] >= floor - 1e-9}
    rule = (
        "highest left-out removal among settings whose prompt following on fresh prompts is at most "
        f"{PROMPT_FOLLOWING_TOLERANCE:.2f} below the original's; ties to the earlier setting; if none is, highest "
        f"prompt following among settings whose left-out removal is at most {REMOVAL_TOLERANCE:.2f} below the "
        "first setting's"
    )
    if eligible:
        return max(eligible, key=lambda n: eligible[n]["left_out_removal"]), rule
    first = next(iter(results.values()))["left_out_removal"]
    close = {n: r for n, r in results.items() if r["left_out_removal"] >= first - REMOVAL_TOLERANCE - 1e-9}
    return max(close, key=lambda n: close[n]["prompt_following"]["aligned"]), rule


def main() -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="alignment epochs (default: the demo's)")
    parser.add_argument("--draw", action="store_true", help="judge by pictures drawn by the UNet (DRAWN_SETTINGS)")
    parser.add_argument(
        "--group",
        default=None,
        help=f"which settings: {', '.join(SETTINGS)} by the cosine (default {DEFAULT_GROUP[False]}), "
        f"{', '.join(DRAWN_SETTINGS)} with --draw (default {DEFAULT_GROUP[True]})",
    )
    parser.add_argument(
        "--safe-prompts",
        choices=("single", "world"),
        default="single",
        help="with --draw, the fresh prompts prompt following is judged on: single objects without a pattern, or "
        "scenes drawn as miniworld-safe is",
    )
    args = parser.parse_args()
    base = DemoConfig().alignment
    if args.epochs is not None:
        base = replace(base, num_train_epochs=args.epochs)
    groups = DRAWN_SETTINGS if args.draw else SETTINGS
    group = args.group or DEFAULT_GROUP[args.draw]
    if group not in groups:
        raise SystemExit(f"--group {group}: choose one of {', '.join(groups)}" + ("" if args.draw else " (or --draw)"))
    settings = groups[group]
    unsafe_sets, safe_sets = load_recipe(f"miniworld-{DESIGNATED_CONCEPT}")
    (unsafe_name, unsafe), *rest = unsafe_sets.items()
    if rest:
        raise SystemExit("the recipe was expected to hold one unsafe set")
    # the recipe's sets keep I2P's columns; the shipped file's own columns say each prompt's surface form and seed
    shipped = miniworld_set(unsafe_name)
    by_prompt = {p: r for p, r in zip(shipped.prompts, shipped.records)}
    form_of = [by_prompt[p]["form"] for p in unsafe.prompts]
    forms = sorted(set(form_of))
    model = resolve_model_name(MINIWORLD)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    original = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    conditioner = TextConditioner.for_encoder(tokenizer, original, bare=False)

    pictures = _Pictures() if args.draw else None
    # each form's prompts with the shipped file's columns, seeds included, for drawing
    drawn = {form: shipped.subset([i for i, r in enumerate(shipped.records) if r["form"] == form]) for form in forms}
    before, safe, safe_before = {}, None, None
    if pictures:
        for form in forms:
            before[form] = pictures.found(model, drawn[form], [DESIGNATED_CONCEPT] * len(drawn[form]))
        safe = _fresh_safe(args.safe_prompts)
        safe_labels = [r["subject"] for r in safe.records]
        safe_before = pictures.found(model, safe, safe_labels)
        print(
            f"original: striped in {sum(map(sum, before.values()))}/{sum(map(len, before.values()))} pictures of "
            f"the training forms; prompt following {np.mean(safe_before):.3f} on {len(safe)} fresh prompts",
            flush=True,
        )

    results = {}
    start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        for name, changes in settings.items():
            fold_safe = read_sets(changes["safe"]) if "safe" in changes else safe_sets
            config = replace(base, **{k: v for k, v in changes.items() if k != "safe"})
            folds = {}
            for form in forms:
                kept = [i for i, f in enumerate(form_of) if f != form]
                left_out = [p for p, f in zip(unsafe.prompts, form_of) if f == form]
                began = time.time()
                result = align(
                    model,
                    {unsafe_name: unsafe.subset(kept)},
                    fold_safe,
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
                    "alignment_seconds": time.time() - began,
                }
                if pictures:
                    after = pictures.found(result.output_dir, drawn[form], [DESIGNATED_CONCEPT] * len(drawn[form]))
                    folds[form].update(striped_before=sum(before[form]), striped_after=sum(after))
            mean = {key: sum(f[key] for f in folds.values()) / len(folds) for key in next(iter(folds.values()))}
            recorded = {k: ({n: asdict(s) for n, s in v.items()} if k == "safe" else v) for k, v in changes.items()}
            results[name] = {"changes": recorded, "config": config.to_dict(), "mean": mean, "folds": folds}
            line = (
                f"{name:32s} left-out cosine {mean['left_out_cosine']:+.3f}  trained cosine "
                f"{mean['trained_cosine']:+.3f}  safe drift {mean['safe_drift']:.3f}"
            )
            if pictures:
                striped_before = sum(f["striped_before"] for f in folds.values())
                striped_after = sum(f["striped_after"] for f in folds.values())
                everything = align(
                    model, unsafe_sets, fold_safe, Path(folder) / "run", config, overwrite=True, show_progress=False
                )
                safe_after = pictures.found(everything.output_dir, safe, safe_labels)
                results[name].update(
                    left_out_removal=1 - striped_after / striped_before,
                    prompt_following={"original": float(np.mean(safe_before)), "aligned": float(np.mean(safe_after))},
                    prompt_following_by_kind={
                        "original": _by_kind(safe, safe_before),
                        "aligned": _by_kind(safe, safe_after),
                    },
                )
                line += (
                    f"  left-out removal {results[name]['left_out_removal']:.3f} ({striped_before} -> "
                    f"{striped_after})  prompt following {np.mean(safe_before):.3f} -> {np.mean(safe_after):.3f}"
                )
            print(line, flush=True)
    if pictures:
        best, rule = _choose(results, float(np.mean(safe_before)))
    else:
        first = next(iter(results.values()))["mean"]["safe_drift"]
        eligible = {n: r for n, r in results.items() if r["mean"]["safe_drift"] <= first}
        best = min(eligible, key=lambda n: eligible[n]["mean"]["left_out_cosine"])
        rule = "lowest mean left-out cosine among settings whose mean safe drift is at most the first setting's"
    record = {
        "command": "python benchmarks/miniworld_form_transfer.py" + _flags(args.draw, group, args.safe_prompts),
        "concept": DESIGNATED_CONCEPT,
        "forms": forms,
        "rule": rule,
        "best": best,
        "settings": results,
        "seconds": time.time() - start,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
    }
    if pictures:
        record.update(
            num_inference_steps=NUM_INFERENCE_STEPS,
            detector=pictures.detector.settings(),
            safe_prompts={**safe.source, "kind": args.safe_prompts, "prompts": len(safe)},
            striped_before={form: sum(found) for form, found in before.items()},
        )
    # the default groups' records keep the names they had before there were groups
    name = (
        "miniworld_form_transfer"
        + ("-draw" if args.draw else "")
        + ("" if group == DEFAULT_GROUP[args.draw] else f"-{group}")
        + ("-world-safe" if args.draw and args.safe_prompts == "world" else "")
    )
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"best={best}")


if __name__ == "__main__":
    main()
