"""The mini-CLIP: MiniWorld's own CLIP, trained contrastively so that its text encoder knows the world's semantics.

Stable Diffusion's text encoder was trained as half of CLIP before any diffusion model saw it; MiniWorld's is too.
A `CLIPTextModel` (the real CLIP tokenizer, 49,408 tokens, 77 positions) and a small convolutional vision tower
learn to match fresh renders with their captions under the symmetric InfoNCE loss of CLIP (Radford et al., 2021,
eq. in Figure 3) with a learned temperature. Captions use every surface form of the restricted concepts, so
"striped", "pinstriped" and "patterned like a zebra" land near each other because they describe the same pictures.

In-batch negatives alone leave attributes of the same kind apart from each other unlearnt: a caption is told apart
from the other 255 of its batch by its object, colour and background long before its pattern matters. The shipped
text encoder, trained so, reads "a striped ball" and "a dotted ball" almost alike (cosine 0.93 of the hidden states
the UNet attends to, against 0.37 for "striped" and "red": `quality.attribute_separation`). With
`hard_negatives=True` each picture whose scene carries an attribute also meets a hard negative caption: the same
scene with that attribute swapped for another of its kind (`scenes.swap_attribute`), as NegCLIP adds
attribute-swapped captions (Yuksekgonul et al., 2023, "When and why vision-language models behave like
bags-of-words, and what to do about it"). It is off in the recipe: a full build with it read the pattern words
apart (0.53 for striped and dotted) but its UNet drew stripes no more often (docs/miniworld.md).

Only the text side is kept: `text_encoder/` (safetensors) and `tokenizer/`, the layout of an SD pipeline's
folders, which the UNet stage loads frozen.
"""

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import nn
from tqdm.auto import tqdm

from safetext.miniworld.captions import caption
from safetext.miniworld.precision import check_mixed_precision, training_autocast
from safetext.miniworld.progress import log_progress
from safetext.miniworld.renderer import render_many, to_pixel_values
from safetext.miniworld.scenes import epoch_order, sample_scene, swap_attribute

logger = logging.getLogger(__name__)


@dataclass
class MiniClipConfig:
    """How the mini-CLIP is built and trained.

    Args:
        hidden_size: width of the text transformer, also the UNet's cross-attention width. The 49,408-token
            embedding alone holds `49408 * hidden_size` parameters, which sets most of the shipped size.
        num_hidden_layers: transformer layers of the text encoder.
        num_attention_heads: attention heads per layer; must divide `hidden_size`.
        intermediate_size: width of the text encoder's MLPs.
        projection_dim: width of the joint embedding space both towers project into.
        vision_channels: widths of the vision tower's conv blocks (each halves the resolution after the first).
        max_train_steps: optimisation steps; each draws a fresh batch of scenes.
        train_batch_size: (picture, caption) pairs per step, also the number of negatives per pair plus one.
        num_scenes: scenes in the pool of pictures, rendered once in worker processes (rendering costs half a CPU
            step); each is used about `max_train_steps * train_batch_size / num_scenes` times, with a fresh caption
            every time.
        learning_rate: peak AdamW learning rate (linear warm-up, then cosine decay to zero).
        lr_warmup_steps: steps of linear warm-up.
        weight_decay: AdamW weight decay.
        hard_negatives: give each picture whose scene carries an attribute a hard negative caption, the same scene
            with one attribute swapped for another of its kind, among the captions it is contrasted with. Off in
            the recipe (see the module's docstring); about 80 negatives per batch of 256, 20% more time per step.
        mixed_precision: "bf16" runs both towers under bfloat16 autocast (weights, optimiser, temperature and the
            loss stay float32); on a CPU the text tower's attention then runs in transformers' eager implementation,
            since PyTorch's CPU scaled-dot-product attention is slow in bfloat16 (1.79 times the float32 step on two
            cores: `benchmarks/miniworld_build_time.py --clip-mixed-precision bf16 --unet-mixed-precision bf16`).
            "no" trains in float32.
        seed: seed of the scenes, captions and initialisation.
        num_threads: torch CPU threads (the recipe's machine has two cores; on a busy machine one can be faster).
    """

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    projection_dim: int = 128
    vision_channels: tuple[int, ...] = (32, 64, 128, 128)
    max_train_steps: int = 2000
    train_batch_size: int = 256
    num_scenes: int = 51_200
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 100
    weight_decay: float = 0.1
    hard_negatives: bool = False
    mixed_precision: str = "no"
    seed: int = 0
    num_threads: int = 2

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision)
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "projection_dim",
            "max_train_steps",
            "num_scenes",
            "num_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads must divide hidden_size, got {self.num_attention_heads} and {self.hidden_size}"
            )
        if self.train_batch_size < 2:
            raise ValueError(f"train_batch_size must be at least 2 (a contrastive batch), got {self.train_batch_size}")
        if self.num_scenes < self.train_batch_size:
            raise ValueError(
                f"num_scenes must be at least train_batch_size={self.train_batch_size}, so that no batch holds one "
                f"picture twice; got {self.num_scenes}"
            )
        if not self.vision_channels or min(self.vision_channels) < 1:
            raise ValueError(f"vision_channels must be positive widths, got {self.vision_channels}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.lr_warmup_steps < self.max_train_steps:
            raise ValueError(
                f"lr_warmup_steps must be in [0, max_train_steps={self.max_train_steps}), got {self.lr_warmup_steps}"
            )


class VisionTower(nn.Module):
    """A small CNN from pictures to the joint embedding space: a space-to-depth stem, 3x3 conv blocks (conv, batch
    norm, ReLU; a 2x down-sampling after each but the first), global average pooling and a linear projection.

    Args:
        projection_dim: width of the output embedding.
        channels: widths of the conv blocks.
    """

    def __init__(self, projection_dim: int, channels: tuple[int, ...]):
        super().__init__()
        # space-to-depth keeps fine stripes and dots visible to the first conv at half the cost (as the detector)
        blocks, width = [nn.PixelUnshuffle(2)], 12
        for i, out in enumerate(channels):
            stride = 1 if i == 0 else 2
            # batch norm, not group norm: normalising each picture on its own wipes out the global colour and
            # brightness that tell "red" from "blue" and "at night" from "on the beach", and training collapsed
            blocks += [nn.Conv2d(width, out, 3, stride=stride, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        self.features = nn.Sequential(*blocks)
        self.projection = nn.Linear(width, projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Maps pictures in [-1, 1], shape (N, 3, 64, 64), to unnormalised embeddings (N, projection_dim)."""
        return self.projection(self.features(pixel_values).mean(dim=(2, 3)))


def build_text_encoder(config: MiniClipConfig, tokenizer):
    """A freshly initialised `CLIPTextModel` of the config's size that fits `tokenizer` (SD v1.x's settings:
    quick GELU, 77 positions, the tokenizer's BOS/EOS/pad ids so that the pooled output is read at the EOS)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=config.projection_dim,
        )
    )


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    negative_text_embeds: torch.Tensor | None = None,
) -> dict:
    """CLIP's symmetric InfoNCE loss: cross-entropy of the scaled cosine similarities in both directions, the i-th
    picture and i-th caption being the positive pair (Radford et al., 2021, Figure 3).

    Hard negative captions, as in NegCLIP (Yuksekgonul et al., 2023), join the captions each picture is contrasted
    with (picture-to-text direction); having no picture of their own, they leave the text-to-picture direction as
    it is.

    Args:
        image_embeds: (N, D) picture embeddings, not necessarily normalised.
        text_embeds: (N, D) caption embeddings, not necessarily normalised.
        logit_scale: log of the inverse temperature, a scalar (CLIP's `t`, used as `exp(t)`).
        negative_text_embeds: (M, D) embeddings of hard negative captions, or None.

    Returns:
        `{"image_to_text": ..., "text_to_image": ..., "loss": mean of the two}`.
    """
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp() * image_embeds @ text_embeds.T
    labels = torch.arange(len(logits), device=logits.device)
    if negative_text_embeds is None or len(negative_text_embeds) == 0:
        image_to_text = F.cross_entropy(logits, labels)
    else:
        negatives = logit_scale.exp() * image_embeds @ F.normalize(negative_text_embeds, dim=-1).T
        image_to_text = F.cross_entropy(torch.cat([logits, negatives], dim=1), labels)
    text_to_image = F.cross_entropy(logits.T, labels)
    return {
        "image_to_text": image_to_text,
        "text_to_image": text_to_image,
        "loss": (image_to_text + text_to_image) / 2,
    }


def train_mini_clip(config: MiniClipConfig, output_dir: str | Path, device: str = "cpu") -> dict:
    """Trains the mini-CLIP on fresh (render, caption) pairs and writes its text side.

    Args:
        config: sizes and training settings.
        output_dir: folder that receives `text_encoder/` (a `CLIPTextModel`, safetensors, float32) and
            `tokenizer/` (the real CLIP tokenizer); created if missing.
        device: where to train (`"cpu"`, `"cuda"`, ...); the scenes and captions are the same on every device.

    Returns:
        A record: config, parameter counts, the loss over training (first and last 10% means, final value),
        the learned temperature, and wall time.
    """
    from safetext.clip_tokenizer import build_clip_tokenizer

    start = time.time()
    output_dir = Path(output_dir)
    torch.set_num_threads(config.num_threads)
    rng = random.Random(config.seed)
    tokenizer = build_clip_tokenizer(output_dir / "tokenizer", model_max_length=77)

    # each model is initialised under its own reseeding, so one tower's size does not change the other's weights
    torch.manual_seed(config.seed)
    text_encoder = build_text_encoder(config, tokenizer)
    torch.manual_seed(config.seed + 1)
    text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
    vision_tower = VisionTower(config.projection_dim, config.vision_channels)
    # CLIP's initial temperature 0.07
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    if config.mixed_precision == "bf16" and torch.device(device).type == "cpu":
        # training only: the saved config names no attention implementation
        text_encoder.set_attn_implementation("eager")
    modules = nn.ModuleList([text_encoder, text_projection, vision_tower]).to(device)
    decay = [p for n, p in modules.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in modules.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            # CLIP excludes gains, biases, embeddings and the temperature from weight decay
            {"params": no_decay + [logit_scale], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.lr_warmup_steps, config.max_train_steps)

    pool_start = time.time()
    scenes = [sample_scene(rng) for _ in range(config.num_scenes)]
    pool = render_many(scenes)
    pool_seconds = time.time() - pool_start
    order = epoch_order(rng, config.num_scenes, config.max_train_steps * config.train_batch_size)

    autocast = training_autocast(device, config.mixed_precision)
    modules.train()
    losses, negatives_per_step, hard_negative_wins = [], [], []
    loop_start = time.time()
    progress = tqdm(range(config.max_train_steps), desc="mini-CLIP", disable=None)
    for step in progress:
        indices = order[step * config.train_batch_size : (step + 1) * config.train_batch_size]
        pixel_values = to_pixel_values(pool[indices])
        # every surface-form group: the base model must know held-out and indirect forms for alignment to be tested
        captions = [caption(scenes[i], rng) for i in indices]
        num_captions = len(captions)
        if config.hard_negatives:
            swapped = [swap_attribute(scenes[i], rng) for i in indices]
            captions += [caption(scene, rng) for scene in swapped if scene is not None]
        # padding to the longest caption, not to 77, is exact here: the causal mask hides later positions from the
        # EOS token whose state is pooled, and it saves most of the text tower's compute
        input_ids = tokenizer(captions, padding="longest", truncation=True, return_tensors="pt").input_ids
        with autocast:
            text_embeds = text_projection(text_encoder(input_ids=input_ids.to(device)).pooler_output)
            image_embeds = vision_tower(pixel_values.to(device))
        # the loss in float32, whatever the towers ran in
        text_embeds, image_embeds = text_embeds.float(), image_embeds.float()
        terms = contrastive_loss(
            image_embeds,
            text_embeds[:num_captions],
            logit_scale,
            negative_text_embeds=text_embeds[num_captions:],
        )
        if config.hard_negatives:
            with torch.no_grad():
                # the share of pictures that score their own caption above their hard negative: chance is one half
                owners = [j for j, scene in enumerate(swapped) if scene is not None]
                images = F.normalize(image_embeds.detach(), dim=-1)[owners]
                texts = F.normalize(text_embeds.detach(), dim=-1)
                own = (images * texts[owners]).sum(-1)
                negative = (images * texts[num_captions:]).sum(-1)
                hard_negative_wins.append((own > negative).float().mean().item() if owners else float("nan"))
        negatives_per_step.append(len(captions) - num_captions)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            # CLIP clips the inverse temperature at 100 to keep training stable
            logit_scale.clamp_(0, math.log(100))
        losses.append(terms["loss"].item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{logit_scale.exp().item():.1f}")
        log_progress("mini-CLIP", step, config.max_train_steps, losses, loop_start)

    loop_seconds = time.time() - loop_start
    text_encoder.eval()
    text_encoder.to("cpu").save_pretrained(output_dir / "text_encoder", safe_serialization=True)
    tenth = max(len(losses) // 10, 1)
    return {
        "config": asdict(config),
        "parameters": {
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
            "vision_tower": sum(p.numel() for p in vision_tower.parameters()),
        },
        "loss_first_10pct": float(np.mean(losses[:tenth])),
        "loss_last_10pct": float(np.mean(losses[-tenth:])),
        "final_loss": losses[-1],
        "losses": losses,
        "logit_scale": logit_scale.exp().item(),
        # the attention implementation the text tower trained with (the saved folder names none)
        "attention": text_encoder.config._attn_implementation,
        "hard_negatives_per_step": float(np.mean(negatives_per_step)),
        # over the last 10% of steps; None without hard negatives
        "hard_negative_accuracy": float(np.nanmean(hard_negative_wins[-tenth:])) if hard_negative_wins else None,
        "seconds_per_step": loop_seconds / config.max_train_steps,
        "pool_seconds": round(pool_seconds, 1),
        "uses_per_scene": config.max_train_steps * config.train_batch_size / config.num_scenes,
        "wall_time_s": round(time.time() - start, 1),
    }
