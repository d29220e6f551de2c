"""Throughput of SafeText alignment on a text encoder of SD v1.4's exact shape, against this machine's matmul peak.

The encoder is CLIP ViT-L/14's text tower (12 layers, width 768, 12 heads, MLP 3072, 77 tokens, vocabulary
49,408), randomly initialised because no real weights can be had offline; the arithmetic is the same. The run
goes through `safetext.align` itself (the real training loop with its cached reference embeddings); per-step time
is read from the run's JSONL log, skipping the first step (warm-up). For comparison, the same step is also timed
without the cache, i.e. with the forward passes through a frozen copy of the encoder that the cache saves.

A float32 matmul peak is measured in the same process, so the final ratio is comparable across noisy machines.
Prints the figures and, as its last line, `ratio_to_matmul_peak=<x>`; writes them to
`benchmarks/results/align_throughput.json`.

With `--adversarial-epsilon EPS` the same run is repeated with the adversary (`safetext.adversarial`) and its step
time reported as a ratio to the plain step's, both measured in this run; the record then goes to
`benchmarks/results/align_throughput-adversarial.json`.

    python benchmarks/align_throughput.py [--steps 6] [--batch-size 8] [--adversarial-epsilon 0.3]
"""

import argparse
import copy
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def sd14_text_encoder_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def train_step_flops(config, prompts_per_step: int, tokens: int) -> float:
    """Matmul FLOPs of one full fine-tuning step: forward, plus a backward pass that costs twice the forward."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    projections = 2 * (4 * d * d + 2 * d * ff)  # q, k, v, out and the two MLP matrices, per token
    attention = 2 * 2 * tokens * d  # scores and weighted sum, per token
    forward = prompts_per_step * tokens * layers * (projections + attention)
    return 3.0 * forward


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def write_model(directory: Path, seed: int = 0) -> Path:
    """A pipeline-shaped folder with an SD v1.4-sized random text encoder and the real CLIP tokenizer."""
    from transformers import CLIPTextModel

    from safetext.clip_tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    CLIPTextModel(sd14_text_encoder_config()).save_pretrained(directory / "text_encoder", safe_serialization=True)
    build_clip_tokenizer(directory / "tokenizer")
    return directory


def prompts(kind: str, n: int):
    from safetext.prompts import PromptSet

    subjects = ["a cat", "a city street", "a mountain lake", "a bowl of fruit", "an old ship", "a forest path"]
    return PromptSet([f"{kind} picture {i} of {subjects[i % len(subjects)]}, detailed, 4k" for i in range(n)])


def time_uncached_step(model_dir: Path, batch_size: int, repeats: int) -> float:
    """One step as it would run without the cache: the reference comes from a frozen copy, every step."""
    from safetext.conditioning import TextConditioner, TokenizedPrompts, position_mask
    from safetext.loading import load_text_encoder
    from safetext.losses import safetext_loss

    loaded = load_text_encoder(model_dir)
    conditioner = TextConditioner.for_encoder(loaded.tokenizer, loaded.text_encoder, bare=False)
    reference_encoder = copy.deepcopy(loaded.text_encoder)
    trained = loaded.text_encoder.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-5, fused=True)  # as the alignment loop does
    unsafe = conditioner.tokenize(prompts("unsafe", batch_size).prompts)
    safe = conditioner.tokenize(prompts("safe", batch_size).prompts)
    both = TokenizedPrompts.concatenate([unsafe, safe])
    unsafe_mask = position_mask(unsafe.attention_mask, "no_bos")
    safe_mask = position_mask(safe.attention_mask, "all")
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.no_grad():
            ref_u, ref_s = conditioner.encode(reference_encoder, both).split([batch_size, batch_size])
        emb_u, emb_s = conditioner.encode(trained, both).split([batch_size, batch_size])
        terms = safetext_loss(emb_s, ref_s, safe_mask, emb_u, ref_u, unsafe_mask, effectiveness_weight=0.5)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / repeats


def main(argv=None) -> int:
    from safetext import AlignmentConfig, align
    from safetext.provenance import package_versions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps (the first is warm-up)")
    # the library's default batch: 8 unsafe + 8 safe prompts a step
    parser.add_argument("--batch-size", type=int, default=8, help="unsafe prompts per step (as many safe ones)")
    parser.add_argument(
        "--adversarial-epsilon",
        type=float,
        default=None,
        help="also time the same run with the adversary at this radius (its default steps and block), as a ratio",
    )
    parser.add_argument("--out", type=Path, default=None, help="result file (default: results/align_throughput*.json)")
    args = parser.parse_args(argv)
    if args.out is None:
        suffix = "-adversarial" if args.adversarial_epsilon else ""
        args.out = Path(__file__).parent / "results" / f"align_throughput{suffix}.json"

    peak = matmul_peak()
    config = sd14_text_encoder_config()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "model")
        run_config = AlignmentConfig(
            learning_rate=1e-5,
            train_batch_size=args.batch_size,
            max_train_steps=args.steps,
            heldout_fraction=0.1,
            checkpointing_steps=0,
            checkpoints_total_limit=1,
        )
        n_train = args.batch_size * args.steps

        def timed_run(config):
            result = align(
                model_dir,
                {"unsafe": prompts("unsafe", n_train + 2)},
                {"safe": prompts("safe", n_train + 2)},
                Path(tmp) / "out",
                config,
                overwrite=True,
                show_progress=False,
            )
            lines = (Path(tmp) / "out" / "logs" / "train_log.jsonl").read_text().splitlines()
            log = [json.loads(line) for line in lines]
            return result, log, (log[-1]["seconds"] - log[0]["seconds"]) / (len(log) - 1)

        result, log, cached_step = timed_run(run_config)
        uncached_step = time_uncached_step(model_dir, args.batch_size, repeats=3)
        adversarial_step = None
        if args.adversarial_epsilon:
            adversarial = replace(run_config, adversarial_epsilon=args.adversarial_epsilon)
            _, _, adversarial_step = timed_run(adversarial)
    peak_after = matmul_peak()
    peak = max(peak, peak_after)

    flops = train_step_flops(config, 2 * args.batch_size, 77)
    achieved = flops / cached_step
    ratio = achieved / peak
    record = {
        "benchmark": "align_throughput",
        "encoder": "CLIP ViT-L/14 text tower (SD v1.4 shape), random weights",
        "parameters": result.record["model"]["parameters"],
        "prompts_per_step": 2 * args.batch_size,
        "tokens_per_prompt": 77,
        "steps_timed": len(log) - 1,
        "flops_per_step": flops,
        "seconds_per_step_cached_reference": cached_step,
        "seconds_per_step_uncached_reference": uncached_step,
        "speedup_from_cache": uncached_step / cached_step,
        "achieved_flops": achieved,
        "matmul_peak_flops": peak,
        "ratio_to_matmul_peak": ratio,
        "torch_threads": torch.get_num_threads(),
        **(
            {}
            if adversarial_step is None
            else {
                "adversarial": {
                    "epsilon": args.adversarial_epsilon,
                    "steps": AlignmentConfig().adversarial_steps,
                    "layer": AlignmentConfig().adversarial_layer,
                },
                "seconds_per_step_adversarial": adversarial_step,
                "adversarial_cost_ratio": adversarial_step / cached_step,
            }
        ),
        "versions": package_versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"encoder parameters: {record['parameters'] / 1e6:.1f} M; {2 * args.batch_size} prompts x 77 tokens per step"
    )
    print(f"matmul peak (float32): {peak / 1e9:.1f} GFLOP/s")
    print(
        f"step with reference cache: {cached_step:.3f} s; without: {uncached_step:.3f} s "
        f"({record['speedup_from_cache']:.2f}x)"
    )
    print(f"achieved: {achieved / 1e9:.1f} GFLOP/s")
    if adversarial_step is not None:
        print(
            f"step with the adversary (epsilon {args.adversarial_epsilon}): {adversarial_step:.3f} s, "
            f"{record['adversarial_cost_ratio']:.2f}x the plain step"
        )
    print(f"ratio_to_matmul_peak={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
