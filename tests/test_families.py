"""`safetext.families` against the pipelines themselves: tiny pipelines of every family, loaded by diffusers."""

import copy
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModel

from safetext.errors import SafeTextError
from safetext.families import FAMILIES, Conditioning, EncoderSpec, PipelineFamily, detect_family, encode
from safetext.tiny_models import create_tiny_pipeline

# tiny-model shape -> the pipeline family it belongs to (SD 2.x is a second shape of the sd family)
SHAPES = {"sd": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}

LONG_PROMPT = " ".join(["a very detailed photograph of a red cat sitting on a blue sofa"] * 8)
PROMPTS = ["a photo of a cat", "a painting of a red house at night", LONG_PROMPT]

# family -> (sequence shape, pooled shape) for PROMPTS: CLIP windows of 77 tokens, SD3's 77 + 256 tokens at T5's
# width 128 (CLIP-L 32 + bigG 48 = 80 zero-padded), FLUX's 512 T5 tokens.
EXPECTED_SHAPES = {
    "sd": ((3, 77, 32), None),
    "sdxl": ((3, 77, 32 + 48), (3, 48)),
    "sd3": ((3, 77 + 256, 128), (3, 32 + 48)),
    "flux": ((3, 512, 32), (3, 32)),
}


@dataclass
class TinyPipeline:
    shape: str
    path: Path
    pipeline: DiffusionPipeline

    @property
    def family(self) -> PipelineFamily:
        return FAMILIES[SHAPES[self.shape]]

    def encode(self, prompts, **kwargs) -> Conditioning:
        family = self.family
        text_encoders = {name: getattr(self.pipeline, name) for name in family.text_encoder_names}
        tokenizers = {name: getattr(self.pipeline, name) for name in family.tokenizer_names}
        return encode(family, text_encoders, tokenizers, prompts, **kwargs)

    def encode_prompt(self, prompts, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The pipeline's own encoding of positive prompts; each pipeline orders its outputs its own way.
        family = self.family.name
        if family == "sd":
            sequence, _ = self.pipeline.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False, **kwargs)
            return sequence, None
        if family == "sdxl":
            sequence, _, pooled, _ = self.pipeline.encode_prompt(
                prompts, device="cpu", do_classifier_free_guidance=False, **kwargs
            )
            return sequence, pooled
        if family == "sd3":
            sequence, _, pooled, _ = self.pipeline.encode_prompt(
                prompts, None, None, device="cpu", do_classifier_free_guidance=False, **kwargs
            )
            return sequence, pooled
        sequence, pooled, _ = self.pipeline.encode_prompt(prompts, device="cpu", **kwargs)
        return sequence, pooled


@pytest.fixture(scope="module", params=list(SHAPES))
def tiny(request, tmp_path_factory) -> TinyPipeline:
    path = create_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{request.param}"), family=request.param, seed=0)
    pipeline = DiffusionPipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    return TinyPipeline(request.param, path, pipeline)


def assert_same_conditioning(ours: Conditioning, sequence: torch.Tensor, pooled: torch.Tensor | None):
    torch.testing.assert_close(ours.sequence, sequence, rtol=1e-6, atol=1e-7)
    if pooled is None:
        assert ours.pooled is None
    else:
        torch.testing.assert_close(ours.pooled, pooled, rtol=1e-6, atol=1e-7)


def test_encode_matches_the_pipelines_encode_prompt(tiny):
    # The long prompt is cut by every CLIP window, so truncation is part of the comparison.
    assert len(tiny.pipeline.tokenizer(LONG_PROMPT).input_ids) > 77
    with torch.no_grad():
        ours = tiny.encode(PROMPTS)
        sequence, pooled = tiny.encode_prompt(PROMPTS)
    assert_same_conditioning(ours, sequence, pooled)
    sequence_shape, pooled_shape = EXPECTED_SHAPES[tiny.family.name]
    assert tuple(ours.sequence.shape) == sequence_shape
    assert (None if ours.pooled is None else tuple(ours.pooled.shape)) == pooled_shape
    assert ours.sequence.dtype == torch.float32


# FluxPipeline takes no clip_skip; StableDiffusionPipeline's fails under transformers 5 (see the next test).
@pytest.mark.parametrize("tiny", ["sdxl", "sd3"], indirect=True)
def test_clip_skip_matches_the_pipeline(tiny):
    with torch.no_grad():
        ours = tiny.encode(PROMPTS, clip_skip=1)
        sequence, pooled = tiny.encode_prompt(PROMPTS, clip_skip=1)
        unskipped = tiny.encode(PROMPTS)
    assert_same_conditioning(ours, sequence, pooled)
    assert not torch.allclose(ours.sequence, unskipped.sequence)
    if ours.pooled is not None:
        # clip_skip picks an earlier hidden state; the pooled vectors still come from the last layer.
        torch.testing.assert_close(ours.pooled, unskipped.pooled, rtol=0, atol=0)


@pytest.mark.parametrize("tiny", ["sd", "sd2"], indirect=True)
def test_sd_clip_skip_is_the_encoder_without_its_last_layers(tiny):
    # StableDiffusionPipeline.encode_prompt (diffusers 0.42) reads text_encoder.text_model.final_layer_norm, which
    # CLIPTextModel no longer has in transformers 5, so the reference here is what clip_skip means in SD: the same
    # encoder with its last `clip_skip` layers removed (the final layer norm kept).
    text_encoder = tiny.pipeline.text_encoder
    config = text_encoder.config.to_dict() | {"num_hidden_layers": text_encoder.config.num_hidden_layers - 1}
    shortened = CLIPTextModel(CLIPTextConfig.from_dict(config)).eval()
    unused = shortened.load_state_dict(text_encoder.state_dict(), strict=False).unexpected_keys
    last_layer = f".layers.{text_encoder.config.num_hidden_layers - 1}."
    assert unused and all(last_layer in key for key in unused)
    ids = tiny.pipeline.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ours = tiny.encode(PROMPTS, clip_skip=1)
        expected = shortened(ids.input_ids).last_hidden_state
    torch.testing.assert_close(ours.sequence, expected, rtol=1e-6, atol=1e-7)
    assert ours.pooled is None


@pytest.mark.parametrize("tiny", ["sd"], indirect=True)
def test_sd_passes_the_attention_mask_only_when_the_config_asks(tiny):
    config = tiny.pipeline.text_encoder.config
    with torch.no_grad():
        unmasked = tiny.encode(PROMPTS)
        config.use_attention_mask = True
        try:
            ours = tiny.encode(PROMPTS)
            sequence, _ = tiny.encode_prompt(PROMPTS)
        finally:
            del config.use_attention_mask
    assert_same_conditioning(ours, sequence, None)
    # Only the padding positions of the short prompts change: they no longer attend to one another.
    assert not torch.allclose(ours.sequence[0], unmasked.sequence[0])
    torch.testing.assert_close(ours.sequence[2], unmasked.sequence[2], rtol=0, atol=0)


# The component run in float64 while the others stay in float32, and the dtype each pipeline then returns: SDXL casts
# both CLIP sequences to text_encoder_2's dtype, SD3 both to text_encoder's (the pooled vectors promote), FLUX keeps
# each encoder's own.
MIXED_DTYPES = {
    "sdxl": ("text_encoder", torch.float32, torch.float32),
    "sd3": ("text_encoder_2", torch.float32, torch.float64),
    "flux": ("text_encoder_2", torch.float64, torch.float32),
}


@pytest.mark.parametrize("tiny", list(MIXED_DTYPES), indirect=True)
def test_mixed_dtypes_are_cast_as_the_pipeline_casts(tiny):
    name, sequence_dtype, pooled_dtype = MIXED_DTYPES[tiny.family.name]
    components = tiny.pipeline.components | {name: copy.deepcopy(getattr(tiny.pipeline, name)).to(torch.float64)}
    mixed = TinyPipeline(tiny.shape, tiny.path, type(tiny.pipeline)(**components))
    with torch.no_grad():
        ours = mixed.encode(PROMPTS)
        sequence, pooled = mixed.encode_prompt(PROMPTS)
    assert_same_conditioning(ours, sequence, pooled)
    assert (ours.sequence.dtype, ours.pooled.dtype) == (sequence_dtype, pooled_dtype)


@pytest.mark.parametrize("tiny", ["sd3", "flux"], indirect=True)
def test_max_sequence_length_matches_the_pipeline(tiny):
    with torch.no_grad():
        ours = tiny.encode(PROMPTS, max_sequence_length=16)
        sequence, pooled = tiny.encode_prompt(PROMPTS, max_sequence_length=16)
    assert_same_conditioning(ours, sequence, pooled)
    clip_tokens = 77 if tiny.family.name == "sd3" else 0
    assert ours.sequence.shape[1] == clip_tokens + 16


def test_default_t5_windows_are_the_installed_pipelines_defaults():
    t5_windows = {name: family.encoders[-1].max_length for name, family in FAMILIES.items()}
    sd3_default = inspect.signature(StableDiffusion3Pipeline.encode_prompt).parameters["max_sequence_length"].default
    flux_default = inspect.signature(FluxPipeline.encode_prompt).parameters["max_sequence_length"].default
    assert t5_windows == {"sd": None, "sdxl": None, "sd3": sd3_default, "flux": flux_default}
    assert (sd3_default, flux_default) == (256, 512)


@pytest.mark.parametrize("tiny", ["sd3"], indirect=True)
def test_sd3_zero_pads_the_clip_features_to_the_t5_width(tiny):
    with torch.no_grad():
        sequence = tiny.encode(PROMPTS).sequence
    clip_width = tiny.pipeline.text_encoder.config.hidden_size + tiny.pipeline.text_encoder_2.config.hidden_size
    assert clip_width < sequence.shape[-1] == tiny.pipeline.text_encoder_3.config.d_model
    assert torch.all(sequence[:, :77, clip_width:] == 0)
    assert torch.all(sequence[:, :77, :clip_width].abs().sum(-1) > 0)


def test_gradients_reach_every_text_encoder(tiny):
    conditioning = tiny.encode(PROMPTS[:2])
    assert conditioning.sequence.requires_grad
    loss = conditioning.sequence.square().mean()
    if conditioning.pooled is not None:
        loss = loss + conditioning.pooled.square().mean()
    loss.backward()
    try:
        for name in tiny.family.text_encoder_names:
            grads = [p.grad for p in getattr(tiny.pipeline, name).parameters() if p.grad is not None]
            assert grads and any(grad.abs().sum() > 0 for grad in grads), name
    finally:
        for name in tiny.family.text_encoder_names:
            getattr(tiny.pipeline, name).zero_grad(set_to_none=True)


def test_detect_family_reads_model_index(tiny):
    model_index = json.loads((tiny.path / "model_index.json").read_text())
    family = detect_family(model_index)
    assert family.name == SHAPES[tiny.shape]
    # The description names the folder's real components.
    for name in (family.denoiser, *family.text_encoder_names, *family.tokenizer_names):
        assert model_index[name][0] in ("diffusers", "transformers"), name


def test_unknown_pipeline_class_is_one_clear_line():
    with pytest.raises(SafeTextError) as error:
        detect_family({"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    message = str(error.value)
    assert "\n" not in message and "KandinskyV22Pipeline" in message
    for pipeline_class in (
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
    ):
        assert pipeline_class in message
    with pytest.raises(SafeTextError, match="no _class_name"):
        detect_family({})


def test_pipeline_draws_an_image_in_two_steps(tiny):
    output = tiny.pipeline(
        ["a photo of a cat"],
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert output.images.shape == (1, 64, 64, 3)
    assert np.isfinite(output.images).all()


def test_encode_refuses_bad_input(tiny_pipeline_dir):
    pipeline = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    text_encoders, tokenizers = {"text_encoder": pipeline.text_encoder}, {"tokenizer": pipeline.tokenizer}
    with pytest.raises(SafeTextError, match="'sd4'.*sd, sdxl, sd3, flux"):
        encode("sd4", text_encoders, tokenizers, ["a cat"])
    with pytest.raises(SafeTextError, match="needs text_encoder_2, tokenizer_2"):
        encode("sdxl", text_encoders, tokenizers, ["a cat"])
    with pytest.raises(SafeTextError, match="non-empty list"):
        encode("sd", text_encoders, tokenizers, [])
    with pytest.raises(SafeTextError, match="non-empty list"):
        encode("sd", text_encoders, tokenizers, "a cat")
    with pytest.raises(SafeTextError, match="clip_skip=6 reaches below"):
        encode("sd", text_encoders, tokenizers, ["a cat"], clip_skip=6)
    with pytest.raises(SafeTextError, match="clip_skip=-1"):
        encode("sd", text_encoders, tokenizers, ["a cat"], clip_skip=-1)
    with pytest.raises(SafeTextError, match="max_sequence_length=513"):
        encode("sd", text_encoders, tokenizers, ["a cat"], max_sequence_length=513)


@pytest.mark.parametrize("tiny", ["sd3"], indirect=True)
def test_sd3_refuses_clip_features_wider_than_t5(tiny):
    # The same encoders with T5 as the first, side-by-side part: 128 features cannot be padded to CLIP-L's 32.
    swapped = PipelineFamily(
        name="sd3-swapped",
        pipeline_class="StableDiffusion3Pipeline",
        denoiser="transformer",
        encoders=(
            EncoderSpec("text_encoder_3", "tokenizer_3", max_length=77),
            EncoderSpec("text_encoder", "tokenizer", hidden_state="penultimate"),
        ),
        sequence_layout="features_then_tokens",
    )
    text_encoders = {name: getattr(tiny.pipeline, name) for name in swapped.text_encoder_names}
    tokenizers = {name: getattr(tiny.pipeline, name) for name in swapped.tokenizer_names}
    with pytest.raises(SafeTextError, match=r"\(128 wide\).*text_encoder \(32\)"):
        encode(swapped, text_encoders, tokenizers, ["a cat"])


def test_family_descriptions_are_validated():
    with pytest.raises(ValueError, match="hidden_state='first'.*last, penultimate"):
        EncoderSpec("text_encoder", "tokenizer", hidden_state="first")
    with pytest.raises(ValueError, match="pooled='pooled'.*pooler_output, text_embeds"):
        EncoderSpec("text_encoder", "tokenizer", pooled="pooled")
    with pytest.raises(ValueError, match="neither a sequence nor a pooled vector"):
        EncoderSpec("text_encoder", "tokenizer", hidden_state=None)
    with pytest.raises(ValueError, match="clip_skip=True needs a hidden_state"):
        EncoderSpec("text_encoder", "tokenizer", hidden_state=None, pooled="text_embeds", clip_skip=True)
    with pytest.raises(ValueError, match="max_length=0"):
        EncoderSpec("text_encoder", "tokenizer", max_length=0)
    with pytest.raises(ValueError, match="not both"):
        EncoderSpec("text_encoder", "tokenizer", max_length=77, window_from="tokenizer")
    with pytest.raises(ValueError, match="attention_mask='always'.*never, if_configured"):
        EncoderSpec("text_encoder", "tokenizer", attention_mask="always")

    clip, t5 = EncoderSpec("text_encoder", "tokenizer"), EncoderSpec("text_encoder_2", "tokenizer_2", max_length=8)
    with pytest.raises(ValueError, match="sequence_layout='tokens'.*features, features_then_tokens"):
        PipelineFamily("x", "XPipeline", "unet", (clip,), sequence_layout="tokens")
    with pytest.raises(ValueError, match="no text encoders"):
        PipelineFamily("x", "XPipeline", "unet", ())
    with pytest.raises(ValueError, match="features_then_tokens needs"):
        PipelineFamily("x", "XPipeline", "unet", (t5,), sequence_layout="features_then_tokens")
    with pytest.raises(ValueError, match="twice"):
        PipelineFamily("x", "XPipeline", "unet", (clip, clip))

    with pytest.raises(ValueError, match=r"sequence must be \[n, tokens, dim\]"):
        Conditioning(sequence=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"pooled must be \[n, dim\] with n = 2"):
        Conditioning(sequence=torch.zeros(2, 3, 4), pooled=torch.zeros(3, 4))
