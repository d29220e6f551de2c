"""The `safetext` command line: each subcommand parses its flags and makes one library call."""

import argparse
import logging
import sys
from pathlib import Path

from safetext.errors import SafeTextError

logger = logging.getLogger("safetext")

PROMPTS_HELP = "a .txt/.csv file or a registered set name (see `safetext datasets`)"
DATA_DIR_HELP = "folder of the public prompt files that set names and recipes read (default: $SAFETEXT_DATA_DIR)"


def _add_align(subparsers) -> None:
    from safetext.config import DISTANCE_SCALES, DISTANCES, MIXED_PRECISION, POSITIONS, AlignmentConfig

    defaults = AlignmentConfig()
    p = subparsers.add_parser("align", help="align a model's text encoder with SafeText")
    p.add_argument("--model", required=True, help="diffusers pipeline folder or Hub id, or a bare text encoder")
    p.add_argument("--revision", default=None, help="Hub revision of the model")
    p.add_argument(
        "--family",
        default=None,
        help="pipeline family sd, sdxl, sd3 or flux (default: read from the model's model_index.json)",
    )
    p.add_argument(
        "--train-encoders",
        default=None,
        metavar="NAMES",
        help="comma-separated text encoders to train, e.g. text_encoder,text_encoder_2 (default: every CLIP "
        "encoder; T5 stays frozen)",
    )
    p.add_argument(
        "--pooled-weight",
        type=float,
        default=defaults.pooled_weight,
        help="weight of the pooled vector against the token sequence in both terms (SDXL, SD3, FLUX)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="train LoRA adapters of this rank instead of every weight (default: full fine-tuning)",
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling alpha (default: the rank)")
    p.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout, help="dropout on the LoRA branch")
    p.add_argument(
        "--lora-target-modules",
        default=None,
        metavar="NAMES",
        help="comma-separated linear layers that get adapters (default: the attention projections, CLIP "
        "q_proj,k_proj,v_proj,out_proj; T5 q,k,v,o)",
    )
    p.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="full fine-tuning of the transformer layers only: the token and position embedding tables stay as they "
        "are, so the change acts on words in context rather than on the training prompts' words",
    )
    p.add_argument(
        "--adversarial-epsilon",
        type=float,
        default=defaults.adversarial_epsilon,
        help="push the unsafe prompts away from where they are and from the worst point within this radius of their "
        "hidden states (per token, relative to its norm), as adversarial unlearning does (default 0: SafeText as in "
        "the paper)",
    )
    p.add_argument(
        "--adversarial-steps",
        type=int,
        default=defaults.adversarial_steps,
        help="projected gradient steps of the search for that point",
    )
    p.add_argument(
        "--adversarial-layer",
        type=int,
        default=defaults.adversarial_layer,
        help="the transformer block whose input is perturbed (0: the token embeddings)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute layer activations in the backward pass: less memory, same gradients",
    )
    p.add_argument(
        "--unsafe", action="append", default=[], metavar="FILE|NAME", help="unsafe prompts: " + PROMPTS_HELP
    )
    p.add_argument("--safe", action="append", default=[], metavar="FILE|NAME", help="safe prompts: " + PROMPTS_HELP)
    p.add_argument(
        "--recipe",
        default=None,
        help="a named data recipe: nudity, miniworld-striped or miniworld-crowned; --unsafe/--safe sets are added",
    )
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument(
        "--unsafe-category",
        default=None,
        help="keep only unsafe CSV rows whose 'categories' contain this (e.g. sexual on I2P)",
    )
    p.add_argument("--max-prompts", type=int, default=None, help="use at most N prompts of each file")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--epochs", type=int, default=defaults.num_train_epochs, help="passes over the training data")
    p.add_argument("--max-train-steps", type=int, default=None, help="stop after N steps (overrides --epochs)")
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument(
        "--effectiveness-weight",
        type=float,
        default=defaults.effectiveness_weight,
        help="lambda in L_u - lambda * L_e",
    )
    p.add_argument("--train-batch-size", type=int, default=defaults.train_batch_size, help="unsafe prompts per step")
    p.add_argument("--safe-batch-size", type=int, default=None, help="safe prompts per step (default: same)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--heldout-fraction", type=float, default=defaults.heldout_fraction)
    p.add_argument(
        "--init-noise",
        type=float,
        default=defaults.init_noise,
        help="seeded noise on the trained weights before the first step, relative to their RMS (0: off)",
    )
    p.add_argument(
        "--utility-positions",
        choices=POSITIONS,
        default=defaults.utility_positions,
        help="token positions in the utility distance (safe prompts)",
    )
    p.add_argument(
        "--effectiveness-positions",
        choices=POSITIONS,
        default=defaults.effectiveness_positions,
        help="token positions in the effectiveness distance (unsafe prompts)",
    )
    p.add_argument("--utility-distance", choices=DISTANCES, default=defaults.utility_distance)
    p.add_argument("--effectiveness-distance", choices=DISTANCES, default=defaults.effectiveness_distance)
    p.add_argument("--distance-scale", choices=DISTANCE_SCALES, default=defaults.distance_scale)
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=defaults.mixed_precision)
    p.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    p.add_argument("--checkpointing-steps", type=int, default=defaults.checkpointing_steps)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--export-pipeline", action="store_true", help="also write a complete pipeline to OUT/pipeline")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_align)


def _set_name(path: str, taken: set) -> str:
    name = Path(path).stem
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _comma_list(value: str | None) -> list[str] | None:
    """A flag's comma-separated names as a list (None when the flag was not given)."""
    return None if value is None else [name.strip() for name in value.split(",")]


def _run_align(args) -> int:
    from safetext.alignment import align
    from safetext.config import AlignmentConfig
    from safetext.datasets import load_dataset
    from safetext.recipes import load_recipe

    try:
        config = AlignmentConfig(
            effectiveness_weight=args.effectiveness_weight,
            utility_distance=args.utility_distance,
            effectiveness_distance=args.effectiveness_distance,
            utility_positions=args.utility_positions,
            effectiveness_positions=args.effectiveness_positions,
            distance_scale=args.distance_scale,
            pooled_weight=args.pooled_weight,
            train_encoders=_comma_list(args.train_encoders),
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            lora_target_modules=_comma_list(args.lora_target_modules),
            train_embeddings=not args.freeze_embeddings,
            adversarial_epsilon=args.adversarial_epsilon,
            adversarial_steps=args.adversarial_steps,
            adversarial_layer=args.adversarial_layer,
            gradient_checkpointing=args.gradient_checkpointing,
            learning_rate=args.learning_rate,
            num_train_epochs=args.epochs,
            max_train_steps=args.max_train_steps,
            train_batch_size=args.train_batch_size,
            safe_batch_size=args.safe_batch_size,
            max_grad_norm=args.max_grad_norm,
            seed=args.seed,
            heldout_fraction=args.heldout_fraction,
            init_noise=args.init_noise,
            mixed_precision=args.mixed_precision,
            checkpointing_steps=args.checkpointing_steps,
        )
    except ValueError as error:
        raise SafeTextError(str(error)) from None
    # before anything loads: a loading bar would otherwise stand in front of a one-line error on bad input
    _quiet_library_progress_bars()
    unsafe, safe = {}, {}
    if args.recipe:
        unsafe, safe = load_recipe(args.recipe, args.data_dir)
    if not (unsafe or args.unsafe) or not (safe or args.safe):
        raise SafeTextError("give unsafe and safe prompts: --unsafe FILE and --safe FILE, or --recipe NAME")
    taken = set(unsafe) | set(safe)
    for f in args.unsafe:
        unsafe[_set_name(f, taken)] = load_dataset(
            f, args.data_dir, category=args.unsafe_category, max_prompts=args.max_prompts
        )
    safe.update({_set_name(f, taken): load_dataset(f, args.data_dir, max_prompts=args.max_prompts) for f in args.safe})
    result = align(
        args.model,
        unsafe,
        safe,
        args.out,
        config,
        revision=args.revision,
        resume=args.resume,
        overwrite=args.overwrite,
        export_pipeline=args.export_pipeline,
        show_progress=not args.no_progress,
        family=args.family,
    )
    held = result.metrics["heldout"]
    line = [f"aligned encoder written to {result.output_dir}"]
    if "unsafe_cosine" in held:
        line.append(f"held-out unsafe cosine {held['unsafe_cosine']['after']:.3f}")
    if "safe_relative_drift" in held:
        line.append(f"held-out safe drift {held['safe_relative_drift']['after']:.3f}")
    pooled = held.get("pooled", {})
    if "unsafe_cosine" in pooled:
        line.append(f"pooled: unsafe cosine {pooled['unsafe_cosine']['after']:.3f}")
    if "safe_relative_drift" in pooled:
        line.append(f"pooled: safe drift {pooled['safe_relative_drift']['after']:.3f}")
    print("; ".join(line))
    return 0


def _add_generation_flags(p) -> None:
    """Sampling flags shared by `generate` and `evaluate`."""
    from safetext.generation import GenerationConfig

    defaults = GenerationConfig()
    p.add_argument("--images-per-prompt", type=int, default=defaults.images_per_prompt)
    p.add_argument("--num-inference-steps", type=int, default=defaults.num_inference_steps)
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=defaults.guidance_scale,
        help="used where a prompt has no evaluation_guidance",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="base seed where a prompt has no evaluation_seed")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per pipeline call")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)


def _generation_config(args):
    from safetext.generation import GenerationConfig

    try:
        config = GenerationConfig(
            images_per_prompt=args.images_per_prompt,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            batch_size=args.batch_size,
            height=args.height,
            width=args.width,
        )
    except ValueError as error:
        raise SafeTextError(str(error)) from None
    return config


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images for a prompt set (seeded, resumable)")
    p.add_argument("--model", required=True, help="pipeline folder or Hub id, or a folder written by align")
    p.add_argument("--revision", default=None)
    p.add_argument("--prompts", required=True, metavar="FILE|NAME", help=PROMPTS_HELP)
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--category", default=None, help="keep only CSV rows whose 'categories' contain this")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--out", required=True, type=Path)
    _add_generation_flags(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from safetext.datasets import load_dataset
    from safetext.generation import generate

    config = _generation_config(args)
    prompts = load_dataset(args.prompts, args.data_dir, category=args.category, max_prompts=args.max_prompts)
    _quiet_library_progress_bars()
    record = generate(
        args.model, prompts, args.out, config, revision=args.revision, show_progress=not args.no_progress
    )
    print(f"{record['images']} images in {args.out}")
    return 0


def _add_miniworld(subparsers) -> None:
    p = subparsers.add_parser("miniworld", help="MiniWorld, the small text-to-image model the project trains")
    commands = p.add_subparsers(dest="miniworld_command", required=True, parser_class=_Parser)
    build = commands.add_parser(
        "build",
        help="retrain MiniWorld from scratch (seeded; about 1.5 hours on 2 CPU cores with native bfloat16)",
    )
    build.add_argument(
        "--out",
        required=True,
        type=Path,
        help="empty or missing folder for the pipeline; a folder holding an interrupted build's stages/ resumes it",
    )
    build.add_argument("--quick", action="store_true", help="tiny models, a few steps per stage (a smoke test)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", default="cpu", help="cpu (the reference recipe) or cuda (faster)")
    build.add_argument(
        "--keep-stages", action="store_true", help="keep the mini-CLIP and autoencoder in OUT-stages/ after the build"
    )
    build.add_argument(
        "--keep-bf16",
        action="store_true",
        help="train under bf16 even where the device has no native bfloat16 (many times slower; float32 otherwise)",
    )
    build.set_defaults(run=_run_miniworld_build)
    quality = commands.add_parser("quality", help="measure a MiniWorld build's quality gates into its model card")
    quality.add_argument("--model", default="miniworld", help="MiniWorld pipeline folder (default: the shipped one)")
    # left unset here, so that safetext.miniworld.quality's own defaults (the gates' settings) apply
    quality.add_argument("--steps", type=int, help="denoising steps (default: the gates' own setting)")
    quality.add_argument(
        "--per-class", type=int, help="single-object prompts per object class (default: the gates' own setting)"
    )
    quality.add_argument("--device", default="cpu", help="where the pipeline draws: cpu or cuda")
    quality.set_defaults(run=_run_miniworld_quality)


def _run_miniworld_quality(args) -> int:
    from safetext.loading import resolve_model_name
    from safetext.miniworld.quality import main as quality_main

    folder = resolve_model_name(args.model)
    _quiet_library_progress_bars()
    argv = ["--model", str(folder), "--device", args.device]
    for option, value in (("--steps", args.steps), ("--per-class", args.per_class)):
        if value is not None:
            argv += [option, str(value)]
    return quality_main(argv)


def _run_miniworld_build(args) -> int:
    from dataclasses import replace

    from safetext.miniworld.build import BuildConfig, build

    _quiet_library_progress_bars()
    try:
        config = (BuildConfig.quick if args.quick else BuildConfig)(seed=args.seed, device=args.device)
        config = replace(config, float32_without_native_bf16=not args.keep_bf16)
        record = build(args.out, config, keep_stages=args.keep_stages)
    except ValueError as error:
        raise SafeTextError(str(error)) from None
    print(f"MiniWorld pipeline written to {args.out} in {record['wall_time_s']:.0f} s")
    return 0


def _add_tiny_model(subparsers) -> None:
    p = subparsers.add_parser("tiny-model", help="write a tiny random pipeline with the real tokenizer, offline")
    p.add_argument("--family", default="sd", help="pipeline family: sd (SD 1.x), sd2, sdxl, sd3 or flux")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_tiny_model)


def _run_tiny_model(args) -> int:
    from safetext.tiny_models import create_tiny_pipeline

    path = create_tiny_pipeline(args.out, family=args.family, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny {args.family} pipeline written to {path}")
    return 0


def _add_datasets(subparsers) -> None:
    p = subparsers.add_parser("datasets", help="list the registered prompt sets and whether each is here")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.set_defaults(run=_run_datasets)


def _run_datasets(args) -> int:
    from safetext.datasets import list_datasets, resolve_cache_dir, resolve_data_dir

    statuses = list_datasets(args.data_dir)
    print(f"{'name':<30} {'prompts':>7} {'here':<8} {'licence':<36} source")
    for status in statuses:
        here = status.location or ("unusable" if status.problem else "-")
        prompts = "?" if status.prompts is None else status.prompts
        print(f"{status.dataset.name:<30} {prompts:>7} {here:<8} {status.dataset.licence:<36} {status.dataset.origin}")
    for status in statuses:
        if status.problem:
            print(f"unusable: {status.problem}")
    print(
        f"data folder: {resolve_data_dir(args.data_dir) or 'none'}; cache: {resolve_cache_dir()}; "
        "sets marked - are downloaded on first use"
    )
    return 0


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="measure an aligned model against its original (NRR, ASR, LPIPS, FID)")
    p.add_argument("--original", required=True, help="the model before alignment: pipeline folder or Hub id")
    p.add_argument("--aligned", required=True, help="the aligned model: a folder written by align, or a pipeline")
    p.add_argument(
        "--unsafe", action="append", default=[], metavar="FILE|NAME", help="unsafe prompts: " + PROMPTS_HELP
    )
    p.add_argument("--safe", action="append", default=[], metavar="FILE|NAME", help="safe prompts: " + PROMPTS_HELP)
    p.add_argument(
        "--recipe",
        default=None,
        help="evaluate on a recipe's held-out sets (training prompts removed); --unsafe/--safe sets are added",
    )
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--unsafe-category", default=None, help="keep only unsafe CSV rows whose 'categories' contain this")
    p.add_argument("--max-prompts", type=int, default=None, help="use at most N prompts of each file")
    p.add_argument(
        "--detector",
        default="nudenet",
        help="detector run on images of unsafe prompts: nudenet, opennsfw (a second opinion), or miniworld",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="lowest detector score counted (default: the detector's own, 0.6 for nudenet)",
    )
    _add_generation_flags(p)
    p.add_argument("--real-images", type=Path, default=None, help="folder of real images for FID (e.g. COCO)")
    p.add_argument("--out", required=True, type=Path, help="output folder; images already there are reused")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from safetext.datasets import load_dataset
    from safetext.evaluation.evaluate import EvaluationConfig, evaluate

    generation = _generation_config(args)
    try:
        config = EvaluationConfig(generation=generation, detector=args.detector, threshold=args.threshold)
    except ValueError as error:
        raise SafeTextError(str(error)) from None
    unsafe, safe = {}, {}
    if args.recipe:
        from safetext.recipes import load_heldout

        unsafe, safe = load_heldout(args.recipe, args.data_dir)
        if args.max_prompts is not None:
            unsafe, safe = (
                {k: v.subset(range(min(len(v), args.max_prompts))) for k, v in d.items()} for d in (unsafe, safe)
            )
    if not (unsafe or args.unsafe) and not (safe or args.safe):
        raise SafeTextError("give prompts to evaluate on: --unsafe FILE and/or --safe FILE, or --recipe NAME")
    taken = set(unsafe) | set(safe)
    for f in args.unsafe:
        unsafe[_set_name(f, taken)] = load_dataset(
            f, args.data_dir, category=args.unsafe_category, max_prompts=args.max_prompts
        )
    for f in args.safe:
        safe[_set_name(f, taken)] = load_dataset(f, args.data_dir, max_prompts=args.max_prompts)
    _quiet_library_progress_bars()
    record = evaluate(
        args.original,
        args.aligned,
        unsafe,
        safe,
        args.out,
        config,
        real_images=args.real_images,
        show_progress=not args.no_progress,
    )
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0  # under accelerate launch the main process prints the table

    def number(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    def bounds(interval):
        return "n/a" if interval is None else f"{interval[0]:.3f} to {interval[1]:.3f}"

    print(
        f"{'unsafe set':<24} {'images':>6} {'NRR':>7} {'NRR 95%':>16} {'ASR original':>12} {'ASR aligned':>11} "
        f"{'ASR change 95%':>17}"
    )
    for name, result in record["unsafe"].items():
        print(
            f"{name:<24} {result['images']:>6} {number(result['nrr']):>7} {bounds(result['nrr_interval']):>16} "
            f"{number(result['asr']['original']):>12} {number(result['asr']['aligned']):>11} "
            f"{bounds(result['asr_change_interval']):>17}"
        )
    print(
        f"{'safe set':<24} {'images':>6} {'LPIPS':>7} {'FID_g':>8} {'FID real original':>17} {'aligned':>8} "
        f"{'detected unasked':>16}"
    )
    for name, result in record["safe"].items():
        real = result["fid_real"] or {}
        found = result["images_with_detection"]
        unasked = "n/a" if found is None else f"{found['original']} -> {found['aligned']}"
        print(
            f"{name:<24} {result['images']:>6} {number(result['lpips']):>7} {number(result['fid_g'], 2):>8} "
            f"{number(real.get('original'), 2):>17} {number(real.get('aligned'), 2):>8} {unasked:>16}"
        )
    cost = record["cost"]
    print(
        f"{cost['images_drawn_now']} images drawn, {cost['images_reused']} reused, {cost['wall_seconds']:.1f} s; "
        f"results in {args.out / 'results.json'}"
    )
    return 0


def _add_report(subparsers) -> None:
    p = subparsers.add_parser("report", help="write a static HTML page of one or more evaluation folders")
    p.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="folders written by evaluate (or demo)")
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default: DIR/report.html)")
    p.add_argument("--no-blur", action="store_true", help="show images the detector flagged without pixelation")
    p.add_argument("--images-per-set", type=int, default=12, help="image pairs shown per prompt set (default 12)")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from safetext.evaluation.report import write_report

    path = write_report(args.folders, args.out, blur=not args.no_blur, images_per_set=args.images_per_set)
    print(f"report written to {path}")
    return 0


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="SafeText on MiniWorld end to end: align, generate, evaluate, report")
    p.add_argument("--out", required=True, type=Path, help="output folder (results.json, report.html, images)")
    p.add_argument("--model", default="miniworld", help="the MiniWorld pipeline (default: the shipped one)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per image (default 50)")
    p.add_argument(
        "--max-prompts", type=int, default=30, help="prompts per evaluation set but prompt following's (default 30)"
    )
    p.add_argument(
        "--safe-prompts",
        type=int,
        default=30,
        help="safe prompts for prompt following, of the 60 the alignment never trains on (default 30)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from safetext.miniworld.demo import DemoConfig, check_model_available, run_demo

    try:
        config = DemoConfig(
            num_inference_steps=args.steps, max_prompts=args.max_prompts, safe_prompts=args.safe_prompts
        )
    except ValueError as error:
        raise SafeTextError(str(error)) from None
    check_model_available(args.model)
    _quiet_library_progress_bars()
    record = run_demo(args.out, config, model=args.model, show_progress=not args.no_progress)

    def percent(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    def interval(bounds, points=False):
        if bounds is None:
            return "n/a"
        if points:
            return f"{100 * bounds[0]:+.1f} to {100 * bounds[1]:+.1f} points"
        return f"{percent(bounds[0])} to {percent(bounds[1])}"

    intervals = record["intervals"]
    print(f"SafeText on MiniWorld, restricted concept {record['demo']['concept']!r} (95% intervals in brackets)")
    for group, value in record["removal_rate"].items():
        rates = record["concept_rate"][group]
        print(
            f"  removal rate, {group + ' forms':<15} {percent(value):>7}   "
            f"(present {percent(rates['original'])} -> {percent(rates['aligned'])}) "
            f"[{interval(intervals['removal_rate'][group])}]"
        )
    for key, title in (("prompt_following", "prompt following"), ("subject_kept", "subject kept")):
        change = record["changes"][key]
        print(
            f"  {title:<29} {percent(record[key]['original'])} -> {percent(record[key]['aligned'])}   "
            f"(lost {change['lost']}, gained {change['gained']}) [{interval(intervals[key], points=True)}]"
        )
    unasked = record["unprompted_rate"]
    print(f"  {'present unasked':<29} {percent(unasked['original'])} -> {percent(unasked['aligned'])}")
    at_floor = ", ".join(f"{group} {percent(value)}" for group, value in record["removal_at_unprompted_rate"].items())
    print(f"  {'removal at the unasked rate':<29} {at_floor} (over-erasure prompts name no pattern)")
    for gate in record["demo"]["gates"]:
        print(f"  {'PASS' if gate['passed'] else 'FAIL'} {gate['name']} ({gate['required']})")
    print(f"{record['seconds']:.0f} s; results in {args.out / 'results.json'}, page in {args.out / 'report.html'}")
    return 0


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Reports bad arguments by raising, so that main() prints one line and returns 2 instead of exiting."""

    def error(self, message):
        raise _ArgumentError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="safetext", description="Safe text-to-image models by aligning the text encoder (SafeText).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_align(subparsers)
    _add_generate(subparsers)
    _add_tiny_model(subparsers)
    _add_miniworld(subparsers)
    _add_evaluate(subparsers)
    _add_report(subparsers)
    _add_demo(subparsers)
    _add_datasets(subparsers)
    return parser


def _quiet_library_progress_bars() -> None:
    """Loading bars of diffusers and transformers would bury safetext's own single bar (imports them: ~seconds)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv=None) -> int:
    """Runs the command line; returns the exit code (0 success, 2 bad input, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except _ArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_request:  # --help
        return int(exit_request.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.run(args)
    except SafeTextError as error:
        print(f"safetext: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safetext: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
