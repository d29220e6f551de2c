"""How long `safetext miniworld build`'s recipe takes on this machine, against its budget of one hour on two cores.

Each stage runs a few steps with the recipe's own settings (`BuildConfig()` as a build resolves it here: where the
CPU has no native bfloat16, the stages set to bf16 run in float32, and the result's name ends in
`-no-native-bf16`), on pools far smaller than the recipe's (pool size does not change a step's cost), and the
stage's time is projected as its steps times the measured seconds per step; the pools' rendering and encoding are
left out. The UNet's first step (its warm-up, or with `--unet-compile` its compilation) is timed apart and counted
once, the rest per step. The UNet's steps run on the short mini-CLIP and autoencoder just trained, which have the
recipe's shapes. Prints the figures and, as its last line, `ratio_to_budget=<x>`; writes them to
`benchmarks/results/miniworld_build_time.json`.

A variant of the recipe (`--clip-mixed-precision no|bf16`: the mini-CLIP in float32 or under bfloat16 autocast;
`--autoencoder-mixed-precision no|bf16`: the autoencoder in float32 or under bfloat16 autocast;
`--autoencoder-crop-size 32|none`: the autoencoder trained on 32x32 crops or on whole pictures;
`--unet-mixed-precision no|bf16`: the UNet so; `--unet-attention-at-16x16`: attention at the UNet's finest level;
`--unet-attention-heads 2,8,8`: the number of attention heads at each level, 16x16 first; `--unet-compile`: the
UNet trained through `torch.compile`; `--autoencoder-batch-size N`: pictures per autoencoder step;
`--autoencoder-steps N`, `--unet-steps N`: shorter or longer schedules, which change the projection only; an option not given keeps the recipe's setting) is timed together with the recipe
itself in the same run, and each stage's speed is printed as a ratio to the recipe's; its figures go to
`miniworld_build_time-<changes>.json`, named by what differs from the recipe (and with `--record NAME`, `-NAME`
after it: records of other machines stay beside each other). That projects time only: whether a
variant reaches the recipe's quality takes a full build to tell.

    python benchmarks/miniworld_build_time.py [--steps 10] [--device cpu] [--clip-mixed-precision no|bf16]
        [--autoencoder-mixed-precision no|bf16]
        [--autoencoder-crop-size 32|none] [--unet-mixed-precision no|bf16] [--unet-attention-at-16x16]
        [--unet-attention-heads 2,8,8] [--unet-compile] [--autoencoder-batch-size 32] [--autoencoder-steps N]
        [--unet-steps N] [--record NAME]
"""

import argparse
import json
import platform
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from safetext.miniworld.autoencoder_training import train_autoencoder
from safetext.miniworld.build import BuildConfig, resolve_precision
from safetext.miniworld.clip_training import train_mini_clip
from safetext.miniworld.unet_training import train_unet
from safetext.provenance import cpu_description


def _time_stages(recipe: BuildConfig, steps: int, device: str, folder: Path) -> tuple[dict, float]:
    """Seconds per step of each stage, run for `steps` steps with the recipe's settings on small pools, and the
    seconds of the UNet's first step beyond a later one's (its compilation, with `compile`)."""
    short = {"max_train_steps": steps, "lr_warmup_steps": 1}
    clip = replace(recipe.clip, **short, num_scenes=2 * recipe.clip.train_batch_size)
    autoencoder = replace(recipe.autoencoder, **short, num_pictures=2 * recipe.autoencoder.train_batch_size)
    unet = replace(recipe.unet, **short, num_scenes=2 * recipe.unet.train_batch_size)
    # on the short mini-CLIP and autoencoder just trained, which have the recipe's shapes
    clip_seconds = train_mini_clip(clip, folder, device)["seconds_per_step"]
    autoencoder_seconds = train_autoencoder(autoencoder, folder, device)["seconds_per_step"]
    unet_record = train_unet(unet, folder, folder, folder / "pipeline", device)
    first = unet_record["first_step_seconds"]
    unet_seconds = (unet_record["seconds_per_step"] * steps - first) / (steps - 1)
    seconds = {"clip": clip_seconds, "autoencoder": autoencoder_seconds, "unet": unet_seconds}
    return seconds, max(first - unet_seconds, 0.0)


def _crop_size(text: str) -> int | None:
    """`--autoencoder-crop-size`'s value: a side, or None ('none') for whole pictures."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a side in pixels or 'none', got {text!r}") from None


def _changes(recipe: BuildConfig, variant: BuildConfig) -> list[str]:
    """How the variant differs from the recipe, in the words that name its result file."""
    changes = []
    if variant.clip.mixed_precision != recipe.clip.mixed_precision:
        changes.append(f"clip-{variant.clip.mixed_precision}")
    if variant.autoencoder.mixed_precision != recipe.autoencoder.mixed_precision:
        changes.append(f"autoencoder-{variant.autoencoder.mixed_precision}")
    if variant.autoencoder.crop_size != recipe.autoencoder.crop_size:
        crop = variant.autoencoder.crop_size
        changes.append(f"autoencoder-crop-{crop}" if crop is not None else "autoencoder-whole-pictures")
    if variant.unet.mixed_precision != recipe.unet.mixed_precision:
        changes.append(f"unet-{variant.unet.mixed_precision}")
    if variant.unet.attention_at_16x16 != recipe.unet.attention_at_16x16:
        changes.append("unet-attention-at-16x16")
    if variant.unet.attention_head_dim != recipe.unet.attention_head_dim:
        heads = variant.unet.attention_head_dim
        heads = heads if isinstance(heads, tuple) else (heads,)
        changes.append("unet-heads-" + "-".join(str(count) for count in heads))
    if variant.autoencoder.train_batch_size != recipe.autoencoder.train_batch_size:
        changes.append(f"autoencoder-batch-{variant.autoencoder.train_batch_size}")
    if variant.autoencoder.max_train_steps != recipe.autoencoder.max_train_steps:
        changes.append(f"autoencoder-steps-{variant.autoencoder.max_train_steps}")
    if variant.unet.max_train_steps != recipe.unet.max_train_steps:
        changes.append(f"unet-steps-{variant.unet.max_train_steps}")
    if variant.unet.compile != recipe.unet.compile:
        changes.append("unet-compile")
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps timed per stage")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clip-mixed-precision", choices=("no", "bf16"), help="default: the recipe's")
    parser.add_argument("--autoencoder-mixed-precision", choices=("no", "bf16"), help="default: the recipe's")
    parser.add_argument(
        "--autoencoder-crop-size",
        type=_crop_size,
        # absent when not given, since None is one of its values (whole pictures)
        default=argparse.SUPPRESS,
        help="train the autoencoder on crops of this side, or 'none' for whole pictures (default: the recipe's)",
    )
    parser.add_argument("--unet-mixed-precision", choices=("no", "bf16"), help="default: the recipe's")
    parser.add_argument(
        "--unet-attention-at-16x16", action="store_true", default=None, help="attention at the UNet's finest level"
    )
    parser.add_argument("--unet-attention-heads", help="heads per level, 16x16 first, comma-separated (e.g. 2,8,8)")
    parser.add_argument("--unet-compile", action="store_true", help="train the UNet through torch.compile")
    parser.add_argument("--autoencoder-batch-size", type=int, help="pictures per step (default: the recipe's)")
    parser.add_argument("--autoencoder-steps", type=int, help="the autoencoder's schedule (default: the recipe's)")
    parser.add_argument("--unet-steps", type=int, help="the UNet's schedule (default: the recipe's)")
    parser.add_argument("--record", help="a name for the result file's end, e.g. the machine's (-NAME.json)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the UNet's first step is timed apart")
    try:
        # as a build resolves it: the stages set to bf16 in float32 where the device has no native bfloat16
        recipe, float32_stages = resolve_precision(BuildConfig(device=args.device))
    except ValueError as error:
        parser.error(str(error))
    heads = recipe.unet.attention_head_dim
    if args.unet_attention_heads:
        try:
            heads = tuple(int(count) for count in args.unet_attention_heads.split(","))
            heads = heads[0] if len(heads) == 1 else heads
        except ValueError:
            parser.error(f"--unet-attention-heads takes comma-separated numbers, got {args.unet_attention_heads!r}")
    crop_size = getattr(args, "autoencoder_crop_size", recipe.autoencoder.crop_size)
    try:
        variant = BuildConfig(
            device=args.device,
            clip=replace(recipe.clip, mixed_precision=args.clip_mixed_precision or recipe.clip.mixed_precision),
            autoencoder=replace(
                recipe.autoencoder,
                mixed_precision=args.autoencoder_mixed_precision or recipe.autoencoder.mixed_precision,
                crop_size=crop_size,
                train_batch_size=args.autoencoder_batch_size or recipe.autoencoder.train_batch_size,
                max_train_steps=args.autoencoder_steps or recipe.autoencoder.max_train_steps,
            ),
            unet=replace(
                recipe.unet,
                mixed_precision=args.unet_mixed_precision or recipe.unet.mixed_precision,
                attention_at_16x16=args.unet_attention_at_16x16 or recipe.unet.attention_at_16x16,
                attention_head_dim=heads,
                max_train_steps=args.unet_steps or recipe.unet.max_train_steps,
                compile=args.unet_compile or recipe.unet.compile,
            ),
        )
    except ValueError as error:
        parser.error(str(error))
    changes = _changes(recipe, variant)
    with tempfile.TemporaryDirectory() as folder:
        timed, one_off = _time_stages(variant, args.steps, args.device, Path(folder) / "variant")
        # a variant is also timed against the recipe itself in the same run: the machine's speed drifts
        reference = _time_stages(recipe, args.steps, args.device, Path(folder) / "recipe")[0] if changes else None
    configs = {"clip": variant.clip, "autoencoder": variant.autoencoder, "unet": variant.unet}
    record = {
        "command": " ".join(["python benchmarks/miniworld_build_time.py", *sys.argv[1:]]),
        "device": args.device,
        "platform": platform.platform(),
        **cpu_description(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "steps_timed": args.steps,
        "changes_from_recipe": changes,
        # the recipe's stages that run in float32 here; a variant's own --*-mixed-precision bf16 overrides it
        "precision_fallback": float32_stages,
        "stages": {
            name: {
                "steps": configs[name].max_train_steps,
                "train_batch_size": configs[name].train_batch_size,
                "seconds_per_step": seconds,
                "projected_seconds": seconds * configs[name].max_train_steps + (one_off if name == "unet" else 0.0),
            }
            for name, seconds in timed.items()
        },
        # the UNet's first step beyond a later one's (with --unet-compile, the compilation), counted once
        "unet_first_step_extra_seconds": one_off,
        "budget_seconds": recipe.time_budget_s,
    }
    if reference is not None:
        record["recipe_seconds_per_step"] = reference
        record["speedup_over_recipe"] = {name: reference[name] / timed[name] for name in timed}
    record["projected_seconds"] = sum(stage["projected_seconds"] for stage in record["stages"].values())
    record["ratio_to_budget"] = record["projected_seconds"] / recipe.time_budget_s
    suffix = "".join(f"-{change}" for change in changes) + ("-no-native-bf16" if float32_stages else "")
    suffix += f"-{args.record}" if args.record else ""
    out = Path(__file__).parent / "results" / f"miniworld_build_time{suffix}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    for name, stage in record["stages"].items():
        line = f"{name}: {stage['seconds_per_step']:.3f} s per step x {stage['steps']} = "
        line += f"{stage['projected_seconds'] / 3600:.2f} h"
        if reference is not None:
            line += f" ({record['speedup_over_recipe'][name]:.2f}x the recipe's speed in this run)"
        print(line)
    print(f"projected {record['projected_seconds'] / 3600:.2f} h against {recipe.time_budget_s / 3600:.2f} h")
    print(f"ratio_to_budget={record['ratio_to_budget']:.2f}")


if __name__ == "__main__":
    main()
