"""The MiniWorld build: each stage at tiny sizes for a few steps, and the pipeline folder the whole build writes."""

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import safetext
from safetext.miniworld.autoencoder_training import AutoencoderConfig, random_crops, train_autoencoder
from safetext.miniworld.build import RECORD_NAME, BuildConfig, main
from safetext.miniworld.clip_training import MiniClipConfig, contrastive_loss, train_mini_clip
from safetext.miniworld.precision import bf16_is_native
from safetext.miniworld.unet_training import UNetConfig

TINY = BuildConfig.quick()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A folder with a tiny mini-CLIP and autoencoder, the inputs of the UNet stage."""
    folder = tmp_path_factory.mktemp("stages")
    train_mini_clip(TINY.clip, folder)
    train_autoencoder(TINY.autoencoder, folder)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("miniworld") / "pipeline"
    assert main(["--out", str(output_dir), "--quick", "--seed", "3"]) == 0
    return output_dir


def test_contrastive_loss_matches_hand_computed_values():
    embeds = torch.eye(4)
    # perfectly matched pairs at a high inverse temperature: each row's positive dominates
    assert contrastive_loss(embeds, 2 * embeds, torch.tensor(math.log(100.0)))["loss"] < 1e-3
    # at temperature exp(0) = 1 the logits are the cosines: 1 on the diagonal, 0 elsewhere
    expected = -math.log(math.e / (math.e + 3))
    terms = contrastive_loss(embeds, embeds, torch.tensor(0.0))
    assert terms["image_to_text"].item() == pytest.approx(expected)
    assert terms["loss"].item() == pytest.approx(expected)


def test_hard_negatives_join_the_picture_to_text_direction_only():
    images, texts = torch.eye(3), torch.eye(3)
    # one hard negative caption, as close to picture 0 as its own caption is
    negatives = torch.tensor([[1.0, 0.0, 0.0]])
    plain = contrastive_loss(images, texts, torch.tensor(0.0))
    hard = contrastive_loss(images, texts, torch.tensor(0.0), negative_text_embeds=negatives)
    assert hard["text_to_image"].item() == pytest.approx(plain["text_to_image"].item())
    # picture 0 now meets e, 1, 1, e; pictures 1 and 2 meet 1, e, 1, 1 (the negative is orthogonal to them)
    e = math.e
    expected = (-math.log(e / (2 * e + 2)) - 2 * math.log(e / (e + 3))) / 3
    assert hard["image_to_text"].item() == pytest.approx(expected)
    # no negatives at all is the plain loss
    empty = contrastive_loss(images, texts, torch.tensor(0.0), negative_text_embeds=torch.zeros(0, 3))
    assert empty["loss"].item() == pytest.approx(plain["loss"].item())


def test_mini_clip_loss_decreases_below_chance(tmp_path):
    config = MiniClipConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        projection_dim=64,
        vision_channels=(16, 32, 64),
        max_train_steps=60,
        train_batch_size=32,
        num_scenes=1920,
        learning_rate=2e-3,
        lr_warmup_steps=4,
    )
    losses = train_mini_clip(config, tmp_path)["losses"]
    # chance level, where no caption is told from another, is log(32) = 3.47; the untrained towers start above
    # it, and towers that learn nothing settle on it
    late = sum(losses[-10:]) / 10
    assert sum(losses[:4]) / 4 > math.log(32)
    assert late < math.log(32) - 0.08, losses


def test_mini_clip_saves_a_loadable_text_encoder_deterministically(tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    for run in ("a", "b"):
        train_mini_clip(TINY.clip, tmp_path / run)
    first = load_file(tmp_path / "a" / "text_encoder" / "model.safetensors")
    second = load_file(tmp_path / "b" / "text_encoder" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)

    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "a", subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tmp_path / "a", subfolder="text_encoder")
    assert len(tokenizer) == text_encoder.config.vocab_size == 49408
    assert text_encoder.config.max_position_embeddings == tokenizer.model_max_length == 77
    ids = tokenizer(["a striped ball on the beach"], return_tensors="pt").input_ids
    # the pooled output is read at <|endoftext|>, as in CLIP
    outputs = text_encoder(ids)
    assert torch.allclose(outputs.pooler_output[0], outputs.last_hidden_state[0, -1])


def test_autoencoder_maps_64_pixels_to_16x16x4_latents_with_a_measured_scale(tmp_path):
    from diffusers import AutoencoderKL

    record = train_autoencoder(TINY.autoencoder, tmp_path)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert (
        vae.config.scaling_factor == pytest.approx(record["scaling_factor"]) == pytest.approx(1 / record["latent_std"])
    )
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 4, 16, 16)
    assert vae.decode(latents).sample.shape == (1, 3, 64, 64)


def test_autoencoder_trains_under_bf16_autocast_with_float32_weights_and_losses(tmp_path):
    from diffusers import AutoencoderKL

    full = train_autoencoder(replace(TINY.autoencoder, mixed_precision="no"), tmp_path / "fp32")
    mixed = train_autoencoder(replace(TINY.autoencoder, mixed_precision="bf16"), tmp_path / "bf16")
    assert mixed["config"]["mixed_precision"] == "bf16"
    # the same initialisation and pictures: the first loss differs only by bfloat16's rounding in the networks
    assert mixed["losses"][0] == pytest.approx(full["losses"][0], rel=0.05)
    assert all(math.isfinite(loss) for loss in mixed["losses"])
    vae = AutoencoderKL.from_pretrained(tmp_path / "bf16" / "vae")
    assert {p.dtype for p in vae.parameters()} == {torch.float32}


def test_random_crops_cut_each_picture_at_its_own_seeded_place():
    pictures = np.arange(6 * 64 * 64 * 3, dtype=np.int64).reshape(6, 64, 64, 3)
    crops = random_crops(pictures, 32, random.Random(0))
    assert crops.shape == (6, 32, 32, 3)
    assert np.array_equal(crops, random_crops(pictures, 32, random.Random(0)))
    corners = []
    for picture, crop in zip(pictures, crops):
        # the values are unique, so the crop's first pixel gives where it was cut; the rest must follow it
        y, x = (int(v) for v in np.argwhere(picture[..., 0] == crop[0, 0, 0])[0])
        assert np.array_equal(picture[y : y + 32, x : x + 32], crop)
        corners.append((y, x))
    assert len(set(corners)) > 1


def test_autoencoder_trained_on_crops_encodes_and_decodes_whole_pictures(tmp_path):
    from diffusers import AutoencoderKL

    record = train_autoencoder(replace(TINY.autoencoder, crop_size=32), tmp_path)
    assert all(math.isfinite(loss) for loss in record["losses"])
    # the crops are drawn from the seed: the same run again learns the same; whole pictures learn otherwise
    assert train_autoencoder(replace(TINY.autoencoder, crop_size=32), tmp_path / "again")["losses"] == record["losses"]
    whole = replace(TINY.autoencoder, crop_size=None)
    assert train_autoencoder(whole, tmp_path / "whole")["losses"] != record["losses"]
    # the held-out error and the latent scale are measured on whole pictures
    assert math.isfinite(record["held_out_reconstruction_l1"]) and record["latent_std"] > 0
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert vae.decode(vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()).sample.shape == (1, 3, 64, 64)


def test_mini_clip_records_its_hard_negatives_and_can_train_without_them(tmp_path):
    hard = train_mini_clip(replace(TINY.clip, hard_negatives=True), tmp_path / "hard")
    plain = train_mini_clip(TINY.clip, tmp_path / "plain")
    assert hard["hard_negatives_per_step"] > 0
    assert 0.0 <= hard["hard_negative_accuracy"] <= 1.0
    assert plain["hard_negatives_per_step"] == 0 and plain["hard_negative_accuracy"] is None


def test_mini_clip_trains_under_bf16_autocast_with_float32_weights(tmp_path):
    from transformers import CLIPTextModel

    full = train_mini_clip(replace(TINY.clip, mixed_precision="no"), tmp_path / "fp32")
    mixed = train_mini_clip(replace(TINY.clip, mixed_precision="bf16"), tmp_path / "bf16")
    assert mixed["config"]["mixed_precision"] == "bf16"
    # on a CPU the text tower trains with eager attention under bf16, PyTorch's SDPA otherwise
    assert (full["attention"], mixed["attention"]) == ("sdpa", "eager")
    # the same initialisation and batches: the first loss differs by bfloat16's rounding in the towers, which is
    # far more than the two attention implementations' float32 rounding, and far less than a different model
    assert 1e-5 < abs(mixed["losses"][0] / full["losses"][0] - 1) < 0.05
    assert all(math.isfinite(loss) for loss in mixed["losses"])
    text_encoder = CLIPTextModel.from_pretrained(tmp_path / "bf16" / "text_encoder")
    assert {p.dtype for p in text_encoder.parameters()} == {torch.float32}


def test_unet_trains_under_bf16_autocast_with_float32_weights(stages, tmp_path):
    from diffusers import UNet2DConditionModel

    from safetext.miniworld.unet_training import train_unet

    full = train_unet(replace(TINY.unet, mixed_precision="no"), stages, stages, tmp_path / "fp32")
    mixed = train_unet(replace(TINY.unet, mixed_precision="bf16"), stages, stages, tmp_path / "bf16")
    # on a CPU the UNet trains with diffusers' classic attention processor under bf16, its SDPA one otherwise
    assert (full["attention_processor"], mixed["attention_processor"]) == ("AttnProcessor2_0", "AttnProcessor")
    # the same initialisation and batches: the first loss differs only by bfloat16's rounding in the UNet
    assert 1e-5 < abs(mixed["losses"][0] / full["losses"][0] - 1) < 0.05
    assert all(math.isfinite(loss) for loss in mixed["losses"])
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "bf16" / "unet")
    assert {p.dtype for p in unet.parameters()} == {torch.float32}


def test_a_compiled_unet_trains_as_the_plain_one_and_saves_the_same_weights(stages, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from safetext.miniworld.unet_training import train_unet

    # TorchDynamo traces the UNet as in the recipe, but hands the graphs to the eager backend: Inductor's C++
    # compile takes minutes cold, which the suite cannot spend
    compiled_with = []
    real_compile = torch.compile

    def compile_eagerly(module, **kwargs):
        compiled_with.append(module)
        return real_compile(module, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    plain = train_unet(TINY.unet, stages, stages, tmp_path / "plain")
    assert not compiled_with
    compiled = train_unet(replace(TINY.unet, compile=True), stages, stages, tmp_path / "compiled")
    assert len(compiled_with) == 1 and compiled["config"]["compile"] is True
    assert compiled["first_step_seconds"] > 0 and plain["first_step_seconds"] > 0
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    # the folder holds the module's own weights, under their own names (no compiled wrapper's prefix)
    weights = {
        name: load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors")
        for name in ("plain", "compiled")
    }
    assert weights["compiled"].keys() == weights["plain"].keys()
    assert not any(key.startswith("_orig_mod") for key in weights["compiled"])
    assert all(torch.allclose(weights["compiled"][k], weights["plain"][k], atol=1e-4) for k in weights["plain"])
    UNet2DConditionModel.from_pretrained(tmp_path / "compiled" / "unet")


def test_the_unet_sees_patterns_as_often_as_its_config_asks(stages, tmp_path):
    from safetext.miniworld.scenes import SceneDistribution
    from safetext.miniworld.unet_training import train_unet

    # the recipe's UNet sees the world's own share of patterns, as the mini-CLIP and the autoencoder do
    assert UNetConfig().pattern_rate == SceneDistribution().pattern_rate == 0.4
    every = train_unet(replace(TINY.unet, num_scenes=200, pattern_rate=1.0), stages, stages, tmp_path / "every")
    none = train_unet(replace(TINY.unet, num_scenes=200, pattern_rate=0.0), stages, stages, tmp_path / "none")
    # at 1.0 nearly every carrier carries one: the second object of a pair drawn twice as one class is drawn again,
    # and keeps only the patterns its new class carries
    assert every["patterned_share"] > 0.95 and none["patterned_share"] == 0.0
    assert every["config"]["pattern_rate"] == 1.0 and every["losses"] != none["losses"]


def test_unet_attends_at_its_finest_level_only_when_asked(stages, tmp_path):
    from diffusers import UNet2DConditionModel

    from safetext.miniworld.unet_training import train_unet

    for attend in (False, True):
        output_dir = tmp_path / f"attend-{attend}"
        # at 16x16 one head over all 32 channels, at the coarser levels two
        config = replace(TINY.unet, attention_at_16x16=attend, attention_head_dim=(1, 2, 2))
        train_unet(config, stages, stages, output_dir)
        unet = UNet2DConditionModel.from_pretrained(output_dir / "unet")
        finest = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if attend else ("DownBlock2D", "UpBlock2D")
        assert (unet.config.down_block_types[0], unet.config.up_block_types[-1]) == finest
        assert list(unet.config.down_block_types[1:]) == ["CrossAttnDownBlock2D"] * 2
        assert list(unet.config.attention_head_dim) == [1, 2, 2]
    finest_attention = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert finest_attention.heads == 1 and unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.heads == 2


def test_snapshots_and_the_moving_average_leave_the_training_as_it_was(stages, tmp_path):
    from diffusers import UNet2DConditionModel

    from safetext.miniworld.unet_training import train_unet

    def weights(folder):
        return torch.cat([p.detach().flatten() for p in UNet2DConditionModel.from_pretrained(folder).parameters()])

    steps = TINY.unet.max_train_steps
    plain = train_unet(TINY.unet, stages, stages, tmp_path / "plain")
    averaged = train_unet(
        replace(TINY.unet, ema_decay=0.9999),
        stages,
        stages,
        tmp_path / "averaged",
        snapshot_steps=(1, steps),
        snapshot_dir=tmp_path / "snapshots",
    )
    # the same steps were taken: the moving average and the snapshots only read the weights
    assert averaged["losses"] == plain["losses"]
    assert (plain["saved_weights"], averaged["saved_weights"]) == ("last", "moving average")
    last = weights(tmp_path / "plain" / "unet")
    assert torch.equal(weights(tmp_path / "snapshots" / f"step-{steps:05d}" / "unet"), last)
    # the pipeline holds the average, which the last snapshot holds too; after one step (decay 0) it is the weights
    average = weights(tmp_path / "averaged" / "unet")
    assert torch.equal(weights(tmp_path / "snapshots" / f"step-{steps:05d}" / "ema_unet"), average)
    assert not torch.equal(average, last)
    first = tmp_path / "snapshots" / "step-00001"
    assert torch.equal(weights(first / "ema_unet"), weights(first / "unet"))
    with pytest.raises(ValueError, match="snapshot_steps must lie in"):
        train_unet(TINY.unet, stages, stages, tmp_path / "x", snapshot_steps=(steps + 1,), snapshot_dir=tmp_path)


def test_an_interrupted_unet_stage_resumes_from_its_checkpoint_to_the_same_weights(stages, tmp_path, caplog):
    from diffusers import UNet2DConditionModel

    from safetext.checkpointing import list_checkpoints
    from safetext.miniworld.unet_training import train_unet

    def weights(folder):
        return torch.cat([p.detach().flatten() for p in UNet2DConditionModel.from_pretrained(folder).parameters()])

    # with the moving average and bf16 autocast, as the recipe could run
    config = replace(TINY.unet, max_train_steps=6, ema_decay=0.9999)
    whole = train_unet(config, stages, stages, tmp_path / "whole")
    # a run that checkpoints after steps 1 to 5 and keeps the last two; training again on that folder stands for a
    # run stopped after step 4 whose save after step 5 was cut short (two steps left: the learning rate's schedule
    # counts too)
    checkpoints = tmp_path / "checkpoints"
    train_unet(config, stages, stages, tmp_path / "first", checkpoint_dir=checkpoints, checkpoint_steps=1)
    assert [path.name for path in list_checkpoints(checkpoints)] == ["checkpoint-4", "checkpoint-5"]
    (checkpoints / "checkpoint-5" / "model.safetensors").write_bytes(b"cut short")
    with caplog.at_level("INFO", logger="safetext.miniworld.unet_training"):
        resumed = train_unet(config, stages, stages, tmp_path / "resumed", checkpoint_dir=checkpoints)
    assert "cannot read" in caplog.text and "resuming from" in caplog.text
    assert resumed["resumed_from_step"] == 4 and whole["resumed_from_step"] is None
    assert resumed["losses"] == whole["losses"]
    assert torch.equal(weights(tmp_path / "resumed" / "unet"), weights(tmp_path / "whole" / "unet"))
    # a checkpoint written before a setting existed reads it as its default and resumes
    state_file = checkpoints / "checkpoint-4" / "training_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["pattern_rate"]
    state_file.write_text(json.dumps(state))
    older = train_unet(config, stages, stages, tmp_path / "older", checkpoint_dir=checkpoints)
    assert older["resumed_from_step"] == 4 and older["losses"] == whole["losses"]
    # a checkpoint of other settings is dropped, and the run starts from step 0
    other = train_unet(
        replace(config, learning_rate=5e-4), stages, stages, tmp_path / "other", checkpoint_dir=checkpoints
    )
    assert other["resumed_from_step"] is None and list_checkpoints(checkpoints) == []


def test_built_folder_is_a_stable_diffusion_pipeline_that_draws_64px_pictures(built):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(built)
    # weights are stored in float16 but every component computes in float32 unless asked otherwise
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.float32}
    assert isinstance(pipeline.scheduler, PNDMScheduler)
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.safety_checker is None
    # SD v1.4's tokenizer files
    assert sorted(path.name for path in (built / "tokenizer").iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert pipeline.tokenizer.model_max_length == 77 and len(pipeline.tokenizer) == 49408
    image = pipeline(
        "a photo of a red striped ball on the beach",
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_built_weights_are_half_precision_and_the_record_describes_every_stage(built):
    for path in built.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F16"}, path
    record = json.loads((built / RECORD_NAME).read_text())
    assert set(record["stages"]) == {"clip", "autoencoder", "unet"}
    assert record["config"]["seed"] == 3
    assert [record["stages"][name]["config"]["seed"] for name in ("clip", "autoencoder", "unet")] == [3, 4, 5]
    for stage in record["stages"].values():
        assert len(stage["losses"]) == stage["config"]["max_train_steps"]
        assert stage["wall_time_s"] >= 0
    assert record["size_bytes"] > 0 and record["provenance"]["versions"]
    # the quick recipe asks bf16 of every stage; a CPU without native bfloat16 trains them in float32, and says so
    fallback = [] if bf16_is_native("cpu") else ["clip", "autoencoder", "unet"]
    assert record["precision_fallback"] == fallback
    ran = {name: record["stages"][name]["config"]["mixed_precision"] for name in ("clip", "autoencoder", "unet")}
    assert ran == {name: "no" if name in fallback else "bf16" for name in ran}
    assert record["config"]["unet"]["mixed_precision"] == ran["unet"]
    # the CPU's vector instructions are recorded, since float32 rounds differently across them
    assert record["provenance"]["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_attribute_separation_compares_the_pattern_words_as_the_unet_reads_them(built):
    from safetext.miniworld.quality import attribute_separation

    record = attribute_separation(built)
    # "checkered" takes two tokens, "striped" one: the pairs are aligned from the end-of-text token
    assert set(record["pairs"]) == {"striped / dotted", "striped / checkered", "dotted / checkered"}
    values = list(record["pairs"].values()) + list(record["reference"].values())
    assert all(-1.0 <= value <= 1.0 for value in values)
    assert len(set(values)) == len(values)


def test_safetext_loads_the_built_text_encoder_as_for_sd(built):
    from safetext.loading import load_text_encoder

    loaded = load_text_encoder(built, torch_dtype=torch.float32)
    assert not loaded.bare and loaded.family == "sd"
    assert loaded.source["kind"] == "pipeline"
    assert loaded.text_encoder.dtype == torch.float32
    assert len(loaded.tokenizer) == loaded.text_encoder.config.vocab_size


def test_safetext_loads_the_built_text_encoder_in_float32_by_default(built):
    from safetext.loading import load_text_encoder

    assert load_text_encoder(built).text_encoder.dtype == torch.float32


def test_a_full_precision_build_stores_float32(tmp_path):
    from safetext.miniworld.build import build

    record = build(tmp_path / "model", replace(BuildConfig.quick(), half_precision=False))
    assert record["half_precision_files"] == []
    for path in (tmp_path / "model").rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F32"}, path


def test_align_and_generate_treat_the_built_pipeline_as_sd(built, tmp_path, capsys):
    from safetext.cli import main as safetext_main

    model = built
    prompts = Path(safetext.__file__).parent / "miniworld" / "prompts"
    aligned, images = tmp_path / "aligned", tmp_path / "images"
    align = ["align", "--model", model, "--unsafe", prompts / "miniworld-train.csv", "--safe"]
    align += [prompts / "miniworld-safe.csv", "--out", aligned, "--no-progress", "--max-prompts", "20"]
    align += ["--max-train-steps", "2", "--train-batch-size", "2"]
    assert safetext_main([str(a) for a in align]) == 0, capsys.readouterr().err
    generate = ["generate", "--model", aligned, "--prompts", prompts / "miniworld-heldout.csv", "--out", images]
    generate += ["--no-progress", "--max-prompts", "2", "--num-inference-steps", "2"]
    assert safetext_main([str(a) for a in generate]) == 0, capsys.readouterr().err
    pictures = sorted(images.glob("*.png"))
    assert len(pictures) == 2
    with Image.open(pictures[0]) as picture:
        assert picture.size == (64, 64)


def test_the_whole_build_is_reproducible(built, tmp_path):
    assert main(["--out", str(tmp_path / "again"), "--quick", "--seed", "3"]) == 0
    for path in sorted(built.rglob("*.safetensors")):
        first, second = load_file(path), load_file(tmp_path / "again" / path.relative_to(built))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first), path


def test_an_interrupted_build_resumes_after_its_finished_stages(built, tmp_path, capsys):
    from safetext.miniworld.build import STAGES_DIR

    # the first build kept its stages; a second one in a folder holding them reuses the mini-CLIP and the
    # autoencoder, trains only the UNet, and ends with the same weights as a build from scratch
    first = tmp_path / "first"
    assert main(["--out", str(first), "--quick", "--seed", "3", "--keep-stages"]) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (tmp_path / f"first-{STAGES_DIR}").rename(resumed / STAGES_DIR)
    assert main(["--out", str(resumed), "--quick", "--seed", "3"]) == 0
    record = json.loads((resumed / RECORD_NAME).read_text())
    assert record["resumed_stages"] == ["clip", "autoencoder"]
    assert not (resumed / STAGES_DIR).exists()
    for path in sorted(built.rglob("*.safetensors")):
        first_weights, resumed_weights = load_file(path), load_file(resumed / path.relative_to(built))
        assert all(torch.equal(first_weights[key], resumed_weights[key]) for key in first_weights), path


def test_a_stage_with_other_settings_is_trained_again(tmp_path):
    import shutil

    from safetext.miniworld.build import STAGE_RECORD, STAGES_DIR, build

    old_way = replace(TINY, autoencoder=replace(TINY.autoencoder, crop_size=None, mixed_precision="no"))
    build(tmp_path / "a", TINY, keep_stages=True)
    build(tmp_path / "b", old_way, keep_stages=True)
    kept, kept_old_way = tmp_path / f"a-{STAGES_DIR}", tmp_path / f"b-{STAGES_DIR}"
    # a stage trained before a setting existed has no record of it: it is read as the setting's default, which is
    # what the code that trained it did (whole pictures in float32)
    record_path = kept_old_way / "autoencoder" / STAGE_RECORD
    record = json.loads(record_path.read_text())
    del record["config"]["crop_size"], record["config"]["mixed_precision"]
    record_path.write_text(json.dumps(record))
    cases = {
        "same": (kept, TINY, ["clip", "autoencoder"]),
        "other learning rate": (
            kept,
            replace(TINY, autoencoder=replace(TINY.autoencoder, learning_rate=2e-3)),
            ["clip"],
        ),
        "old record, the old way": (kept_old_way, old_way, ["clip", "autoencoder"]),
        "old record, the recipe's crops and bf16": (kept_old_way, TINY, ["clip"]),
    }
    for number, (case, (stages, config, resumed)) in enumerate(cases.items()):
        folder = tmp_path / str(number)
        shutil.copytree(stages, folder / STAGES_DIR)
        assert build(folder, config)["resumed_stages"] == resumed, case


def test_the_recipe_trains_the_autoencoder_on_crops_under_bf16_yet_old_records_read_as_whole_float32_pictures():
    from dataclasses import asdict

    from safetext.checkpointing import same_settings

    recipe = BuildConfig().autoencoder
    assert (recipe.crop_size, recipe.mixed_precision) == (32, "bf16")
    # and, since the sixth build, the mini-CLIP and the UNet under bf16 too
    assert (BuildConfig().clip.mixed_precision, BuildConfig().unet.mixed_precision) == ("bf16", "bf16")
    # a stage trained before these settings existed trained on whole pictures in float32; its record (JSON) lacks
    # them
    old_way = replace(recipe, crop_size=None, mixed_precision="no")
    record = json.loads(json.dumps(asdict(old_way)))
    del record["crop_size"], record["mixed_precision"]
    assert same_settings(record, old_way)
    assert not same_settings(record, recipe)


def test_min_snr_weights_follow_the_paper():
    from diffusers import DDPMScheduler

    from safetext.miniworld.unet_training import SD_BETAS, min_snr_weights

    alphas_cumprod = DDPMScheduler(**SD_BETAS).alphas_cumprod
    timesteps = torch.tensor([0, 500, 999])
    weights = min_snr_weights(alphas_cumprod, timesteps, gamma=5.0)
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    # early timesteps have SNR far above gamma and are weighted down to gamma / SNR; late ones keep weight 1
    assert snr[0] > 5 and weights[0] == pytest.approx(5 / snr[0].item())
    assert snr[2] < 5 and weights[2] == pytest.approx(1.0)
    assert torch.all(weights <= 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_build_refuses_an_absent_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "pipeline"), "--quick", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_build_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--quick"])
    assert exit_info.value.code == 2
    assert "output_dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MiniClipConfig(hidden_size=30, num_attention_heads=4), "num_attention_heads must divide"),
        (lambda: MiniClipConfig(train_batch_size=1), "train_batch_size"),
        (lambda: MiniClipConfig(train_batch_size=64, num_scenes=32), "num_scenes must be at least"),
        (lambda: AutoencoderConfig(block_out_channels=(32, 64)), "three positive widths"),
        (lambda: AutoencoderConfig(block_out_channels=(32, 48, 64), norm_num_groups=32), "multiples of norm_num"),
        (lambda: AutoencoderConfig(train_batch_size=64, num_pictures=32), "num_pictures must be at least"),
        (lambda: AutoencoderConfig(mixed_precision="fp16"), "mixed_precision must be 'no' or 'bf16'"),
        (lambda: MiniClipConfig(mixed_precision="fp16"), "mixed_precision must be 'no' or 'bf16'"),
        (lambda: AutoencoderConfig(crop_size=28), "crop_size must be None or a multiple of 4 from 32 to 64"),
        (lambda: AutoencoderConfig(crop_size=34), "crop_size must be None or a multiple of 4 from 32 to 64"),
        (lambda: AutoencoderConfig(crop_size=68), "crop_size must be None or a multiple of 4 from 32 to 64"),
        (lambda: UNetConfig(snr_gamma=0.0), "snr_gamma"),
        (lambda: UNetConfig(mixed_precision="fp16"), "mixed_precision must be 'no' or 'bf16'"),
        (lambda: UNetConfig(num_scenes=0), "num_scenes"),
        (lambda: UNetConfig(attention_head_dim=(2, 8)), "one positive number or three"),
        (lambda: UNetConfig(attention_head_dim=0), "one positive number or three"),
        (lambda: UNetConfig(attention_head_dim=(3, 8, 8)), "must divide into its heads"),
        (lambda: UNetConfig(caption_dropout=1.0), "caption_dropout"),
        (lambda: UNetConfig(pattern_rate=1.5), "pattern_rate must be between 0 and 1"),
        (lambda: UNetConfig(ema_decay=1.0), "ema_decay"),
        (lambda: UNetConfig(max_train_steps=10, lr_warmup_steps=10), "lr_warmup_steps"),
        (lambda: BuildConfig(time_budget_s=0), "time_budget_s"),
        (lambda: BuildConfig(device="abacus"), "device must be a torch device"),
    ],
)
def test_configs_reject_bad_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()
