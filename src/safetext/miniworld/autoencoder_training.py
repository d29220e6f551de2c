"""MiniWorld's autoencoder: a small `AutoencoderKL` from 64x64x3 pictures to 16x16x4 latents, as SD's VAE.

SD's VAE down-samples by 8 (512 -> 64); MiniWorld's by 4 (64 -> 16), since its pictures are small and a 8x8 latent
would lose the stripes. Three `DownEncoderBlock2D`s down-sample twice (diffusers' last block does not). The loss
is SD's VAE loss without its GAN term: an L1 (+ L2) reconstruction, the LPIPS perceptual distance (AlexNet, the
project's own `safetext.evaluation.lpips`), and a small KL term towards the unit Gaussian. The perceptual term is
what keeps edges and stripes: with pixel losses alone the first full build's autoencoder blurred shapes so much
that the detector found only 14% to 54% of the objects in its reconstructions, and no stripes. After training the
latents' standard deviation is measured and its inverse stored as the VAE config's `scaling_factor`, the role of
SD's 0.18215.
"""

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from safetext.miniworld.precision import check_mixed_precision, training_autocast
from safetext.miniworld.progress import log_progress
from safetext.miniworld.renderer import IMAGE_SIZE, render, render_many, to_pixel_values
from safetext.miniworld.scenes import epoch_order, sample_scene

logger = logging.getLogger(__name__)


@dataclass
class AutoencoderConfig:
    """How the autoencoder is built and trained.

    Args:
        block_out_channels: widths of the three encoder (and decoder) blocks; 64x64 -> 16x16.
        norm_num_groups: groups of the blocks' group norms; every width must be a multiple of it. SD's VAE has 32
            groups over 128 to 512 channels; at MiniWorld's widths 32 or 16 groups would normalise single channels
            per picture, which slowed learning: 300 steps reached a loss of 0.228 with 16 groups, 0.138 with 4.
        layers_per_block: ResNet layers per block.
        latent_channels: channels of the latent, 4 as in SD.
        max_train_steps: optimisation steps.
        train_batch_size: pictures per step.
        num_pictures: pictures in the pool, rendered once (in worker processes) and drawn in shuffled passes; each
            is used about `max_train_steps * train_batch_size / num_pictures` times.
        learning_rate: peak AdamW learning rate (linear warm-up, then cosine decay to zero).
        lr_warmup_steps: steps of linear warm-up.
        kl_weight: weight of the KL term of the evidence lower bound, small so that reconstructions stay sharp.
        perceptual_weight: weight of the LPIPS term (0 trains on pixel losses alone; LPIPS needs the `eval`
            extra's weights).
        num_scaling_images: pictures whose latents measure `scaling_factor` (1 / their standard deviation).
        seed: seed of the scenes and the initialisation.
        mixed_precision: "bf16" runs the encoder, decoder and LPIPS under bfloat16 autocast (weights, optimiser
            and losses stay float32), as the build's recipe (`BuildConfig`) does; "no" trains in float32, as the
            builds before the fifth did. On two AMD EPYC cores with AVX512-BF16 a step ran 2.3 times faster under
            bf16, and learnt as well over a short schedule (`benchmarks/miniworld_autoencoder_precision.py`).
        crop_size: side of the square crops the autoencoder trains on, taken at a random place in each picture of the
            batch; None trains on the whole 64x64 pictures, as the builds before the fifth did; the build's recipe
            uses 32. The networks are convolutional, so a model trained on crops encodes and decodes whole
            pictures, as SD's VAE, trained at 256x256, serves 512x512 pictures. A 32x32 crop costs about a quarter
            of a picture. The LPIPS term sees less context on a crop: AlexNet's deeper maps are 1x1 at 32x32 (3x3 at
            64x64). It must be a multiple of 4 (the latent's cell) from 32 (AlexNet's smallest input is 31) to 64.
            With bf16, 32x32 crops ran the stage in 36 minutes on two cores instead of about 5 hours and kept the
            ceiling of the fourth build's whole-picture autoencoder
            (`benchmarks/miniworld_autoencoder_variant.py --crop-size 32 --mixed-precision bf16`), and the UNet
            trained on it passed the same gates, by a rule fixed in advance (docs/miniworld.md, the fifth build).
        num_threads: torch CPU threads (the recipe's machine has two cores; on a busy machine one can be faster).
    """

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    norm_num_groups: int = 4
    layers_per_block: int = 1
    latent_channels: int = 4
    max_train_steps: int = 5000
    train_batch_size: int = 64
    num_pictures: int = 48_000
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 100
    kl_weight: float = 1e-4
    perceptual_weight: float = 1.0
    num_scaling_images: int = 256
    seed: int = 0
    mixed_precision: str = "no"
    crop_size: int | None = None
    num_threads: int = 2

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision)
        if self.crop_size is not None and (self.crop_size % 4 or not 32 <= self.crop_size <= IMAGE_SIZE):
            raise ValueError(
                f"crop_size must be None or a multiple of 4 from 32 to {IMAGE_SIZE}, got {self.crop_size}"
            )
        if len(self.block_out_channels) != 3 or min(self.block_out_channels) < 1:
            raise ValueError(
                f"block_out_channels must be three positive widths (64 -> 16), got {self.block_out_channels}"
            )
        if self.norm_num_groups < 1 or any(width % self.norm_num_groups for width in self.block_out_channels):
            raise ValueError(
                f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups, "
                f"got {self.norm_num_groups}"
            )
        for name in ("layers_per_block", "latent_channels", "max_train_steps", "train_batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.lr_warmup_steps < self.max_train_steps:
            raise ValueError(
                f"lr_warmup_steps must be in [0, max_train_steps={self.max_train_steps}), got {self.lr_warmup_steps}"
            )
        if self.num_pictures < self.train_batch_size:
            raise ValueError(
                f"num_pictures must be at least train_batch_size={self.train_batch_size}, got {self.num_pictures}"
            )
        if self.num_scaling_images < 2:
            raise ValueError(f"num_scaling_images must be at least 2, got {self.num_scaling_images}")
        if self.learning_rate <= 0 or self.kl_weight < 0 or self.perceptual_weight < 0:
            raise ValueError(
                "learning_rate must be positive, kl_weight and perceptual_weight >= 0, got "
                f"{self.learning_rate}, {self.kl_weight}, {self.perceptual_weight}"
            )


def _sample_pictures(rng: random.Random, batch_size: int) -> torch.Tensor:
    images = np.stack([np.asarray(render(sample_scene(rng))) for _ in range(batch_size)])
    return to_pixel_values(images)


def random_crops(pictures: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    """Cuts one square crop out of each picture, each at its own place.

    Args:
        pictures: (N, H, W, C) array.
        size: side of the crops, at most H and W.
        rng: draws the crops' top-left corners, two numbers per picture.

    Returns:
        (N, size, size, C) array.
    """
    height, width = pictures.shape[1:3]
    corners = [(rng.randrange(height - size + 1), rng.randrange(width - size + 1)) for _ in range(len(pictures))]
    return np.stack([picture[y : y + size, x : x + size] for picture, (y, x) in zip(pictures, corners)])


def train_autoencoder(config: AutoencoderConfig, output_dir: str | Path, device: str = "cpu") -> dict:
    """Trains the autoencoder on a pool of renders and writes it as `output_dir/vae/` (diffusers layout, safetensors).

    Args:
        config: sizes and training settings.
        output_dir: folder that receives `vae/`; created if missing.
        device: where to train (`"cpu"`, `"cuda"`, ...); the pictures and noise are the same on every device.

    Returns:
        A record: config, parameter count, losses, the measured latent standard deviation and `scaling_factor`, the
        reconstruction error on held-out renders, and wall time.
    """
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    start = time.time()
    torch.set_num_threads(config.num_threads)
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    n = len(config.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels,
        norm_num_groups=config.norm_num_groups,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        sample_size=IMAGE_SIZE,
    )
    vae.to(device)
    perceptual = None
    if config.perceptual_weight > 0:
        from safetext.evaluation.lpips import LPIPS

        perceptual = LPIPS.from_pretrained("alex").requires_grad_(False).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.lr_warmup_steps, config.max_train_steps)

    pool_start = time.time()
    pool = render_many([sample_scene(rng) for _ in range(config.num_pictures)])
    pool_seconds = time.time() - pool_start
    order = epoch_order(rng, config.num_pictures, config.max_train_steps * config.train_batch_size)

    autocast = training_autocast(device, config.mixed_precision)
    vae.train()
    losses = []
    loop_start = time.time()
    progress = tqdm(range(config.max_train_steps), desc="autoencoder", disable=None)
    for step in progress:
        indices = order[step * config.train_batch_size : (step + 1) * config.train_batch_size]
        pictures = pool[indices] if config.crop_size is None else random_crops(pool[indices], config.crop_size, rng)
        pixel_values = to_pixel_values(pictures).to(device)
        with autocast:
            moments = vae.encode(pixel_values).latent_dist.parameters
        # the posterior, its sample and every loss in float32, whatever the network ran in
        posterior = DiagonalGaussianDistribution(moments.float())
        # noise from a CPU generator, so that a run is the same draw on any device
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents = posterior.mean + posterior.std * noise
        with autocast:
            reconstruction = vae.decode(latents).sample
            distance = perceptual(reconstruction, pixel_values).mean() if perceptual is not None else None
        reconstruction = reconstruction.float()
        l1 = F.l1_loss(reconstruction, pixel_values)
        l2 = F.mse_loss(reconstruction, pixel_values)
        # per latent element, so that the weight does not depend on the latent's size
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + l2 + config.kl_weight * kl
        if distance is not None:
            loss = loss + config.perceptual_weight * distance.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        progress.set_postfix(l1=f"{l1.item():.4f}", l2=f"{l2.item():.4f}", kl=f"{kl.item():.2f}")
        log_progress("autoencoder", step, config.max_train_steps, losses, loop_start)

    loop_seconds = time.time() - loop_start
    vae.eval()
    # a stream of scenes the training never drew
    held_out = random.Random(config.seed + 10_000)
    with torch.no_grad():
        sizes = [min(64, config.num_scaling_images - i) for i in range(0, config.num_scaling_images, 64)]
        pictures = [_sample_pictures(held_out, size).to(device) for size in sizes]
        posteriors = [vae.encode(batch).latent_dist for batch in pictures]
        latents = torch.cat(
            [p.mean + p.std * torch.randn(p.mean.shape, generator=generator).to(device) for p in posteriors]
        )
        reconstruction_l1 = float(
            np.mean([F.l1_loss(vae.decode(vae.encode(b).latent_dist.mode()).sample, b).item() for b in pictures])
        )
    latent_std = float(latents.std())
    # SD scales latents to unit variance before diffusion (its 0.18215); the pipeline reads it from the config
    vae.register_to_config(scaling_factor=1.0 / latent_std)
    vae.to("cpu").save_pretrained(Path(output_dir) / "vae", safe_serialization=True)
    tenth = max(len(losses) // 10, 1)
    return {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in vae.parameters()),
        "loss_first_10pct": float(np.mean(losses[:tenth])),
        "loss_last_10pct": float(np.mean(losses[-tenth:])),
        "final_loss": losses[-1],
        "losses": losses,
        "latent_std": latent_std,
        "scaling_factor": 1.0 / latent_std,
        "held_out_reconstruction_l1": reconstruction_l1,
        "seconds_per_step": loop_seconds / config.max_train_steps,
        "pool_seconds": round(pool_seconds, 1),
        "uses_per_picture": config.max_train_steps * config.train_batch_size / config.num_pictures,
        "wall_time_s": round(time.time() - start, 1),
    }
