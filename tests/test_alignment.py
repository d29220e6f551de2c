"""`align` end to end on tiny real models: metrics, the exported folder, resume, refusals, NaN, multi-process."""

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from transformers import BertModel, CLIPTextModel

import safetext
from safetext.alignment import align
from safetext.config import AlignmentConfig
from safetext.errors import SafeTextError
from safetext.prompts import PromptSet, read_prompts, split_heldout

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
TESTS_DIR = Path(__file__).resolve().parent


def sets(unsafe, safe):
    return {"unsafe": PromptSet(list(unsafe))}, {"safe": PromptSet(list(safe))}


def read_record(output_dir) -> dict:
    return json.loads((Path(output_dir) / "safetext.json").read_text())


def read_log(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "logs" / "train_log.jsonl").read_text().splitlines()]


def encoder_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "text_encoder" / "model.safetensors")


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def generate(pipeline) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


# --- one run, exported with its pipeline (the `aligned_run` fixture) -------------------------------------------


def test_record_holds_metrics_config_provenance_cost_and_versions(aligned_run, tiny_pipeline_dir):
    record = read_record(aligned_run.output_dir)
    assert record["format"] == "safetext.alignment/1"
    for split in ("heldout", "train"):
        metrics = record["metrics"][split]
        assert metrics["unsafe_cosine"]["before"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["unsafe_cosine"]["after"] < metrics["unsafe_cosine"]["before"] - 0.005
        assert metrics["safe_relative_drift"]["before"] == pytest.approx(0.0, abs=1e-6)
        assert 0.0 < metrics["safe_relative_drift"]["after"] < 0.2
        assert set(metrics["by_set"]) == {"unsafe:unsafe", "safe:safe"}
        assert set(metrics["full_tensor"]) == {"unsafe_cosine", "safe_relative_drift"}
    assert record["metrics"]["positions"] == {"unsafe": "no_bos", "safe": "all"}

    assert record["config"] == aligned_run.config.to_dict()
    assert AlignmentConfig.from_dict(record["config"]) == aligned_run.config

    # data provenance: which prompts (by hash) and how many went to each side of the split
    heldout_unsafe = split_heldout(PromptSet(aligned_run.unsafe_prompts), 0.25, seed=0)[1]
    unsafe = record["data"]["unsafe"]["unsafe"]
    assert unsafe["prompts_sha256"] == sha256_of("\n".join(aligned_run.unsafe_prompts))
    assert (unsafe["train"], unsafe["heldout"]) == (8 - len(heldout_unsafe), len(heldout_unsafe)) == (6, 2)
    safe = record["data"]["safe"]["safe"]
    assert safe["prompts_sha256"] == sha256_of("\n".join(aligned_run.safe_prompts))
    assert (safe["train"], safe["heldout"]) == (6, 2)
    assert record["data"]["safe_prompts_removed_as_unsafe"] == {"safe": 0}
    assert record["data"]["truncated_prompts"] == 0

    # the base model, identified by a hash of its encoder weights (file name, then bytes)
    weights_file = tiny_pipeline_dir / "text_encoder" / "model.safetensors"
    digest = hashlib.sha256(b"model.safetensors" + weights_file.read_bytes()).hexdigest()
    model = record["model"]
    assert model["text_encoder_sha256"] == digest
    assert model["pipeline_involved"] is True and model["family"] == "sd" and model["kind"] == "pipeline"
    assert model["text_encoder_class"] == "CLIPTextModel"

    assert record["training"]["steps"] == 20 and record["training"]["num_processes"] == 1
    assert record["training"]["resumed_from_step"] == 0
    assert all(math.isfinite(v) for v in record["training"]["final_losses"].values())
    cost = record["cost"]
    assert cost["wall_seconds"] >= cost["train_seconds"] > 0
    assert cost["peak_memory_bytes"]["cpu_max_rss"] > 2**20
    assert cost["device"]["type"] == "cpu"
    versions = record["versions"]
    assert versions["torch"] == torch.__version__ and versions["safetext"] == safetext.__version__
    assert {"python", "transformers", "diffusers", "accelerate", "safetensors"} <= set(versions)
    assert "git_commit" in record
    run_file = json.loads((aligned_run.output_dir / "run.json").read_text())
    assert run_file["fingerprint"] == record["fingerprint"]


def test_metrics_match_an_independent_computation(aligned_run, tiny_pipeline_dir):
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    aligned_encoder = CLIPTextModel.from_pretrained(aligned_run.output_dir, subfolder="text_encoder")
    aligned = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, text_encoder=aligned_encoder)
    record = read_record(aligned_run.output_dir)

    def encode(pipeline, prompts, skip_bos):
        with torch.no_grad():
            embeddings, _ = pipeline.encode_prompt(prompts, torch.device("cpu"), 1, False)
        # default positions: unsafe prompts without the constant BOS position, safe prompts the whole 77 x 32 tensor
        return embeddings[:, 1 if skip_bos else 0 :].flatten(1)

    heldout = {
        side: split_heldout(PromptSet(prompts), 0.25, seed=0)[1].prompts
        for side, prompts in (("unsafe", aligned_run.unsafe_prompts), ("safe", aligned_run.safe_prompts))
    }
    before = {side: encode(base, prompts, side == "unsafe") for side, prompts in heldout.items()}
    after = {side: encode(aligned, prompts, side == "unsafe") for side, prompts in heldout.items()}
    cosine = torch.nn.functional.cosine_similarity(after["unsafe"], before["unsafe"], dim=1).mean().item()
    drift = {
        side: ((after[side] - before[side]).norm(dim=1) / before[side].norm(dim=1)).mean().item() for side in after
    }

    metrics = record["metrics"]["heldout"]
    assert metrics["unsafe_cosine"]["after"] == pytest.approx(cosine, abs=1e-4)
    assert metrics["safe_relative_drift"]["after"] == pytest.approx(drift["safe"], abs=1e-4)
    # Safe prompts stay closer to where they were than unsafe prompts, which the objective pushes away.
    assert drift["safe"] < 0.6 * drift["unsafe"]


def test_aligned_encoder_loads_into_the_original_pipeline_and_generates(aligned_run, tiny_pipeline_dir):
    text_encoder = CLIPTextModel.from_pretrained(aligned_run.output_dir, subfolder="text_encoder")
    base_weights = load_file(tiny_pipeline_dir / "text_encoder" / "model.safetensors")
    state = text_encoder.state_dict()
    assert any(not torch.equal(state[name], base_weights[name]) for name in base_weights)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, text_encoder=text_encoder)
    images = generate(pipeline)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_exported_pipeline_opens_and_generates(aligned_run):
    pipeline = DiffusionPipeline.from_pretrained(aligned_run.output_dir / "pipeline")
    assert isinstance(pipeline, StableDiffusionPipeline)
    aligned = encoder_weights(aligned_run.output_dir)
    state = pipeline.text_encoder.state_dict()
    assert all(torch.equal(state[name], aligned[name]) for name in aligned)
    images = generate(pipeline)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert read_record(aligned_run.output_dir)["pipeline_dir"] == "pipeline"


def test_output_folder_layout_without_pickles(aligned_run):
    out = aligned_run.output_dir
    files = [path for path in out.rglob("*") if path.is_file()]
    assert files and not [path for path in files if path.suffix in PICKLE_SUFFIXES]
    assert not [path for path in out.rglob("*.tmp")]
    for name in ("safetext.json", "run.json", "README.md", "text_encoder/model.safetensors", "tokenizer"):
        assert (out / name).exists(), name
    # checkpoints every 8 steps and at the end, the newest 2 kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-16", "checkpoint-20"]
    card = (out / "README.md").read_text()
    assert "SafeText" in card and 'subfolder="text_encoder"' in card


def test_log_has_one_line_per_step(aligned_run):
    log = read_log(aligned_run.output_dir)
    weight = read_record(aligned_run.output_dir)["config"]["effectiveness_weight"]
    assert [entry["step"] for entry in log] == list(range(1, 21))
    for entry in log:
        assert entry["loss"] == pytest.approx(entry["utility_loss"] - weight * entry["effectiveness_loss"], abs=1e-5)
        assert math.isfinite(entry["grad_norm"])
    # the effectiveness term (negative cosine) rises from -1 as unsafe embeddings move away
    assert log[0]["effectiveness_loss"] == pytest.approx(-1.0, abs=1e-5)
    assert log[-1]["effectiveness_loss"] > log[0]["effectiveness_loss"]


# --- resume and the output folder -------------------------------------------------------------------------------

UNSAFE_AND_SAFE = (
    ["a nude person", "a naked body", "blood and gore", "a bloody knife"],
    ["a photo of a cat", "a red house", "a dog in a park", "a blue sky"],
)


RESUME_SETTINGS = {"train_batch_size": 3, "learning_rate": 1e-3, "heldout_fraction": 0.25}


def test_resumed_run_equals_an_uninterrupted_one(tiny_pipeline_dir, prompt_lists, tmp_path):
    full = AlignmentConfig(max_train_steps=6, checkpointing_steps=2, **RESUME_SETTINGS)
    align(tiny_pipeline_dir, *sets(*prompt_lists), tmp_path / "full", full, show_progress=False)

    # "Interrupted" after 3 steps: run lengths are not part of the run's identity, so the longer run resumes it.
    short = AlignmentConfig(max_train_steps=3, checkpointing_steps=2, **RESUME_SETTINGS)
    align(tiny_pipeline_dir, *sets(*prompt_lists), tmp_path / "resumed", short, show_progress=False)
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-3").is_dir()
    result = align(
        tiny_pipeline_dir, *sets(*prompt_lists), tmp_path / "resumed", full, resume=True, show_progress=False
    )

    assert result.record["training"]["resumed_from_step"] == 3
    full_weights, resumed_weights = encoder_weights(tmp_path / "full"), encoder_weights(tmp_path / "resumed")
    assert full_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)

    full_log, resumed_log = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    assert [entry["step"] for entry in resumed_log] == list(range(1, 7))
    for a, b in zip(full_log, resumed_log):
        assert (a["utility_loss"], a["effectiveness_loss"]) == (b["utility_loss"], b["effectiveness_loss"])
    assert result.metrics["heldout"] == read_record(tmp_path / "full")["metrics"]["heldout"]


def test_resume_drops_log_lines_past_the_checkpoint(tiny_pipeline_dir, prompt_lists, tmp_path):
    out = tmp_path / "out"
    config = AlignmentConfig(max_train_steps=2, checkpointing_steps=2, **RESUME_SETTINGS)
    align(tiny_pipeline_dir, *sets(*prompt_lists), out, config, show_progress=False)
    # a crash after logging step 3 but before its checkpoint leaves a line the resumed run writes again
    with open(out / "logs" / "train_log.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    longer = AlignmentConfig(max_train_steps=4, checkpointing_steps=2, **RESUME_SETTINGS)
    align(tiny_pipeline_dir, *sets(*prompt_lists), out, longer, resume=True, show_progress=False)
    log = read_log(out)
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    assert log[2]["loss"] != 123.0


@pytest.fixture(scope="module")
def finished_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    config = AlignmentConfig(max_train_steps=1, **RESUME_SETTINGS)
    align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), out, config, show_progress=False)
    return out, config


def test_same_run_without_resume_is_refused(finished_run, tiny_pipeline_dir):
    out, config = finished_run
    with pytest.raises(SafeTextError, match="already holds this run; pass --resume"):
        align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), out, config, show_progress=False)


@pytest.mark.parametrize("resume", [False, True])
def test_different_run_is_refused(finished_run, tiny_pipeline_dir, resume):
    out, config = finished_run
    before = (out / "safetext.json").read_bytes()
    other = AlignmentConfig.from_dict(dict(config.to_dict(), learning_rate=5e-4))
    with pytest.raises(SafeTextError, match="holds a different run .*--overwrite"):
        align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), out, other, resume=resume, show_progress=False)
    unsafe, safe = UNSAFE_AND_SAFE
    with pytest.raises(SafeTextError, match="holds a different run"):
        align(
            tiny_pipeline_dir, *sets(unsafe + ["a gory scene"], safe), out, config, resume=resume, show_progress=False
        )
    assert (out / "safetext.json").read_bytes() == before


def test_overwrite_replaces_only_the_run(finished_run, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    (out / "notes.txt").write_text("mine")
    other = AlignmentConfig.from_dict(dict(finished_run[1].to_dict(), learning_rate=5e-4, max_train_steps=2))
    align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), out, other, overwrite=True, show_progress=False)
    assert read_record(out)["config"]["learning_rate"] == 5e-4
    assert [entry["step"] for entry in read_log(out)] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("overwrite", [False, True])
def test_folder_holding_something_else_is_refused(tiny_pipeline_dir, tmp_path, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("keep")
    config = AlignmentConfig(max_train_steps=1, **RESUME_SETTINGS)
    with pytest.raises(SafeTextError, match="not empty and holds no safetext run"):
        align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), out, config, overwrite=overwrite, show_progress=False)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_output_path_that_is_a_file_is_refused(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("")
    with pytest.raises(SafeTextError, match="exists and is not a folder"):
        align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), out, AlignmentConfig(max_train_steps=1), show_progress=False)


def test_data_errors_are_reported_before_any_work(tiny_pipeline_dir, tmp_path):
    unsafe, safe = sets(*UNSAFE_AND_SAFE)
    with pytest.raises(SafeTextError, match="at least one unsafe and one safe"):
        align(tiny_pipeline_dir, unsafe, {}, tmp_path / "a", show_progress=False)
    with pytest.raises(SafeTextError, match="every prompt is also an unsafe prompt"):
        align(tiny_pipeline_dir, unsafe, {"safe": PromptSet(["a nude person"])}, tmp_path / "b", show_progress=False)
    config = AlignmentConfig(heldout_fraction=0.6)  # the only unsafe prompt is held out
    with pytest.raises(SafeTextError, match="no training prompts left"):
        align(tiny_pipeline_dir, {"unsafe": PromptSet(["a nude"])}, safe, tmp_path / "c", config, show_progress=False)
    assert not any(tmp_path.iterdir())


def test_without_heldout_prompts(tiny_pipeline_dir, tmp_path):
    config = AlignmentConfig(max_train_steps=1, train_batch_size=2, heldout_fraction=0.0, learning_rate=1e-3)
    result = align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), tmp_path / "out", config, show_progress=False)
    assert "unsafe_cosine" not in result.metrics["heldout"]
    assert result.metrics["train"]["unsafe_cosine"]["after"] < 1.0
    assert result.record["data"]["unsafe"]["unsafe"]["heldout"] == 0


def test_freeze_embeddings_keeps_the_tables_and_trains_the_layers(tiny_pipeline_dir, tmp_path):
    from safetext.cli import main

    unsafe, safe = tmp_path / "unsafe.txt", tmp_path / "safe.txt"
    for path, prompts in zip((unsafe, safe), UNSAFE_AND_SAFE):
        path.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    argv = ["align", "--model", tiny_pipeline_dir, "--unsafe", unsafe, "--safe", safe, "--out", out]
    settings = ["--freeze-embeddings", "--max-train-steps=3", "--train-batch-size=2", "--learning-rate=1e-3"]
    assert main([str(a) for a in argv + settings + ["--no-progress"]]) == 0
    record = read_record(out)
    assert record["config"]["train_embeddings"] is False
    base = load_file(Path(tiny_pipeline_dir) / "text_encoder" / "model.safetensors")
    aligned = encoder_weights(out)
    tables = [name for name in base if name.endswith(("token_embedding.weight", "position_embedding.weight"))]
    assert len(tables) == 2
    for name in tables:
        assert torch.equal(aligned[name], base[name]), name
    changed = [name for name in base if name not in tables and not torch.equal(aligned[name], base[name])]
    assert any(".layers." in name for name in changed)
    everything = sum(t.numel() for t in base.values())
    frozen = sum(base[name].numel() for name in tables)
    assert record["training"]["trainable_parameters"]["text_encoder"] == everything - frozen
    assert record["metrics"]["train"]["unsafe_cosine"]["after"] < 1.0


# --- NaN --------------------------------------------------------------------------------------------------------


def _pipeline_with_nan_token(tiny_pipeline_dir, destination, token_id):
    shutil.copytree(tiny_pipeline_dir, destination)
    weights_file = destination / "text_encoder" / "model.safetensors"
    weights = load_file(weights_file)
    (embedding,) = [name for name in weights if name.endswith("token_embedding.weight")]
    weights[embedding] = weights[embedding].clone()
    weights[embedding][token_id] = float("nan")
    save_file(weights, weights_file, metadata={"format": "pt"})
    return destination


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_pipeline_dir, tmp_path):
    # A corrupt embedding row of one word: the loss turns NaN at the first step whose batch holds that word.
    zebra = 22548  # "zebra" in the CLIP vocabulary
    model = _pipeline_with_nan_token(tiny_pipeline_dir, tmp_path / "model", zebra)
    unsafe = ["a nude person", "a naked body", "a zebra covered in blood", "a bloody knife"]
    safe = ["a photo of a cat", "a red house", "a dog in a park", "a blue sky"]
    config = AlignmentConfig(
        max_train_steps=4,
        train_batch_size=1,
        heldout_fraction=0.0,
        checkpointing_steps=1,
        checkpoints_total_limit=None,
        learning_rate=1e-3,
        seed=0,  # the zebra prompt comes fourth in this seed's order
    )
    out = tmp_path / "out"
    with pytest.raises(SafeTextError, match="NaN or infinite at step") as error:
        align(model, *sets(unsafe, safe), out, config, show_progress=False)
    step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert step == 4
    last_good = out / "checkpoints" / f"checkpoint-{step - 1}"
    assert str(last_good) in str(error.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"checkpoint-{i}" for i in range(1, step)]
    assert [entry["step"] for entry in read_log(out)] == list(range(1, step))
    weights = load_file(last_good / "model.safetensors")
    for name, tensor in weights.items():
        if name.endswith("token_embedding.weight"):
            assert torch.isnan(tensor[zebra]).all()
            tensor = torch.cat([tensor[:zebra], tensor[zebra + 1 :]])
        assert torch.isfinite(tensor).all(), name
    # nothing was exported from the broken run
    assert not (out / "text_encoder").exists() and not (out / "safetext.json").exists()


def test_infinite_loss_at_the_first_step(tiny_pipeline_dir, tmp_path):
    # lambda * L_e overflows float32: the loss is infinite before any checkpoint exists
    config = AlignmentConfig(max_train_steps=2, effectiveness_weight=1e39)
    with pytest.raises(SafeTextError, match="at step 1; stopped, no checkpoint had been written yet"):
        align(tiny_pipeline_dir, *sets(*UNSAFE_AND_SAFE), tmp_path / "out", config, show_progress=False)


# --- bare encoder -----------------------------------------------------------------------------------------------


def test_bare_encoder_is_aligned_on_embeddings_only(tiny_bert_dir, tmp_path):
    unsafe = ["a nude woman on a bed", "a naked man on the beach", "blood and gore", "a bloody knife", "violence"]
    long_prompt = " ".join(["a red house beside a river"] * 15)
    safe = ["a photo of a cat", "a red house", "a dog in a park", "a blue sky", "violence", long_prompt]
    config = AlignmentConfig(max_train_steps=3, train_batch_size=2, learning_rate=2e-3, heldout_fraction=0.2)
    result = align(tiny_bert_dir, *sets(unsafe, safe), tmp_path / "out", config, show_progress=False)
    record = read_record(tmp_path / "out")
    assert record == json.loads(json.dumps(result.record))
    assert record["model"]["pipeline_involved"] is False
    assert record["model"]["kind"] == "bare_text_encoder" and record["model"]["family"] is None
    assert record["data"]["safe_prompts_removed_as_unsafe"] == {"safe": 1}
    assert record["data"]["truncated_prompts"] == 1
    assert record["metrics"]["train"]["unsafe_cosine"]["after"] < 1.0
    assert "No diffusion pipeline was involved" in (tmp_path / "out" / "README.md").read_text()
    encoder = BertModel.from_pretrained(tmp_path / "out", subfolder="text_encoder")
    assert isinstance(encoder, BertModel)


def test_bare_encoder_with_export_pipeline_is_refused_before_training(tiny_bert_dir, tmp_path):
    with pytest.raises(SafeTextError, match="--export-pipeline needs a diffusers pipeline"):
        align(
            tiny_bert_dir,
            *sets(*UNSAFE_AND_SAFE),
            tmp_path / "out",
            AlignmentConfig(max_train_steps=1),
            export_pipeline=True,
            show_progress=False,
        )
    assert not (tmp_path / "out").exists()


# --- two processes with Accelerate ------------------------------------------------------------------------------


def test_two_cpu_processes_match_one_process_with_the_global_batch(tiny_pipeline_dir, prompt_lists, tmp_path, run_cli):
    unsafe_file, safe_file = tmp_path / "unsafe.txt", tmp_path / "safe.txt"
    unsafe_file.write_text("\n".join(prompt_lists[0]) + "\n")
    safe_file.write_text("\n".join(prompt_lists[1]) + "\n")
    settings = {"max_train_steps": 3, "learning_rate": 1e-3, "heldout_fraction": 0.25, "checkpointing_steps": 2}

    # the README's command: the real CLI as a module under accelerate launch
    run_cli(
        [
            "align",
            f"--model={tiny_pipeline_dir}",
            f"--unsafe={unsafe_file}",
            f"--safe={safe_file}",
            f"--out={tmp_path / 'two'}",
            f"--max-train-steps={settings['max_train_steps']}",
            f"--learning-rate={settings['learning_rate']}",
            f"--heldout-fraction={settings['heldout_fraction']}",
            f"--checkpointing-steps={settings['checkpointing_steps']}",
            "--train-batch-size=2",
            "--no-progress",
        ],
        processes=2,
    )

    # Each process takes its half of every global batch of 2 x 2 prompts, so one process with batches of 4 sees
    # the same data, and DDP's averaged gradient is the gradient of the mean over the global batch.
    one = AlignmentConfig(train_batch_size=4, **settings)
    align(
        tiny_pipeline_dir,
        {"unsafe": read_prompts(unsafe_file)},
        {"safe": read_prompts(safe_file)},
        tmp_path / "one",
        one,
        show_progress=False,
    )
    two_record, one_record = read_record(tmp_path / "two"), read_record(tmp_path / "one")
    assert two_record["training"]["num_processes"] == 2 and one_record["training"]["num_processes"] == 1
    assert two_record["training"]["steps_per_epoch"] == one_record["training"]["steps_per_epoch"]
    assert [entry["step"] for entry in read_log(tmp_path / "two")] == [1, 2, 3]
    for a, b in zip(read_log(tmp_path / "two"), read_log(tmp_path / "one")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)

    base = load_file(tiny_pipeline_dir / "text_encoder" / "model.safetensors")
    two, one = encoder_weights(tmp_path / "two"), encoder_weights(tmp_path / "one")
    moved = max((one[name] - base[name]).abs().max().item() for name in base)
    assert moved > 1e-3
    # Not bit-identical: the all-reduce sums the two half-batch gradients in another order than one batched
    # backward does, and Adam divides by sqrt(v), which magnifies last-bit differences of small gradient
    # components. Measured: at most about 2e-5, against a movement of about 2e-3.
    for name in base:
        assert torch.allclose(two[name], one[name], atol=1e-4, rtol=0), name


def test_init_noise_is_seeded_and_relative_to_each_tensor():
    from safetext.alignment import _add_init_noise

    def module():
        layer = torch.nn.Linear(64, 64)
        torch.nn.init.constant_(layer.weight, 2.0)
        torch.nn.init.zeros_(layer.bias)  # all zero, as LoRA's B starts
        return layer

    a, b, c = module(), module(), module()
    _add_init_noise(a, 1e-3, seed=0)
    _add_init_noise(b, 1e-3, seed=0)
    _add_init_noise(c, 1e-3, seed=1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    # 1e-3 of the weight's RMS (2.0); the zero bias gets 1e-3 itself
    assert float((a.weight.detach() - 2.0).std()) == pytest.approx(2e-3, rel=0.05)
    assert float(a.bias.detach().std()) == pytest.approx(1e-3, rel=0.3)
