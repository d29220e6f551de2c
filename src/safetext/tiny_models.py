"""Tiny, randomly initialised text-to-image pipelines with the real architecture and tokenizer.

No model weights can be downloaded on the machines this project is developed on, so tests and demos run on
pipelines of the right family and shape, with a few megabytes of weights each (most of it the text encoders'
49,408-token CLIP and 32,128-token T5 embeddings), written as a folder that `DiffusionPipeline.from_pretrained` opens
like a real checkpoint. The CLIP tokenizers are the real ones; the T5 tokenizer of the SD3 and FLUX pipelines is a
stand-in in T5's layout (no T5 vocabulary can be had offline, see `_build_t5_tokenizer`).
"""

import json
import math
import string
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from safetext.clip_tokenizer import BOS_TOKEN, CLIP_VOCAB_SIZE, EOS_TOKEN, build_clip_tokenizer
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


# T5 v1.1's vocabulary layout (the T5-XXL encoder of SD3 and FLUX): 32,000 SentencePiece pieces with <pad>, </s> and
# <unk> at ids 0-2, then 100 sentinel tokens <extra_id_99> ... <extra_id_0> at ids 32000-32099; the encoder's
# embedding table is padded to 32,128 rows. Its tokenizers are saved with model_max_length 512.
T5_PIECES = 32000
T5_EXTRA_IDS = 100
T5_VOCAB_SIZE = 32128
T5_MODEL_MAX_LENGTH = 512


def _clip_text_config(
    tokenizer: CLIPTokenizer, hidden_size: int, num_hidden_layers: int, hidden_act: str, projection_dim: int
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_l_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    # OpenAI's CLIP ViT-L/14 text tower (SDXL's text_encoder, SD3's text_encoder, FLUX's text_encoder): quick_gelu.
    return _clip_text_config(
        tokenizer, hidden_size=32, num_hidden_layers=5, hidden_act="quick_gelu", projection_dim=32
    )


def _clip_g_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    # OpenCLIP ViT-bigG/14 (text_encoder_2 of SDXL and SD3): exact gelu and a different width than CLIP-L (1280
    # against 768 in the real models), so that a concatenation in the wrong order changes shapes, not just values.
    return _clip_text_config(tokenizer, hidden_size=48, num_hidden_layers=4, hidden_act="gelu", projection_dim=48)


def _build_open_clip_tokenizer(save_directory: Path) -> CLIPTokenizer:
    # OpenCLIP pads with id 0 ("!") rather than <|endoftext|>, and the OpenCLIP-trained encoders keep its tokenizer:
    # SD 2.x's tokenizer and the tokenizer_2 of SDXL and SD3 all say `"pad_token": "!"`. Padded positions see
    # different tokens, so their hidden states (which the denoiser attends to) differ from an <|endoftext|>-padded
    # prompt's.
    # Both files that name the pad token are rewritten: the pipeline later saves its own tokenizer_config.json
    # beside them, and a stale special_tokens_map.json would bring <|endoftext|> padding back on loading.
    build_clip_tokenizer(save_directory, model_max_length=77)
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        path = save_directory / filename
        path.write_text(json.dumps({**json.loads(path.read_text()), "pad_token": "!"}, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(save_directory, model_max_length=77)


def _build_t5_tokenizer(clip_tokenizer: CLIPTokenizer) -> T5Tokenizer:
    # This is NOT T5's vocabulary. No installed package ships T5's spiece.model (nor is sentencepiece installed), so
    # the tiny pipelines get a Unigram tokenizer in T5's layout whose pieces come from the CLIP vocabulary: each
    # ASCII CLIP token gives a word-initial piece "▁tok" and a word-internal piece "tok", scored by the token's merge
    # rank (earlier BPE merges are more frequent words), which splits English prompts into plausible subwords. Like
    # T5 it is case-sensitive and ends every prompt with </s>; unlike T5 it knows upper case only as single letters,
    # has no Unicode normalisation, and maps every non-ASCII character to <unk>.
    allowed = set(string.ascii_letters + string.digits + string.punctuation)
    special = set(clip_tokenizer.all_special_tokens)
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for token, index in sorted(clip_tokenizer.get_vocab().items(), key=lambda item: item[1]):
        body = token.removesuffix("</w>")
        if token in special or not body or not set(body) <= allowed:
            continue
        for piece in ("▁" + body, body):
            if len(pieces) < T5_PIECES:
                pieces.setdefault(piece, -math.log(index + 2))
    if len(pieces) != T5_PIECES:
        raise SafeTextError(f"the CLIP vocabulary gives {len(pieces)} T5 pieces, expected {T5_PIECES}")
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return T5Tokenizer(
        vocab=[*pieces.items(), *sentinels], extra_ids=T5_EXTRA_IDS, model_max_length=T5_MODEL_MAX_LENGTH
    )


def _build_t5_encoder(d_model: int) -> T5EncoderModel:
    # T5 v1.1's shape (gated GELU feed-forward, 32 relative-position buckets), at width d_model with two layers.
    return T5EncoderModel(
        T5Config(
            vocab_size=T5_VOCAB_SIZE,
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _build_sd2_pipeline(output_dir: Path, seed: int) -> DiffusionPipeline:
    tokenizer = _build_open_clip_tokenizer(output_dir / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # SD 2.x gives the head width per block ([5, 10, 20, 20]) and projects with linear layers, not 1x1 convs.
        attention_head_dim=(2, 4),
        use_linear_projection=True,
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
    # OpenCLIP ViT-H/14 as SD 2.x loads it: a plain CLIPTextModel with exact gelu; its config names a projection
    # width that the pipeline never uses.
    text_encoder = CLIPTextModel(
        _clip_text_config(tokenizer, hidden_size=32, num_hidden_layers=5, hidden_act="gelu", projection_dim=32)
    )
    # SD 2.1's scheduler settings: DDIM predicting v (the 768 px v-model).
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
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


def _build_sdxl_pipeline(output_dir: Path, seed: int) -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer(output_dir / "tokenizer", model_max_length=77)
    tokenizer_2 = _build_open_clip_tokenizer(output_dir / "tokenizer_2")
    text_encoder_config = _clip_l_config(tokenizer)
    text_encoder_2_config = _clip_g_config(tokenizer_2)
    # SDXL adds six size and crop numbers (original size, crop corner, target size), each embedded with
    # addition_time_embed_dim features, to the pooled text embedding of text_encoder_2.
    addition_time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        # The two penultimate hidden states side by side (768 + 1280 = 2048 in the real model).
        cross_attention_dim=text_encoder_config.hidden_size + text_encoder_2_config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_encoder_2_config.projection_dim,
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
        scaling_factor=0.13025,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config)
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_2_config)
    # SDXL 1.0 base's scheduler settings.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def _build_sd3_pipeline(output_dir: Path, seed: int) -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer(output_dir / "tokenizer", model_max_length=77)
    tokenizer_2 = _build_open_clip_tokenizer(output_dir / "tokenizer_2")
    tokenizer_3 = _build_t5_tokenizer(tokenizer)
    text_encoder_config = _clip_l_config(tokenizer)
    text_encoder_2_config = _clip_g_config(tokenizer_2)
    # Wider than the two CLIP widths together, as T5-XXL's 4096 is wider than 768 + 1280: the pipeline zero-pads the
    # CLIP features up to it.
    t5_width = 128
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=32,
        pooled_projection_dim=text_encoder_config.projection_dim + text_encoder_2_config.projection_dim,
        pos_embed_max_size=32,
    )
    torch.manual_seed(seed)
    # SD3's autoencoder: 16 latent channels, no quant convolutions, latents shifted before scaling.
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=16,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(text_encoder_config)
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_2_config)
    torch.manual_seed(seed)
    text_encoder_3 = _build_t5_encoder(t5_width)
    # SD3 medium's scheduler settings.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux_pipeline(output_dir: Path, seed: int) -> DiffusionPipeline:
    tokenizer = build_clip_tokenizer(output_dir / "tokenizer", model_max_length=77)
    tokenizer_2 = _build_t5_tokenizer(tokenizer)
    text_encoder_config = _clip_l_config(tokenizer)
    t5_width = 32
    latent_channels = 16
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        # FLUX packs 2 x 2 latent pixels into one token.
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        # CLIP-L's pooler_output, not its projection: FLUX reads a plain CLIPTextModel.
        pooled_projection_dim=text_encoder_config.hidden_size,
        # FLUX.1-dev's distilled guidance is an input of the transformer.
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=latent_channels,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config)
    torch.manual_seed(seed)
    text_encoder_2 = _build_t5_encoder(t5_width)
    # FLUX.1-dev's scheduler settings: the shift grows with the number of image tokens.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


# family name -> builder of a pipeline of that family; the builder may write its tokenizer files into output_dir.
_PIPELINE_BUILDERS: dict[str, Callable[[Path, int], DiffusionPipeline]] = {
    "sd": _build_sd_pipeline,
    "sd2": _build_sd2_pipeline,
    "sdxl": _build_sdxl_pipeline,
    "sd3": _build_sd3_pipeline,
    "flux": _build_flux_pipeline,
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_PIPELINE_BUILDERS)


def create_tiny_pipeline(output_dir: str | Path, family: str = "sd", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny, randomly initialised pipeline folder of a Stable Diffusion or FLUX family.

    Every family keeps its real pipeline class, component names and layout, the real CLIP tokenizer (see
    `build_clip_tokenizer`) and its real scheduler settings, at width 32 and with 1 to 5 layers per model:

    - `"sd"`, Stable Diffusion v1.x (`StableDiffusionPipeline`): a `UNet2DConditionModel` with
      `block_out_channels=(32, 64)` and cross-attention width 32, an `AutoencoderKL` with `block_out_channels=[32,
      64]`, a 5-layer `CLIPTextModel` of width 32 with the full 49,408-token vocabulary and 77 positions, SD v1.4's
      PNDM scheduler settings, and no safety checker.
    - `"sd2"`, Stable Diffusion v2.x (`StableDiffusionPipeline`): as `"sd"`, but the text encoder uses exact gelu as
      OpenCLIP does, the tokenizer pads with `"!"` (id 0), the UNet gives its head width per block and projects
      with linear layers, and SD 2.1's DDIM scheduler predicts v.
    - `"sdxl"` (`StableDiffusionXLPipeline`): a `CLIPTextModel` (CLIP-L, width 32) and a
      `CLIPTextModelWithProjection` (OpenCLIP bigG, width 48, its `tokenizer_2` padding with `"!"`), a UNet with
      cross-attention width 32 + 48 and SDXL's `text_time` added conditioning, SDXL 1.0's Euler scheduler.
    - `"sd3"` (`StableDiffusion3Pipeline`): two `CLIPTextModelWithProjection` (CLIP-L, width 32; bigG, width 48)
      and a 2-layer `T5EncoderModel` of width 128, a 2-layer `SD3Transformer2DModel`, an `AutoencoderKL` with 16
      latent channels, and the flow-matching Euler scheduler with shift 3.
    - `"flux"` (`FluxPipeline`): a `CLIPTextModel` (CLIP-L, width 32) and a 2-layer `T5EncoderModel` of width 32,
      a `FluxTransformer2DModel` with guidance embedding (FLUX.1-dev), an `AutoencoderKL` with 16 latent channels,
      and FLUX.1-dev's flow-matching scheduler with dynamic shifting.

    `"sd"` and `"sd2"` are two shapes of one pipeline family (`safetext.families.FAMILIES["sd"]`): same pipeline
    class, same prompt encoding. The T5 tokenizers have T5's layout (32,100 tokens, `<pad>` = 0, `</s>` = 1, `<unk>` = 2, sentinels from
    32000) but not T5's vocabulary: their pieces are derived from the CLIP vocabulary. All weights are written as
    safetensors. The default image size is 64 x 64, except for FLUX, whose pipeline defaults to 256 x 256 (pass
    `height=64, width=64`). The same `seed` always gives the same weights, and the global torch random state is
    left as it was.

    Args:
        output_dir (`str` or `pathlib.Path`):
            Folder to write the pipeline into (`model_index.json` and one folder per component: `unet/` or
            `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, ..., `scheduler/`); created if missing.
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
