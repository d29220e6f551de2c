"""Memory of SafeText alignment per text encoder and mode, and what fits on 24, 40 and 80 GB GPUs per family.

Each measurement runs in a fresh subprocess: build one text encoder of a real architecture with random weights
(no weights can be had offline; the memory is the same), then take training steps as the alignment loop does
(forward and backward of a batch of prompts at the family's token window, AdamW on the trained parameters; a
frozen encoder only runs forward without gradients), and read the peak resident memory. Modes: full fine-tuning or
LoRA (rank 16 on the attention projections, through peft, as `--lora-rank 16`), each without and with gradient
checkpointing (transformers' own, non-reentrant, as `--gradient-checkpointing`).

T5-XXL's encoder (4.76 B parameters, 19 GB in float32) does not fit this machine's 24 GB with its training state,
so it is measured frozen (as it runs in SD3 and FLUX by default) with 2 of its 24 blocks and projected: weights
from its exact parameter count; a forward without gradients frees each block's activations as it goes, so its
peak is that of the 2 blocks. Training T5 is not measured.

From the CPU measurements (float32) the GPU projection per family is:
    frozen weights in bf16 (2 B/param) + trained weights, gradients and AdamW moments in fp32 (16 B/param trained;
    LoRA: base weights in bf16 and 16 B per adapter parameter) + activations as measured in float32 (an upper
    bound for bf16 mixed precision), + 1 GB for the CUDA context and allocator slack.

Resident memory is a coarse instrument: allocator caching and the order in which gradients, optimiser moments
and activations come and go move a step's peak by some hundreds of MB (LoRA's measured activations exceed full
fine-tuning's for the larger CLIPs), so read the table to within about 1 GB; a GPU run with
`torch.cuda.max_memory_allocated` is the check (none was available to this project yet).

    python benchmarks/memory.py            # writes benchmarks/results/memory.json and prints the table
    python benchmarks/memory.py --reuse    # the projection again from the measurements in that file
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

GB = 1024**3
BATCH = 8
LORA_RANK = 16
CUDA_OVERHEAD_GB = 1.0

# name: (architecture, config, token window, trained by default in its families)
ENCODERS = {
    "clip-l": ("clip", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
    "clip-h": ("clip", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)),
    "clip-g": (
        "clip_projection",
        dict(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
        ),
    ),
    "t5-xxl": ("t5", dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)),
}
T5_MEASURED_LAYERS = 2
TRAINED_MODES = [("full", False), ("full", True), ("lora", False), ("lora", True)]

# family: [(encoder, token window, trained by default)]
FAMILIES = {
    "sd1": [("clip-l", 77, True)],
    "sd2": [("clip-h", 77, True)],
    "sdxl": [("clip-l", 77, True), ("clip-g", 77, True)],
    "sd3": [("clip-l", 77, True), ("clip-g", 77, True), ("t5-xxl", 256, False)],
    "flux": [("clip-l", 77, True), ("t5-xxl", 512, False)],
}


def build(name: str, layers: int | None = None):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    kind, config = ENCODERS[name]
    torch.manual_seed(0)
    if kind == "t5":
        config = dict(config, num_layers=layers or config["num_layers"])
        return T5EncoderModel(
            T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False, **config)
        )
    model_class = CLIPTextModelWithProjection if kind == "clip_projection" else CLIPTextModel
    return model_class(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", **config))


def measure_one(name: str, window: int, mode: str, checkpointing: bool, layers: int | None, steps: int) -> dict:
    """Runs in the subprocess: the peak resident memory of building the encoder and of `steps` training steps."""
    import torch

    torch.set_num_threads(2)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    model = build(name, layers)
    parameters = sum(p.numel() for p in model.parameters())
    after_build = rss()
    model.eval()
    ids = torch.randint(0, 32000, (BATCH, window))
    start = time.perf_counter()
    if mode == "frozen":
        model.requires_grad_(False)
        with torch.no_grad():
            for _ in range(steps):
                model(ids)[0].sum()
        trainable = 0
    else:
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            targets = ["q", "k", "v", "o"] if name.startswith("t5") else ["q_proj", "k_proj", "v_proj", "out_proj"]
            model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets))
            model.eval()
        if checkpointing:
            base = model.get_base_model() if mode == "lora" else model
            # as safetext's loop does it (transformers 5 renamed gradient_checkpointing_enable)
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            from transformers.modeling_layers import GradientCheckpointingLayer

            for module in base.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in trained)
        optimizer = torch.optim.AdamW(trained, lr=1e-6)
        for _ in range(steps):
            output = model(input_ids=ids)[0]
            output.float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {
        "parameters": parameters,
        "trainable_parameters": trainable,
        "rss_after_build_bytes": after_build,
        "peak_rss_bytes": rss(),
        "seconds_per_step": (time.perf_counter() - start) / steps,
    }


def run_subprocess(name, window, mode, checkpointing, layers, steps) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps([name, window, mode, checkpointing, layers, steps])]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help="training steps per measurement")
    parser.add_argument("--reuse", action="store_true", help="recompute the projection from --out's measurements")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(*json.loads(args.child))))
        return
    if args.reuse:
        # the projection again from the measurements already in --out (the slow part is measuring)
        record = json.loads(Path(args.out).read_text())
        for m in record["measured"].values():
            m["activation_bytes"] = activation_bytes(m)
        write_projection(record["measured"], {"peak_rss_bytes": record["baseline_rss_bytes"]}, args.out)
        return

    baseline = run_subprocess("clip-l", 1, "frozen", False, None, 1)  # interpreter + torch + a small model
    measured = {}
    for name, window in (("clip-l", 77), ("clip-h", 77), ("clip-g", 77), ("t5-xxl", 256), ("t5-xxl", 512)):
        layers = T5_MEASURED_LAYERS if name == "t5-xxl" else None
        # T5 runs frozen in every family by default; training it is not measured here (a step of even 2 of its
        # blocks at 512 tokens takes minutes on a CPU)
        modes = [("frozen", False)] if name == "t5-xxl" else [("frozen", False), *TRAINED_MODES]
        for mode, checkpointing in modes:
            key = f"{name}@{window}:{mode}{'+ckpt' if checkpointing else ''}"
            result = run_subprocess(name, window, mode, checkpointing, layers, args.steps)
            if name == "t5-xxl":
                result["projected_from_layers"] = T5_MEASURED_LAYERS
            result["activation_bytes"] = activation_bytes(result)
            measured[key] = result
            print(
                f"{key:<32} peak {result['peak_rss_bytes'] / GB:6.2f} GB  activations {result['activation_bytes'] / GB:6.2f} GB"
                f"  {result['seconds_per_step']:.1f} s/step",
                flush=True,
            )

    write_projection(measured, baseline, args.out)


def activation_bytes(m: dict) -> float:
    """Memory a training step adds beyond the weights, less the gradients and AdamW moments of the trained
    parameters (12 B each in float32, counted apart in the projection): the activations and temporaries."""
    added = m["peak_rss_bytes"] - m["rss_after_build_bytes"] - 12 * m["trainable_parameters"]
    layers = m.get("projected_from_layers")
    # a training step keeps every block's activations for the backward pass, so they grow with depth; a frozen
    # forward without gradients frees each block's as it goes, so its peak is one block's whatever the depth
    scale = ENCODERS["t5-xxl"][1]["num_layers"] / layers if layers and m["trainable_parameters"] else 1
    return max(added, 0) * scale


def write_projection(measured: dict, baseline: dict, out: str) -> None:
    t5_parameters = _t5_parameters()
    rows = []
    for family, encoders in FAMILIES.items():
        for mode in ("full", "lora"):
            for checkpointing in (False, True):
                total = CUDA_OVERHEAD_GB * GB
                for name, window, trained in encoders:
                    suffix = "+ckpt" if checkpointing else ""
                    if trained:
                        m = measured[f"{name}@{window}:{mode}{suffix}"]
                        params = m["parameters"]
                        if mode == "full":
                            total += 16 * params
                        else:
                            total += 2 * params + 16 * m["trainable_parameters"]
                    else:
                        m = measured[f"{name}@{window}:frozen"]
                        params = t5_parameters if name == "t5-xxl" else m["parameters"]
                        total += 2 * params
                    total += m["activation_bytes"]
                rows.append(
                    {
                        "family": family,
                        "mode": mode,
                        "gradient_checkpointing": checkpointing,
                        "projected_gpu_gb": round(total / GB, 1),
                        **{f"fits_{size}gb": total / GB <= size for size in (24, 40, 80)},
                    }
                )
    record = {
        "batch": BATCH,
        "lora_rank": LORA_RANK,
        "baseline_rss_bytes": baseline["peak_rss_bytes"],
        "measured": measured,
        "t5_xxl_parameters": t5_parameters,
        "gpu_projection": rows,
        "note": "CPU float32 peak resident memory per subprocess; activations are peak minus after-build memory",
    }
    Path(out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'family':<6} {'mode':<5} {'ckpt':<5} {'GB':>6}  24  40  80")
    for row in rows:
        marks = "  ".join("yes" if row[f"fits_{s}gb"] else " no" for s in (24, 40, 80))
        print(
            f"{row['family']:<6} {row['mode']:<5} {str(row['gradient_checkpointing']):<5} {row['projected_gpu_gb']:>6}  {marks}"
        )


def _t5_parameters() -> int:
    """T5-XXL encoder's exact parameter count, from its shapes (no need to build 19 GB)."""
    c = ENCODERS["t5-xxl"][1]
    inner = c["num_heads"] * c["d_kv"]
    attention = 4 * c["d_model"] * inner
    feed_forward = 3 * c["d_model"] * c["d_ff"]  # gated-gelu: wi_0, wi_1, wo
    norms = 2 * c["d_model"]
    relative_bias = 32 * c["num_heads"]  # first block only
    return 32128 * c["d_model"] + c["num_layers"] * (attention + feed_forward + norms) + relative_bias + c["d_model"]


if __name__ == "__main__":
    main()
