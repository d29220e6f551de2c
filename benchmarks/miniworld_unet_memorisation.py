"""Whether MiniWorld's UNet has learnt its own pool of pictures better than the world: its denoising loss on scenes
it trained on against fresh scenes of the same world.

The UNet trains on a fixed pool of scenes (`UNetConfig.num_scenes`, 32,000 in the recipe), rendered and encoded once
and drawn again and again with fresh captions, noise and timesteps. If a longer schedule lowers the training loss
while the pictures get worse, the gap between the two losses says whether the UNet is fitting the pool rather than
the world. For each model this rebuilds the first `--scenes` scenes of its pool (from the seed and pool size its
`build.json` records) and as many fresh scenes from another seed, captions both with the same caption stream, and
measures the plain noise-prediction MSE (no min-SNR weighting) at ten timesteps from 50 to 950, with the same noise
for both sets, on the latents' posterior means, in float32; and, on the fresh scenes, the same loss with the empty
prompt, which says how much the caption tells the UNet (what classifier-free guidance amplifies). Models measured on
the same `--scenes` and `--seed` share their scenes, captions and noise, so their losses compare pairwise (builds of
the recipe share their pool's seed). Writes `benchmarks/results/miniworld_unet_memorisation.json`.

    python benchmarks/miniworld_unet_memorisation.py --model miniworld [--model DIR] [--scenes 512] [--seed 0]
"""

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from safetext.conditioning import TextConditioner
from safetext.errors import SafeTextError
from safetext.loading import resolve_model_name
from safetext.miniworld.captions import caption
from safetext.miniworld.scenes import SceneDistribution, sample_scene
from safetext.miniworld.unet_training import SD_BETAS, encode_pool

TIMESTEPS = tuple(range(50, 1000, 100))
# fresh scenes come from a stream no build's pool uses (pools are seeded with the build's seed + 2)
FRESH_SEED_OFFSET = 1_000_003
BATCH_SIZE = 64


@torch.no_grad()
def denoising_loss(pipeline, latents: torch.Tensor, captions: list[str], seed: int) -> dict[int, float]:
    """Mean plain MSE of the UNet's noise prediction per timestep, on scaled latents and their captions."""
    conditioner = TextConditioner.for_encoder(pipeline.tokenizer, pipeline.text_encoder, bare=False)
    hidden = conditioner.encode_all(pipeline.text_encoder, conditioner.tokenize(captions), BATCH_SIZE)
    unet, scheduler = pipeline.unet, pipeline.scheduler
    generator = torch.Generator().manual_seed(seed)
    losses = {}
    for t in TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((len(latents),), t, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        per_batch = []
        for i in range(0, len(latents), BATCH_SIZE):
            prediction = unet(noisy[i : i + BATCH_SIZE], timesteps[i : i + BATCH_SIZE], hidden[i : i + BATCH_SIZE])
            per_batch.append(F.mse_loss(prediction.sample, noise[i : i + BATCH_SIZE], reduction="sum").item())
        losses[t] = sum(per_batch) / noise.numel()
    return losses


def main() -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a MiniWorld pipeline folder or 'miniworld'")
    parser.add_argument("--scenes", type=int, default=512, help="scenes from the pool, and as many fresh ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the captions and the noise")
    args = parser.parse_args()
    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    folders = {}
    for name in args.model:
        try:
            folders[name] = Path(resolve_model_name(name))
        except SafeTextError as error:
            parser.error(str(error))
        if not (folders[name] / "build.json").is_file():
            parser.error(f"{name} has no build.json: its pool's seed and size are unknown")
    torch.manual_seed(0)
    record = {
        "command": "python benchmarks/miniworld_unet_memorisation.py "
        + " ".join(f"--model {name}" for name in args.model)
        + f" --scenes {args.scenes} --seed {args.seed}",
        "timesteps": list(TIMESTEPS),
        "loss": "plain noise-prediction MSE, float32, posterior-mean latents",
        "models": {},
    }
    for name, folder in folders.items():
        start = time.time()
        unet_config = json.loads((folder / "build.json").read_text())["stages"]["unet"]["config"]
        # train_unet draws its pool first from random.Random(seed), so the first scenes of that stream are the pool's
        pool_rng = random.Random(unet_config["seed"])
        # in the UNet's own share of patterns (a record older than the setting had the world's)
        distribution = SceneDistribution(pattern_rate=unet_config.get("pattern_rate", SceneDistribution.pattern_rate))
        pool = [sample_scene(pool_rng, distribution) for _ in range(min(args.scenes, unet_config["num_scenes"]))]
        fresh_rng = random.Random(unet_config["seed"] + FRESH_SEED_OFFSET)
        fresh = [sample_scene(fresh_rng, distribution) for _ in range(len(pool))]
        pipeline = StableDiffusionPipeline.from_pretrained(
            folder, use_safetensors=True, safety_checker=None, dtype=torch.float32
        )
        pipeline.scheduler = DDPMScheduler(**SD_BETAS)
        by_set, latents = {}, {}
        for set_name, scenes in (("pool", pool), ("fresh", fresh)):
            # the posterior means of the training stage's own encoding, scaled as the UNet saw them
            means = encode_pool(pipeline.vae, scenes, "cpu", BATCH_SIZE)[0]
            latents[set_name] = means * pipeline.vae.config.scaling_factor
            caption_rng = random.Random(args.seed)
            captions = [caption(scene, caption_rng) for scene in scenes]
            by_set[set_name] = denoising_loss(pipeline, latents[set_name], captions, args.seed)
        # how much the caption tells the UNet: the fresh scenes again with the empty prompt (guidance's other branch)
        unconditional = denoising_loss(pipeline, latents["fresh"], [""] * len(fresh), args.seed)
        gap = {t: by_set["fresh"][t] / by_set["pool"][t] for t in TIMESTEPS}
        record["models"][name] = {
            "folder": str(folder),
            "unet_steps": unet_config["max_train_steps"],
            "pool_size": unet_config["num_scenes"],
            "uses_per_scene": unet_config["max_train_steps"]
            * unet_config["train_batch_size"]
            / unet_config["num_scenes"],
            "scenes": len(pool),
            "loss_pool": {str(t): v for t, v in by_set["pool"].items()},
            "loss_fresh": {str(t): v for t, v in by_set["fresh"].items()},
            "fresh_over_pool": {str(t): v for t, v in gap.items()},
            "mean_loss_pool": float(np.mean(list(by_set["pool"].values()))),
            "mean_loss_fresh": float(np.mean(list(by_set["fresh"].values()))),
            "loss_fresh_empty_prompt": {str(t): v for t, v in unconditional.items()},
            "mean_loss_fresh_empty_prompt": float(np.mean(list(unconditional.values()))),
            "seconds": round(time.time() - start, 1),
        }
        entry = record["models"][name]
        print(
            f"{name}: {entry['unet_steps']} steps, {entry['uses_per_scene']:.0f} uses per scene; loss pool "
            f"{entry['mean_loss_pool']:.4f}, fresh {entry['mean_loss_fresh']:.4f} (x"
            f"{entry['mean_loss_fresh'] / entry['mean_loss_pool']:.3f}), fresh with the empty prompt "
            f"{entry['mean_loss_fresh_empty_prompt']:.4f}; fresh/pool by t: "
            + " ".join(f"{t}:{gap[t]:.3f}" for t in TIMESTEPS),
            flush=True,
        )
    record["num_threads"] = torch.get_num_threads()
    out = Path(__file__).parent / "results" / "miniworld_unet_memorisation.json"
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
