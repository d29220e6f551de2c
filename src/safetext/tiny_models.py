"""Tiny, randomly initialised text-to-image pipelines with the real architecture and tokenizer.

No model weights can be downloaded on the machines this project is developed on, so tests and demos run on
pipelines of the right family and shape, with a few megabytes of weights each (most of it the text encoder's
49,408-token embedding), written as a folder that `DiffusionPipeline.from_pretrained` opens like a real checkpoint.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from safetext.clip_tokenizer import BOS_TOKEN, CLIP_VOCAB_SIZE, build_clip_tokenizer
from safetext.errors import SafeTextError


def _build_sd_pipeline(output_dir: Path, seed: int) -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer(output_dir / "tokenizer", model_max_length=77)
    # Each model is created under its own reseeded generator so that its weights depend only on `seed`, not on
    # which other models were built before it (adding a component later leaves the others' weights unchanged).
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        # 32 latent pixels x the VAE's downscaling factor of 2 makes the default image 64 x 64.
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
            # The pooled output is read at the first eos_token_id; with the real id (not the legacy 2 of old
            # configs) that is the <|endoftext|> position, as in OpenAI's CLIP.
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD v1.4's scheduler settings (its scheduler/scheduler_config.json).
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# family name -> builder of a pipeline of that family; the builder may write its tokenizer files into output_dir.
_PIPELINE_BUILDERS: dict[str, Callable[[Path, int], DiffusionPipeline]] = {
    "sd": _build_sd_pipeline,
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_PIPELINE_BUILDERS)


def create_tiny_pipeline(output_dir: str | Path, family: str = "sd", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny, randomly initialised pipeline folder of a Stable Diffusion family.

    For `family="sd"` the folder is shaped like Stable Diffusion v1.x (`StableDiffusionPipeline`): a
    `UNet2DConditionModel` with `block_out_channels=(32, 64)` and cross-attention width 32, an `AutoencoderKL`
    with `block_out_channels=[32, 64]`, a 5-layer `CLIPTextModel` of width 32 with the full 49,408-token
    vocabulary and 77 positions, the real CLIP tokenizer (see `build_clip_tokenizer`), SD v1.4's PNDM
    scheduler settings, and no safety checker. All weights are written as safetensors. The default image size
    is 64 x 64. The same `seed` always gives the same weights, and the global torch random state is left as
    it was.

    Args:
        output_dir (`str` or `pathlib.Path`):
            Folder to write the pipeline into (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
            `tokenizer/`, `scheduler/`); created if missing.
        family (`str`, *optional*, defaults to `"sd"`):
            Model family to imitate, one of `SUPPORTED_FAMILIES`.
        seed (`int`, *optional*, defaults to 0):
            Seed of the random initialisation.
        overwrite (`bool`, *optional*, defaults to `False`):
            Write into `output_dir` even if it is not empty, replacing files of the same name (other files are
            left in place).

    Returns:
        `pathlib.Path`: `output_dir`, ready for `DiffusionPipeline.from_pretrained(output_dir)`.

    Raises:
        `SafeTextError`: if `family` is not supported, if `output_dir` is a file, or if `output_dir` is not
            empty and `overwrite` is not set.
    """
    if family not in _PIPELINE_BUILDERS:
        raise SafeTextError(f"unknown model family {family!r}: choose one of {', '.join(SUPPORTED_FAMILIES)}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SafeTextError(f"output_dir {output_dir} is a file, not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise SafeTextError(f"output_dir {output_dir} is not empty: choose an empty folder or pass overwrite=True")
    output_dir.mkdir(parents=True, exist_ok=True)

    # fork_rng restores the caller's global random state afterwards: building a fixture must not change the
    # random numbers a test or training run draws next.
    with torch.random.fork_rng(devices=[]):
        pipeline = _PIPELINE_BUILDERS[family](output_dir, seed)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return output_dir
