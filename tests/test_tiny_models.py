import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5Config, T5Tokenizer

from safetext.errors import SafeTextError
from safetext.tiny_models import SUPPORTED_FAMILIES, create_tiny_pipeline

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return create_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), seed=0)


@pytest.fixture(scope="module")
def pipeline(pipeline_dir):
    pipeline = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_sd_pipeline_has_sd_v1_components(pipeline):
    assert isinstance(pipeline.unet, UNet2DConditionModel)
    assert isinstance(pipeline.vae, AutoencoderKL)
    assert isinstance(pipeline.text_encoder, CLIPTextModel)
    assert isinstance(pipeline.tokenizer, CLIPTokenizer)
    assert isinstance(pipeline.scheduler, PNDMScheduler)
    assert pipeline.safety_checker is None and pipeline.feature_extractor is None
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size == 32
    assert pipeline.text_encoder.config.vocab_size == len(pipeline.tokenizer) == 49408
    assert pipeline.text_encoder.config.max_position_embeddings == pipeline.tokenizer.model_max_length == 77
    assert pipeline.text_encoder.config.eos_token_id == pipeline.text_encoder.config.pad_token_id == 49407
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert pipeline.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_pipeline_generates_finite_images(pipeline):
    output = pipeline(
        ["a photo of a cat", "a painting of a dog"],
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert output.images.shape == (2, 64, 64, 3)
    assert np.isfinite(output.images).all()


def test_text_encoder_loads_as_a_subfolder(pipeline_dir):
    text_encoder = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer")
    ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state
    assert hidden.shape == (1, 77, 32)


def test_only_safetensors_weights_are_written(pipeline_dir):
    files = [path for path in pipeline_dir.rglob("*") if path.is_file()]
    assert not [path for path in files if path.suffix in PICKLE_SUFFIXES]
    weight_folders = {path.parent.name for path in files if path.suffix == ".safetensors"}
    assert weight_folders == {"unet", "vae", "text_encoder"}


def test_same_seed_gives_same_weights_and_keeps_global_rng(pipeline_dir, tmp_path):
    rng_state = torch.random.get_rng_state()
    same = create_tiny_pipeline(tmp_path / "same", seed=0)
    other = create_tiny_pipeline(tmp_path / "other", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)

    weights = load_file(pipeline_dir / "text_encoder" / "model.safetensors")
    same_weights = load_file(same / "text_encoder" / "model.safetensors")
    other_weights = load_file(other / "text_encoder" / "model.safetensors")
    assert weights.keys() == same_weights.keys()
    assert all(torch.equal(weights[name], same_weights[name]) for name in weights)
    assert not all(torch.equal(weights[name], other_weights[name]) for name in weights)


def test_unknown_family_is_refused(tmp_path):
    assert SUPPORTED_FAMILIES == ("sd", "sd2", "sdxl", "sd3", "flux")
    with pytest.raises(SafeTextError, match=r"'sd9'.*sd"):
        create_tiny_pipeline(tmp_path, family="sd9")
    assert not any(tmp_path.iterdir())


def test_non_empty_output_dir_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(SafeTextError, match="not empty"):
        create_tiny_pipeline(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]

    create_tiny_pipeline(tmp_path, overwrite=True)
    assert (tmp_path / "model_index.json").is_file()
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "pipeline"
    path.write_text("")
    with pytest.raises(SafeTextError, match="is a file"):
        create_tiny_pipeline(path)


# family -> (folders holding weights, tokenizer folder -> id it pads with): OpenCLIP-trained encoders (SD 2.x's, the
# bigG tokenizer_2 of SDXL and SD3) pad with "!" (id 0), OpenAI's CLIP-L with <|endoftext|>, T5 with <pad> (id 0).
OTHER_FAMILIES = {
    "sd2": ({"unet", "vae", "text_encoder"}, {"tokenizer": 0}),
    "sdxl": ({"unet", "vae", "text_encoder", "text_encoder_2"}, {"tokenizer": 49407, "tokenizer_2": 0}),
    "sd3": (
        {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"},
        {"tokenizer": 49407, "tokenizer_2": 0, "tokenizer_3": 0},
    ),
    "flux": ({"transformer", "vae", "text_encoder", "text_encoder_2"}, {"tokenizer": 49407, "tokenizer_2": 0}),
}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_other_families_write_reproducible_safetensors_and_their_tokenizers(family, tmp_path):
    first = create_tiny_pipeline(tmp_path / "first", family=family, seed=0)
    again = create_tiny_pipeline(tmp_path / "again", family=family, seed=0)
    weight_folders, pad_ids = OTHER_FAMILIES[family]

    files = [path for path in first.rglob("*") if path.is_file()]
    assert not [path for path in files if path.suffix in PICKLE_SUFFIXES]
    weights = sorted(path.relative_to(first) for path in files if path.suffix == ".safetensors")
    assert {path.parent.name for path in weights} == weight_folders
    for path in weights:
        ours, theirs = load_file(first / path), load_file(again / path)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours), path

    for folder, pad_id in pad_ids.items():
        tokenizer = AutoTokenizer.from_pretrained(first / folder)
        assert tokenizer.pad_token_id == pad_id, folder
        if isinstance(tokenizer, CLIPTokenizer):
            ids = tokenizer("a photo of a cat", padding="max_length", max_length=10).input_ids
            assert ids == [49406, 320, 1125, 539, 320, 2368, 49407] + [pad_id] * 3


@pytest.mark.parametrize("family, folder", [("sd3", "tokenizer_3"), ("flux", "tokenizer_2")])
def test_t5_tokenizer_has_t5s_layout(family, folder, tmp_path):
    path = create_tiny_pipeline(tmp_path, family=family)
    tokenizer = T5Tokenizer.from_pretrained(path / folder)
    encoder_config = T5Config.from_pretrained(path / folder.replace("tokenizer", "text_encoder"))
    # T5 v1.1: 32,000 pieces and 100 sentinels counting down from 32099, in a 32,128-row embedding table.
    assert len(tokenizer) == 32100 and encoder_config.vocab_size == 32128
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]
    assert tokenizer.model_max_length == 512
    ids = tokenizer("a photo of a cat").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁cat", "</s>"]
    # Not T5's vocabulary: characters outside ASCII are unknown.
    assert tokenizer.unk_token_id in tokenizer("Zürich").input_ids
