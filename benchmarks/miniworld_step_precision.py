"""Why a MiniWorld UNet training step runs as fast as it does on this machine, in float32 and under bf16 autocast.

Measures, in one process on the recipe's threads:
- the cores' throughput on a large matrix product and on a 3x3 convolution of the UNet's finest level, in float32
  and in bfloat16 (the reference: what the hardware gives);
- the floating-point operations of one UNet training step at the recipe's shapes (batch 64, 16x16x4 latents, 77
  prompt tokens; `torch.utils.flop_counter`), and its seconds in float32, under bf16 autocast with PyTorch's
  scaled-dot-product attention, and under bf16 autocast with diffusers' classic attention processor (what
  `UNetConfig(mixed_precision="bf16")` uses on a CPU), and that last step again with the UNet and its input in
  channels-last memory format and, with `--compile`, under `torch.compile` (two ways to a faster step the recipe
  does not take; the compiled step's first call, which compiles it, is timed apart);
- the share of each step's CPU time spent in convolutions, and the seconds of its scaled-dot-product attention
  backward pass (`torch.profiler`).

Prints each step's GFLOP/s as a share of the float32 matrix product's, the bf16 steps' speed as a ratio to the float32
step's, and as its last line `bf16_speedup=<x>` (classic attention); writes
`benchmarks/results/miniworld_step_precision.json` (`-compile.json` with `--compile`; `-NAME` before `.json` with
`--record NAME`, e.g. the machine's). Times the network's forward
and backward passes only, with random inputs: no text encoder, data or optimiser (`miniworld_build_time.py` times
whole steps).

    python benchmarks/miniworld_step_precision.py [--repeats 5] [--threads 2] [--compile] [--record NAME]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from safetext.miniworld.unet_training import UNetConfig, build_unet
from safetext.provenance import cpu_description, git_commit, package_versions


def _seconds(function, repeats: int) -> float:
    """Median wall time of `function()` over `repeats` calls, after two warm-up calls."""
    for _ in range(2):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hardware(repeats: int) -> dict:
    """GFLOP/s of a 2048^2 matrix product and of a 64-channel 3x3 convolution on 64 16x16 maps, per dtype."""
    figures = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        matmul = 2 * 2048**3 / _seconds(lambda a=a, b=b: a @ b, repeats)
        x, w = torch.randn(64, 64, 16, 16, dtype=dtype), torch.randn(64, 64, 3, 3, dtype=dtype)
        conv = 2 * 64 * 64 * 9 * 16 * 16 * 64 / _seconds(lambda x=x, w=w: F.conv2d(x, w, padding=1), 10 * repeats)
        figures[name] = {"matmul_gflops": matmul / 1e9, "conv3x3_gflops": conv / 1e9}
    return figures


def _unet(config: UNetConfig, classic_attention: bool, channels_last: bool = False):
    """The recipe's UNet on the shipped mini-CLIP's width (128), freshly initialised."""
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    unet = build_unet(config, latent_channels=4, cross_attention_dim=128).train()
    if classic_attention:
        unet.set_attn_processor(AttnProcessor())
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (the median is kept)")
    parser.add_argument("--threads", type=int, default=UNetConfig().num_threads)
    parser.add_argument(
        "--compile", action="store_true", help="time the bf16 step under torch.compile too (minutes to compile)"
    )
    parser.add_argument("--record", help="a name for the result file's end, e.g. the machine's (-NAME.json)")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    config = UNetConfig()
    batch = config.train_batch_size
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)
    prompts = torch.randn(batch, 77, 128, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)

    hardware = _hardware(args.repeats)
    variants = [
        # name, bf16 autocast, classic attention, channels-last, compiled
        ("float32", False, False, False, False),
        ("bf16_sdpa_attention", True, False, False, False),
        ("bf16_classic_attention", True, True, False, False),
        ("bf16_classic_attention_channels_last", True, True, True, False),
    ]
    if args.compile:
        variants.append(("bf16_classic_attention_compiled", True, True, False, True))
    steps = {}
    compile_seconds = None
    for name, bf16, classic, channels_last, compiled in variants:
        unet = _unet(config, classic, channels_last)
        forward = torch.compile(unet) if compiled else unet
        inputs = latents.to(memory_format=torch.channels_last) if channels_last else latents

        def step(unet=unet, forward=forward, inputs=inputs, bf16=bf16):
            unet.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                prediction = forward(inputs, timesteps, prompts).sample
            prediction.float().square().mean().backward()

        if compiled:
            start = time.perf_counter()
            step()
            compile_seconds = time.perf_counter() - start
        seconds = _seconds(step, args.repeats)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            step()
        events = profiler.key_averages()
        total = sum(event.self_cpu_time_total for event in events)
        convolutions = sum(event.self_cpu_time_total for event in events if "convolution" in event.key)
        # the kernel's own time and its children's: a fallback to another backend would still be counted
        sdpa_backward = sum(
            event.cpu_time_total for event in events if "scaled_dot_product" in event.key and "backward" in event.key
        )
        if not classic and sdpa_backward == 0:
            raise RuntimeError("the profiler saw no scaled-dot-product attention backward pass in the SDPA step")
        steps[name] = {
            "seconds": seconds,
            "convolution_share_of_cpu_time": convolutions / total,
            "sdpa_backward_seconds": sdpa_backward / 1e6,
        }
    # torch's FLOP counter has no formula for the CPU flash-attention kernels, so the operations are counted once, on
    # the classic processor's matrix products, and the same work is divided by each variant's time
    unet = _unet(config, classic_attention=True)
    with FlopCounterMode(display=False) as counter:
        unet(latents, timesteps, prompts).sample.square().mean().backward()
    gflop = counter.get_total_flops() / 1e9
    reference = hardware["float32"]["matmul_gflops"]
    for figures in steps.values():
        figures["gflops"] = gflop / figures["seconds"]
        figures["share_of_float32_matmul"] = figures["gflops"] / reference
        figures["speedup_over_float32"] = steps["float32"]["seconds"] / figures["seconds"]
    record = {
        "command": " ".join(["python benchmarks/miniworld_step_precision.py", *sys.argv[1:]]),
        "platform": platform.platform(),
        **cpu_description(),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "cpu_threads": torch.get_num_threads(),
        "batch": batch,
        "gflop_per_step": gflop,
        "hardware": hardware,
        "unet_step": steps,
        "compile_seconds": compile_seconds,
    }
    suffix = ("-compile" if args.compile else "") + (f"-{args.record}" if args.record else "")
    out = Path(__file__).parent / "results" / f"miniworld_step_precision{suffix}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    for name, figures in hardware.items():
        print(
            f"{name}: matmul {figures['matmul_gflops']:.0f} GFLOP/s, 3x3 conv {figures['conv3x3_gflops']:.0f} GFLOP/s"
        )
    print(f"UNet training step (batch {batch}): {gflop:.1f} GFLOP")
    for name, figures in steps.items():
        print(
            f"  {name}: {figures['seconds']:.3f} s, {figures['gflops']:.0f} GFLOP/s "
            f"({figures['share_of_float32_matmul']:.2f} of the float32 matmul), "
            f"{figures['speedup_over_float32']:.2f}x the float32 step; convolutions "
            f"{figures['convolution_share_of_cpu_time']:.0%} of its CPU time, SDPA backward "
            f"{figures['sdpa_backward_seconds']:.3f} s"
        )
    if compile_seconds is not None:
        print(f"  (the compiled step's first call, which compiles it: {compile_seconds:.0f} s)")
    print(f"bf16_speedup={steps['bf16_classic_attention']['speedup_over_float32']:.2f}")


if __name__ == "__main__":
    main()
