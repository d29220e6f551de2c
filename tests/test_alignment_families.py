"""`safetext align` on SDXL, SD3 and FLUX: every text encoder, sequence and pooled vector, through the CLI end to end.

Each family's tiny pipeline is aligned once through `safetext.cli.main` with `--export-pipeline`; the tests read the
folder it wrote and check it against the pipeline's own `encode_prompt`, reopen it in the matching diffusers class and
draw a 2-step 64 x 64 image with the aligned encoders.
"""

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from safetext.cli import main
from safetext.families import FAMILIES
from safetext.generation import load_pipeline
from safetext.prompts import PromptSet, split_heldout
from safetext.tiny_models import create_tiny_pipeline
from test_alignment import generate

# More safe prompts than unsafe ones: the pooled vector of a tiny random CLIP is one end-of-text feature, and held-out
# safe prompts stay near theirs only when the utility term has seen enough different safe prompts.
MORE_SAFE_PROMPTS = [
    "a sailing boat on a lake",
    "a cup of coffee on a desk",
    "a child reading a book",
    "a field of sunflowers",
    "a bridge over a canal",
    "a horse in a meadow",
    "a lighthouse by the sea",
    "a plate of pasta",
]
HELDOUT_FRACTION = 0.25
# Measured on these pipelines: 30 steps with 12 safe prompts a step move the held-out unsafe prompts' pooled vectors to
# a cosine of about 0.90-0.95 while held-out safe ones drift about half as far as the unsafe ones move. FLUX's CLIP
# (its pooler output, T5 frozen) barely moves at 3e-4 (cosine 0.99) and overshoots from 7e-4 on (0.30), so it runs
# at 5e-4 (cosine 0.95).
SETTINGS = [
    "--max-train-steps=30",
    "--learning-rate=3e-4",
    "--train-batch-size=6",
    "--safe-batch-size=12",
    f"--heldout-fraction={HELDOUT_FRACTION}",
    "--checkpointing-steps=0",
]
PIPELINE_CLASSES = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
# run name -> (family, extra flags, encoders expected to train)
RUNS = {
    "sdxl": ("sdxl", [], ["text_encoder", "text_encoder_2"]),
    "sd3": ("sd3", [], ["text_encoder", "text_encoder_2"]),
    "flux": ("flux", ["--learning-rate=4e-4"], ["text_encoder"]),
}


@dataclass
class FamilyRun:
    name: str
    family: str
    base: Path
    output_dir: Path
    trained: list[str]
    stdout: str

    @property
    def record(self) -> dict:
        return json.loads((self.output_dir / "safetext.json").read_text())


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory) -> dict[str, Path]:
    return {
        family: create_tiny_pipeline(tmp_path_factory.mktemp(f"tiny-{family}"), family=family, seed=0)
        for family in PIPELINE_CLASSES
    }


@dataclass
class Prompts:
    unsafe: list[str]
    safe: list[str]
    unsafe_file: Path
    safe_file: Path


@pytest.fixture(scope="module")
def prompts(prompt_lists, tmp_path_factory) -> Prompts:
    directory = tmp_path_factory.mktemp("prompts")
    unsafe, safe = prompt_lists[0], prompt_lists[1] + MORE_SAFE_PROMPTS
    (directory / "unsafe.txt").write_text("\n".join(unsafe) + "\n")
    (directory / "safe.txt").write_text("\n".join(safe) + "\n")
    return Prompts(unsafe, safe, directory / "unsafe.txt", directory / "safe.txt")


@pytest.fixture(scope="module", params=list(RUNS))
def family_run(request, tiny_pipelines, prompts, tmp_path_factory) -> FamilyRun:
    family, extra, trained = RUNS[request.param]
    out = tmp_path_factory.mktemp(f"aligned-{request.param}") / "out"
    argv = ["align", "--model", tiny_pipelines[family], "--unsafe", prompts.unsafe_file, "--safe", prompts.safe_file]
    argv += ["--out", out, *SETTINGS, *extra, "--export-pipeline", "--no-progress"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    assert code == 0, stderr.getvalue()
    return FamilyRun(request.param, family, tiny_pipelines[family], out, trained, stdout.getvalue())


def heldout(prompts: list[str]) -> list[str]:
    return split_heldout(PromptSet(list(prompts)), HELDOUT_FRACTION, seed=0)[1].prompts


def encode_prompt(pipeline, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own conditioning of positive prompts: (sequence, pooled)."""
    with torch.no_grad():
        if isinstance(pipeline, StableDiffusionXLPipeline):
            sequence, _, pooled, _ = pipeline.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        elif isinstance(pipeline, StableDiffusion3Pipeline):
            sequence, _, pooled, _ = pipeline.encode_prompt(
                prompts, None, None, device="cpu", do_classifier_free_guidance=False
            )
        else:
            sequence, pooled, _ = pipeline.encode_prompt(prompts, device="cpu")
    return sequence, pooled


def relative_moves(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """Mean cosine and mean relative distance between rows, each flattened."""
    x, y = after.flatten(1), before.flatten(1)
    cosine = torch.nn.functional.cosine_similarity(x, y, dim=1).mean().item()
    drift = ((x - y).norm(dim=1) / y.norm(dim=1)).mean().item()
    return cosine, drift


def test_record_names_the_family_and_the_trained_encoders(family_run):
    record = family_run.record
    assert record["model"]["family"] == family_run.family and record["model"]["kind"] == "pipeline"
    assert record["training"]["trained_encoders"] == family_run.trained
    family = FAMILIES[family_run.family]
    frozen = [name for name in family.text_encoder_names if name not in family_run.trained]
    assert record["training"]["frozen_encoders"] == frozen
    # the folder holds each trained encoder under its component name and every tokenizer, but no frozen encoder
    out = family_run.output_dir
    for name in family.text_encoder_names:
        assert (out / name / "model.safetensors").is_file() == (name in family_run.trained), name
    for name in family.tokenizer_names:
        assert (out / name).is_dir(), name
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    # every step's log line holds both tensors' terms, and the totals are their weighted sums
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 30
    weight = record["config"]["pooled_weight"]
    for entry in log:
        expected = entry["effectiveness_loss_sequence"] + weight * entry["effectiveness_loss_pooled"]
        assert entry["effectiveness_loss"] == pytest.approx(expected, abs=1e-5)
    assert "pooled: unsafe cosine" in family_run.stdout
    # the model card shows how to load each trained encoder into the family's pipeline class
    card = (out / "README.md").read_text()
    assert f"from diffusers import {family.pipeline_class}" in card
    for name in family_run.trained:
        assert f'subfolder="{name}")' in card and f"{name}={name}" in card
    assert "pooled vector" in card


def test_unsafe_prompts_move_and_safe_prompts_stay(family_run, prompts):
    # Measured with the pipelines' own encode_prompt, independently of the metrics the run recorded.
    base = DiffusionPipeline.from_pretrained(family_run.base)
    aligned = DiffusionPipeline.from_pretrained(family_run.output_dir / "pipeline")
    moves = {}
    for side, texts in (("unsafe", prompts.unsafe), ("safe", prompts.safe)):
        before, after = encode_prompt(base, heldout(texts)), encode_prompt(aligned, heldout(texts))
        moves[side] = {"sequence": relative_moves(before[0], after[0]), "pooled": relative_moves(before[1], after[1])}
    record = family_run.record["metrics"]["heldout"]
    pooled_cosine, pooled_unsafe_drift = moves["unsafe"]["pooled"]
    assert record["pooled"]["unsafe_cosine"]["before"] == pytest.approx(1.0, abs=1e-5)
    assert record["pooled"]["unsafe_cosine"]["after"] == pytest.approx(pooled_cosine, abs=1e-4)
    assert record["pooled"]["safe_relative_drift"]["after"] == pytest.approx(moves["safe"]["pooled"][1], abs=1e-4)
    assert pooled_cosine < 0.96
    assert moves["safe"]["pooled"][1] < 0.7 * pooled_unsafe_drift

    sequence_cosine, sequence_unsafe_drift = moves["unsafe"]["sequence"]
    if family_run.family == "flux":
        # T5 gives FLUX's whole sequence; frozen, it does not move for any prompt
        assert sequence_cosine == pytest.approx(1.0, abs=1e-6) and moves["safe"]["sequence"][1] == 0.0
        assert record["unsafe_cosine"]["after"] == pytest.approx(1.0, abs=1e-6)
    else:
        assert record["full_tensor"]["unsafe_cosine"]["after"] == pytest.approx(sequence_cosine, abs=1e-4)
        assert sequence_cosine < 1.0 - 1e-3
        assert moves["safe"]["sequence"][1] < 0.7 * sequence_unsafe_drift


def test_exported_pipeline_opens_in_its_class_and_draws(family_run):
    pipeline = DiffusionPipeline.from_pretrained(family_run.output_dir / "pipeline")
    assert type(pipeline) is PIPELINE_CLASSES[family_run.family]
    for name in family_run.trained:
        aligned = load_file(family_run.output_dir / name / "model.safetensors")
        state = getattr(pipeline, name).state_dict()
        assert all(torch.equal(state[key], aligned[key]) for key in aligned), name
        base = load_file(family_run.base / name / "model.safetensors")
        assert any(not torch.equal(base[key], aligned[key]) for key in aligned), name
    images = generate(pipeline)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_aligned_folder_opens_with_every_aligned_encoder_swapped_in(family_run, tmp_path):
    # without pipeline/, generation opens the base pipeline and swaps in the aligned encoders and tokenizers
    folder = tmp_path / "aligned"
    shutil.copytree(family_run.output_dir, folder, ignore=shutil.ignore_patterns("pipeline", "checkpoints"))
    record = json.loads((folder / "safetext.json").read_text())
    record.pop("pipeline_dir", None)
    (folder / "safetext.json").write_text(json.dumps(record))
    pipeline = load_pipeline(folder, device="cpu")
    assert type(pipeline) is PIPELINE_CLASSES[family_run.family]
    for name in family_run.trained:
        aligned = load_file(folder / name / "model.safetensors")
        state = getattr(pipeline, name).state_dict()
        assert all(torch.equal(state[key], aligned[key]) for key in aligned), name
    images = generate(pipeline)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_generate_draws_with_an_aligned_folder(family_run, prompts, capsys, tmp_path):
    folder = tmp_path / "aligned"
    shutil.copytree(family_run.output_dir, folder, ignore=shutil.ignore_patterns("pipeline", "checkpoints"))
    out = tmp_path / "images"
    argv = ["generate", "--model", folder, "--prompts", prompts.unsafe_file, "--max-prompts", "1", "--out", out]
    argv += ["--num-inference-steps", "2", "--height", "64", "--width", "64", "--no-progress"]
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    settings = json.loads((out / "generation.json").read_text())
    # every aligned encoder's weights identify the images
    assert settings["text_encoder_sha256"] is not None
    assert [p.name for p in out.glob("*.png")] == ["0_0.png"]


# --- refusals: one line on stderr, exit code 2 ------------------------------------------------------------------


def run_align(capsys, model, prompts, out, *extra):
    argv = ["align", "--model", model, "--unsafe", prompts.unsafe_file, "--safe", prompts.safe_file, "--out", out]
    argv += ["--no-progress", *extra]
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_unknown_train_encoders_name_is_one_line(capsys, tiny_pipelines, prompts, tmp_path):
    code, err = run_align(
        capsys, tiny_pipelines["sdxl"], prompts, tmp_path / "out", "--train-encoders", "text_encoder,text_encoder_3"
    )
    assert code == 2 and err.count("\n") == 1
    assert "text_encoder_3 is not a text encoder of the sdxl family" in err and "text_encoder, text_encoder_2" in err
    assert not (tmp_path / "out").exists()


def test_unsupported_pipeline_class_is_one_line(capsys, tiny_pipelines, prompts, tmp_path):
    model = tmp_path / "kandinsky"
    shutil.copytree(tiny_pipelines["sdxl"], model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    code, err = run_align(capsys, model, prompts, tmp_path / "out", "--max-train-steps=1")
    assert code == 2 and err.count("\n") == 1
    assert "unsupported pipeline class 'KandinskyV22Pipeline'" in err and "StableDiffusionXLPipeline (sdxl)" in err

    # a variant of a supported class is aligned when its family is named
    code, err = run_align(
        capsys,
        model,
        prompts,
        tmp_path / "forced",
        "--family",
        "sdxl",
        "--max-train-steps=1",
        "--checkpointing-steps=0",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "forced" / "safetext.json").read_text())["model"]["family"] == "sdxl"

    code, err = run_align(capsys, model, prompts, tmp_path / "unknown", "--family", "sd4")
    assert code == 2 and err.count("\n") == 1 and "unknown pipeline family 'sd4'" in err


def test_t5_trains_when_named(capsys, tiny_pipelines, prompts, tmp_path):
    out = tmp_path / "out"
    code, err = run_align(
        capsys,
        tiny_pipelines["flux"],
        prompts,
        out,
        "--train-encoders",
        "text_encoder, text_encoder_2",
        "--max-train-steps=3",
        "--learning-rate=5e-4",
        "--checkpointing-steps=0",
    )
    assert code == 0, err
    record = json.loads((out / "safetext.json").read_text())
    assert record["config"]["train_encoders"] == ["text_encoder", "text_encoder_2"]
    assert record["training"]["trained_encoders"] == ["text_encoder", "text_encoder_2"]
    assert record["training"]["frozen_encoders"] == []
    base = load_file(tiny_pipelines["flux"] / "text_encoder_2" / "model.safetensors")
    aligned = load_file(out / "text_encoder_2" / "model.safetensors")
    assert any(not torch.equal(base[key], aligned[key]) for key in base)
    # FLUX's sequence is T5's: it moves only when T5 trains
    assert record["metrics"]["train"]["full_tensor"]["safe_relative_drift"]["after"] > 0.0


def test_resumed_sdxl_run_equals_an_uninterrupted_one(tiny_pipelines, prompts, tmp_path):
    # checkpoints hold both trained encoders (under their component names) and the optimizer over both
    from safetext.alignment import align
    from safetext.config import AlignmentConfig

    settings = {"train_batch_size": 3, "learning_rate": 1e-3, "heldout_fraction": 0.25, "checkpointing_steps": 2}
    unsafe, safe = {"unsafe": PromptSet(prompts.unsafe)}, {"safe": PromptSet(prompts.safe)}
    model = tiny_pipelines["sdxl"]
    align(model, unsafe, safe, tmp_path / "full", AlignmentConfig(max_train_steps=4, **settings), show_progress=False)
    align(
        model, unsafe, safe, tmp_path / "resumed", AlignmentConfig(max_train_steps=2, **settings), show_progress=False
    )
    checkpoint = load_file(tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert {key.split(".")[0] for key in checkpoint} == {"text_encoder", "text_encoder_2"}
    result = align(
        model,
        unsafe,
        safe,
        tmp_path / "resumed",
        AlignmentConfig(max_train_steps=4, **settings),
        resume=True,
        show_progress=False,
    )
    assert result.record["training"]["resumed_from_step"] == 2
    for name in ("text_encoder", "text_encoder_2"):
        full = load_file(tmp_path / "full" / name / "model.safetensors")
        resumed = load_file(tmp_path / "resumed" / name / "model.safetensors")
        assert all(torch.equal(full[key], resumed[key]) for key in full), name


def test_two_cpu_processes_align_sdxl_like_one(tiny_pipelines, prompts, tmp_path, run_cli):
    # SDXL's CLIP-L gives its penultimate state, so its last layer gets no gradient: distributed training must be
    # told that some parameters go unused, or the second step fails.
    common = ["--max-train-steps=2", "--learning-rate=1e-3", "--heldout-fraction=0.25", "--no-progress"]
    model, unsafe, safe = tiny_pipelines["sdxl"], prompts.unsafe_file, prompts.safe_file
    run_cli(
        ["align", f"--model={model}", f"--unsafe={unsafe}", f"--safe={safe}", f"--out={tmp_path / 'two'}"]
        + ["--train-batch-size=2", *common],
        processes=2,
    )
    run_cli(
        ["align", f"--model={model}", f"--unsafe={unsafe}", f"--safe={safe}", f"--out={tmp_path / 'one'}"]
        + ["--train-batch-size=4", *common]
    )
    logs = {
        name: [json.loads(line) for line in (tmp_path / name / "logs" / "train_log.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    }
    assert [entry["step"] for entry in logs["two"]] == [1, 2]
    for a, b in zip(logs["two"], logs["one"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    for name in ("text_encoder", "text_encoder_2"):
        two = load_file(tmp_path / "two" / name / "model.safetensors")
        one = load_file(tmp_path / "one" / name / "model.safetensors")
        assert all(torch.allclose(two[key], one[key], atol=1e-4, rtol=0) for key in one), name
