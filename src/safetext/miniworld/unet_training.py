"""MiniWorld's diffusion model: a `UNet2DConditionModel` trained on the autoencoder's latents, conditioned on the
frozen mini-CLIP's last hidden states, and saved as a complete Stable Diffusion pipeline folder.

The recipe is SD v1's (diffusers' `train_text_to_image.py`): DDPM noise prediction with SD's scaled-linear betas
(1000 steps, 0.00085 to 0.012), latents scaled by the VAE's `scaling_factor`, prompts tokenised and padded to 77
tokens exactly as `StableDiffusionPipeline.encode_prompt` does, and a share of captions replaced by the empty
prompt so that the pipeline's classifier-free guidance has an unconditional model to extrapolate from.

Two choices make the most of a CPU hour. The pictures are a fixed pool of scenes, rendered and encoded once (the
posterior's mean and standard deviation are kept, and a fresh latent is sampled from them at every use), while
each use of a scene draws a fresh caption, noise and timestep: on two cores rendering and encoding cost almost as
much as a UNet step. And the loss is weighted by min-SNR-gamma (Hang et al., 2023, "Efficient Diffusion Training
via Min-SNR Weighting Strategy"; diffusers' `--snr_gamma`), which the paper measured to converge several times
faster than the plain noise-prediction loss.
"""

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from safetext.checkpointing import (
    STATE_FILE,
    list_checkpoints,
    load_checkpoint,
    load_extra_tensors,
    prune_checkpoints,
    same_settings,
    save_checkpoint,
)
from safetext.errors import SafeTextError
from safetext.miniworld.captions import caption
from safetext.miniworld.precision import check_mixed_precision, training_autocast
from safetext.miniworld.progress import log_progress
from safetext.miniworld.renderer import render_many, to_pixel_values
from safetext.miniworld.scenes import SceneDistribution, epoch_order, sample_scene
from safetext.miniworld.world import ATTRIBUTES

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DConditionModel

logger = logging.getLogger(__name__)

SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
"""SD v1.x's noise schedule, used for training and written into the pipeline's scheduler."""


@dataclass
class UNetConfig:
    """How the UNet is built and trained.

    Args:
        block_out_channels: widths of the UNet's three levels (16x16, 8x8, 4x4 latents); the two coarser levels
            have cross-attention to the prompt.
        layers_per_block: ResNet (and attention) layers per down block; up blocks have one more, as in diffusers.
        attention_head_dim: diffusers' `attention_head_dim` (in `UNet2DConditionModel` it is the number of heads):
            one number for every level, or one per level from 16x16 to 4x4. The 16x16 level's number counts only
            with `attention_at_16x16`.
        max_train_steps: optimisation steps, each on a fresh batch of scenes.
        train_batch_size: (latent, caption) pairs per step.
        learning_rate: peak AdamW learning rate (linear warm-up, then cosine decay to zero).
        lr_warmup_steps: steps of linear warm-up.
        caption_dropout: share of captions replaced by the empty prompt "", for classifier-free guidance.
        num_scenes: scenes in the pool of pictures, rendered and encoded once; each is used about
            `max_train_steps * train_batch_size / num_scenes` times, with a fresh caption every time.
        pattern_rate: chance that an object of the UNet's pool of scenes able to carry a pattern carries one
            (one of the patterns its class carries, each equally often; captions not dropped name it). The world's
            own 0.4 in the recipe, as the mini-CLIP and the autoencoder see; higher shows the UNet each pattern's
            name beside its look more often.
        snr_gamma: gamma of the min-SNR loss weighting (the paper's 5); None trains on the plain MSE.
        attention_at_16x16: give the finest level (16x16 latents) attention blocks too, self- and
            cross-attention to the prompt, as SD has at its finest levels. Off in the recipe: a CPU step runs at
            0.53 to 0.59 times its speed (`benchmarks/miniworld_build_time.py --unet-attention-at-16x16`), and a
            build with it (2 heads at 16x16) drew stripes no more often (docs/miniworld.md).
        mixed_precision: "bf16" runs the UNet's forward and backward passes under bfloat16 autocast (weights,
            optimiser, the frozen text encoder and the loss stay float32), the recipe's since the sixth build; on a
            CPU the attention then runs in diffusers' classic processor (see `train_unet`). "no" trains in float32,
            as the builds before the sixth did.
        ema_decay: keep an exponential moving average of the weights and save it as the pipeline's UNet, as SD's
            training did (diffusers' `EMAModel` and `train_text_to_image.py --use_ema`). After n steps its decay is
            min(ema_decay, n / (9 + n)) (0 after the first), so over a schedule of a few thousand steps the
            average's weights are about a tenth of the steps taken old on average. None (the recipe) saves the
            last weights.
        compile: train through `torch.compile(unet)` (Inductor; on a CPU it needs a C++ compiler). Off in the
            recipe: on two AVX512-BF16 cores the network's bf16 forward and backward passes alone ran 1.2 times
            faster compiled (`benchmarks/miniworld_step_precision.py --compile`), but the whole training step no
            faster (`benchmarks/miniworld_build_time.py --unet-compile`), after a cold compile of about 3 minutes
            (counted in the stage's time). The saved weights are the module's own, as without it.
        seed: seed of the scenes, captions, noise and initialisation.
        num_threads: torch CPU threads (the recipe's machine has two cores; on a busy machine one can be faster).
    """

    block_out_channels: tuple[int, ...] = (64, 96, 128)
    layers_per_block: int = 1
    attention_head_dim: int | tuple[int, ...] = 8
    max_train_steps: int = 4000
    train_batch_size: int = 64
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 100
    caption_dropout: float = 0.1
    num_scenes: int = 32_000
    pattern_rate: float = SceneDistribution.pattern_rate
    snr_gamma: float | None = 5.0
    attention_at_16x16: bool = False
    mixed_precision: str = "no"
    ema_decay: float | None = None
    compile: bool = False
    seed: int = 0
    num_threads: int = 2

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision)
        if len(self.block_out_channels) != 3 or min(self.block_out_channels) < 1:
            raise ValueError(f"block_out_channels must be three positive widths, got {self.block_out_channels}")
        if any(width % 32 for width in self.block_out_channels):
            # diffusers' UNet blocks use group norm with 32 groups
            raise ValueError(f"block_out_channels must be multiples of 32, got {self.block_out_channels}")
        heads = self.attention_head_dim
        if isinstance(heads, int):
            heads = (heads,) * len(self.block_out_channels)
        if len(heads) != len(self.block_out_channels) or min(heads) < 1:
            raise ValueError(f"attention_head_dim must be one positive number or three, got {self.attention_head_dim}")
        if any(width % count for width, count in zip(self.block_out_channels, heads)):
            raise ValueError(
                f"each level's width {self.block_out_channels} must divide into its heads {self.attention_head_dim}"
            )
        for name in (
            "layers_per_block",
            "max_train_steps",
            "train_batch_size",
            "num_scenes",
            "num_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.pattern_rate <= 1.0:
            raise ValueError(f"pattern_rate must be between 0 and 1, got {self.pattern_rate}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive or None, got {self.snr_gamma}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if not 0 <= self.lr_warmup_steps < self.max_train_steps:
            raise ValueError(
                f"lr_warmup_steps must be in [0, max_train_steps={self.max_train_steps}), got {self.lr_warmup_steps}"
            )


@torch.no_grad()
def encode_pool(vae, scenes: list, device: str, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders the scenes and returns their latent posteriors' means and standard deviations (on the CPU)."""
    means, stds = [], []
    pictures = render_many(scenes)
    for start in range(0, len(scenes), batch_size):
        pixel_values = to_pixel_values(pictures[start : start + batch_size])
        posterior = vae.encode(pixel_values.to(device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def patterned_share(scenes: list) -> float:
    """Share of the scenes' objects able to carry a pattern that carry one: about the distribution's `pattern_rate`,
    a little under it (the second object of a pair drawn as the first's class is drawn again and keeps only the
    patterns its new class carries)."""
    patterns = [attribute for attribute in ATTRIBUTES if attribute.kind == "pattern"]
    able = [obj for scene in scenes for obj in scene.objects if any(obj.object_class in a.carriers for a in patterns)]
    carrying = [obj for obj in able if any(a.name in obj.attributes for a in patterns)]
    return len(carrying) / len(able) if able else 0.0


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR(t), gamma) / SNR(t) for noise prediction (Hang et al., 2023, eq. 11)."""
    alpha_bar = alphas_cumprod[timesteps]
    snr = alpha_bar / (1.0 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def save_snapshot(unet, ema, folder: Path) -> None:
    """Writes the UNet's current weights to `folder/unet/` and, if there is one, its moving average to
    `folder/ema_unet/` (diffusers' layout for each), leaving the weights in training as they were."""
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        unet.save_pretrained(folder / "ema_unet", safe_serialization=True)
        ema.restore(unet.parameters())


def save_training_checkpoint(
    checkpoint_dir, step: int, config: UNetConfig, unet, optimizer, scheduler, ema, rng, generator, losses, seconds
) -> None:
    """Writes `checkpoint_dir/checkpoint-<step>` with all that `resume_training` restores, and keeps the latest two,
    so that one survives a save cut short. `seconds` holds the run's `loop_seconds` and `wall_seconds` so far."""
    training_state = {
        "step": step,
        "config": asdict(config),
        "losses": losses,
        **seconds,
        "lr_scheduler": scheduler.state_dict(),
        "python_random": rng.getstate(),
        "ema_optimization_step": None if ema is None else ema.optimization_step,
    }
    extra = {"generator": {"noise": generator.get_state()}}
    if ema is not None:
        extra["ema"] = {str(i): shadow for i, shadow in enumerate(ema.shadow_params)}
    save_checkpoint(Path(checkpoint_dir) / f"checkpoint-{step}", unet, optimizer, training_state, extra_tensors=extra)
    prune_checkpoints(checkpoint_dir, keep=2)


def resume_training(checkpoint_dir, config: UNetConfig, unet, optimizer, scheduler, ema, rng, generator) -> tuple:
    """Restores the latest readable checkpoint in `checkpoint_dir` written by a run of the same settings (the number
    of CPU threads aside) into the training's objects, and returns the step to go on from, the losses so far and
    the earlier run's seconds (`loop_seconds`, `wall_seconds`). With no such checkpoint: step 0, no losses, no time.

    Checkpoints of other settings are deleted. If the latest cannot be read (a machine that lost power while
    writing it), the one before it is used."""
    nothing = (0, [], {"loop_seconds": 0.0, "wall_seconds": 0.0})
    checkpoints = list_checkpoints(checkpoint_dir)
    if not checkpoints:
        return nothing
    recorded = json.loads((checkpoints[-1] / STATE_FILE).read_text())["config"]
    if not same_settings(recorded, config, ignore=("num_threads",)):
        logger.warning(
            "unet: the checkpoints in %s were written with other settings; training from the start", checkpoint_dir
        )
        for path in checkpoints:
            shutil.rmtree(path)
        return nothing
    for last in reversed(checkpoints):
        try:
            state = load_checkpoint(last, unet, optimizer)
            generator_state = load_extra_tensors(last, "generator")["noise"]
            shadows = None if ema is None else load_extra_tensors(last, "ema")
        except Exception as error:  # a truncated file shows as any of several errors of safetensors, json or torch
            logger.warning("unet: cannot read %s (%s); trying the checkpoint before it", last, error)
            continue
        scheduler.load_state_dict(state["lr_scheduler"])
        version, internal, gauss_next = state["python_random"]
        rng.setstate((version, tuple(internal), gauss_next))
        generator.set_state(generator_state)
        if ema is not None:
            for index, shadow in enumerate(ema.shadow_params):
                shadow.copy_(shadows[str(index)])
            ema.optimization_step = state["ema_optimization_step"]
        logger.info("unet: resuming from %s", last)
        return state["step"], state["losses"], {key: state[key] for key in ("loop_seconds", "wall_seconds")}
    raise SafeTextError(f"none of the UNet checkpoints in {checkpoint_dir} can be read; delete them to start afresh")


def build_unet(config: UNetConfig, latent_channels: int, cross_attention_dim: int) -> "UNet2DConditionModel":
    """A freshly initialised UNet of the config's shape, for 16x16 latents; the caller seeds torch first.

    Args:
        config: the UNet's widths, layers, heads and whether its finest level attends.
        latent_channels: channels of the autoencoder's latents (its input and output).
        cross_attention_dim: width of the text encoder's hidden states it attends to.

    Returns:
        A diffusers `UNet2DConditionModel`.
    """
    from diffusers import UNet2DConditionModel

    finest_down, finest_up = (
        ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if config.attention_at_16x16 else ("DownBlock2D", "UpBlock2D")
    )
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        # by default attention at 8x8 and 4x4 (and the mid block) only: at 16x16 it attends over 256 positions,
        # which halves the speed of a CPU step
        down_block_types=(finest_down, "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", finest_up),
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        cross_attention_dim=cross_attention_dim,
    )


def train_unet(
    config: UNetConfig,
    clip_dir: str | Path,
    vae_dir: str | Path,
    output_dir: str | Path,
    device: str = "cpu",
    snapshot_steps: tuple[int, ...] = (),
    snapshot_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_steps: int = 500,
) -> dict:
    """Trains the UNet and writes the whole Stable Diffusion pipeline folder.

    Args:
        config: sizes and training settings.
        clip_dir: folder with the mini-CLIP's `text_encoder/` and `tokenizer/` (from `train_mini_clip`).
        vae_dir: folder with `vae/` (from `train_autoencoder`), whose config holds the latents' `scaling_factor`.
        output_dir: folder for the pipeline (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
            `scheduler/`; safetensors, no safety checker); created if missing.
        device: where to train (`"cpu"`, `"cuda"`, ...); the scenes, captions and noise are the same on every device.
        snapshot_steps: steps after which the UNet is also saved to `snapshot_dir/step-NNNNN/unet/` (and its
            moving average, with `ema_decay`, to `ema_unet/`), so that points along the schedule can be judged by
            what they draw. Taking them changes nothing in the training.
        snapshot_dir: where the snapshots go; required with `snapshot_steps`.
        checkpoint_dir: where to write a checkpoint every `checkpoint_steps` steps (weights, optimiser, learning
            rate schedule, moving average, random states and losses; safetensors and JSON; the latest two kept). If
            it holds one from a run of the same settings, training resumes from it, and on the same device and
            number of threads ends with the same weights as a run never stopped; checkpoints of other settings are
            deleted and training starts afresh.
        checkpoint_steps: steps between checkpoints.

    Returns:
        A record: config, parameter count, losses and wall time.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if any(not 1 <= step <= config.max_train_steps for step in snapshot_steps):
        raise ValueError(f"snapshot_steps must lie in [1, {config.max_train_steps}], got {snapshot_steps}")
    if snapshot_steps and snapshot_dir is None:
        raise ValueError("snapshot_steps need a snapshot_dir to be written to")
    if checkpoint_steps < 1:
        raise ValueError(f"checkpoint_steps must be at least 1, got {checkpoint_steps}")
    start = time.time()
    torch.set_num_threads(config.num_threads)
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    tokenizer = CLIPTokenizer.from_pretrained(Path(clip_dir) / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(Path(clip_dir) / "text_encoder", dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(Path(vae_dir) / "vae", torch_dtype=torch.float32)
    # the text encoder and the autoencoder are frozen, as in SD: only the UNet learns
    text_encoder.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()

    torch.manual_seed(config.seed)
    unet = build_unet(config, vae.config.latent_channels, text_encoder.config.hidden_size)
    if config.mixed_precision == "bf16" and torch.device(device).type == "cpu":
        # PyTorch's CPU flash attention runs its backward pass about four times slower in bfloat16 than in float32
        # (`benchmarks/miniworld_step_precision.py`), which undoes what the convolutions gain. The classic
        # processor's matrix products follow autocast like the rest of the network, and so does its softmax, which
        # then runs in bfloat16 where the flash kernel accumulates in float32. Training only: the saved folder
        # keeps no processor.
        unet.set_attn_processor(AttnProcessor())
    text_encoder.to(device)
    vae.to(device)
    unet.to(device)
    noise_scheduler = DDPMScheduler(**SD_BETAS)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=1e-2)
    # the average lives beside the weights, in float32, and follows every optimiser step
    ema = None if config.ema_decay is None else EMAModel(unet.parameters(), decay=config.ema_decay, foreach=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.lr_warmup_steps, config.max_train_steps)
    scaling_factor = vae.config.scaling_factor
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)

    pool_start = time.time()
    distribution = SceneDistribution(pattern_rate=config.pattern_rate)
    scenes = [sample_scene(rng, distribution) for _ in range(config.num_scenes)]
    pool_means, pool_stds = encode_pool(vae, scenes, device)
    pool_seconds = time.time() - pool_start
    order = epoch_order(rng, config.num_scenes, config.max_train_steps * config.train_batch_size)

    autocast = training_autocast(device, config.mixed_precision)
    unet.train()
    # the compiled module shares the UNet's parameters: the optimiser, the average, checkpoints and the saved
    # folder all see `unet` itself
    forward = torch.compile(unet) if config.compile else unet
    losses, first_step, earlier = [], 0, {"loop_seconds": 0.0, "wall_seconds": 0.0}
    if checkpoint_dir is not None:
        # after the pool and the order, which a resumed run rebuilds from the seed as the first run did
        first_step, losses, earlier = resume_training(
            checkpoint_dir, config, unet, optimizer, scheduler, ema, rng, generator
        )
    # the rate in the progress lines counts the steps of an earlier run too
    loop_start = time.time() - earlier["loop_seconds"]
    progress = tqdm(range(first_step, config.max_train_steps), desc="unet", disable=None)
    first_step_seconds = None
    for step in progress:
        step_start = time.time()
        indices = order[step * config.train_batch_size : (step + 1) * config.train_batch_size]
        # every surface-form group, so the base model draws held-out and indirect forms of the restricted concepts
        captions = [caption(scenes[i], rng) for i in indices]
        captions = ["" if rng.random() < config.caption_dropout else text for text in captions]
        with torch.no_grad():
            # a fresh draw from the stored posterior; noise from a CPU generator, the same on any device
            means, stds = pool_means[indices], pool_stds[indices]
            latents = (means + stds * torch.randn(means.shape, generator=generator)).to(device) * scaling_factor
            # padded to 77 with <|endoftext|>, exactly as the pipeline's encode_prompt does at inference
            input_ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            encoder_hidden_states = text_encoder(input_ids.to(device))[0]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        timesteps = timesteps.to(device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            prediction = forward(noisy_latents, timesteps, encoder_hidden_states).sample
        # the loss in float32, whatever the network ran in
        prediction = prediction.float()
        if config.snr_gamma is None:
            loss = F.mse_loss(prediction, noise)
        else:
            per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weights(alphas_cumprod, timesteps, config.snr_gamma)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.step(unet.parameters())
        losses.append(loss.item())
        if first_step_seconds is None:
            # with `compile`, the compilation; otherwise the warm-up of the first step
            first_step_seconds = time.time() - step_start
        progress.set_postfix(loss=f"{loss.item():.4f}")
        log_progress("unet", step, config.max_train_steps, losses, loop_start)
        if step + 1 in snapshot_steps:
            save_snapshot(unet, ema, Path(snapshot_dir) / f"step-{step + 1:05d}")
        if checkpoint_dir is not None and (step + 1) % checkpoint_steps == 0 and step + 1 < config.max_train_steps:
            seconds = {
                "loop_seconds": time.time() - loop_start,
                "wall_seconds": earlier["wall_seconds"] + time.time() - start,
            }
            save_training_checkpoint(
                checkpoint_dir, step + 1, config, unet, optimizer, scheduler, ema, rng, generator, losses, seconds
            )

    loop_seconds = time.time() - loop_start  # with an earlier run's steps, if this one resumed
    unet.eval()
    if ema is not None:
        # the pipeline gets the average, as SD's checkpoints did
        ema.copy_to(unet.parameters())
    pipeline = StableDiffusionPipeline(
        vae=vae.to("cpu"),
        text_encoder=text_encoder.to("cpu"),
        tokenizer=tokenizer,
        unet=unet.to("cpu"),
        # SD v1.4's sampler and settings (its scheduler_config.json), on the betas the UNet was trained with
        scheduler=PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    # SD v1.4's tokenizer/ holds vocab.json and merges.txt, the files the mini-CLIP stage wrote; transformers saves
    # the same tokenizer as one tokenizer.json of more than twice their size
    shutil.rmtree(Path(output_dir) / "tokenizer")
    shutil.copytree(Path(clip_dir) / "tokenizer", Path(output_dir) / "tokenizer")
    tenth = max(len(losses) // 10, 1)
    return {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "loss_first_10pct": float(np.mean(losses[:tenth])),
        "loss_last_10pct": float(np.mean(losses[-tenth:])),
        "final_loss": losses[-1],
        "losses": losses,
        # the attention processor the UNet trained with (the saved folder names none)
        "attention_processor": type(next(iter(unet.attn_processors.values()))).__name__,
        "saved_weights": "moving average" if ema is not None else "last",
        "snapshot_steps": list(snapshot_steps),
        "seconds_per_step": loop_seconds / config.max_train_steps,
        # the first step this run took, included in seconds_per_step
        "first_step_seconds": first_step_seconds,
        "pool_seconds": round(pool_seconds, 1),
        "uses_per_scene": config.max_train_steps * config.train_batch_size / config.num_scenes,
        "patterned_share": round(patterned_share(scenes), 4),
        "resumed_from_step": first_step or None,
        "resumed_wall_time_s": round(earlier["wall_seconds"], 1),
        # an earlier, interrupted run's time included (its pool too)
        "wall_time_s": round(earlier["wall_seconds"] + time.time() - start, 1),
    }
