"""The command line, called in-process: the align contract, and one line on stderr with exit code 2 for bad input."""

import hashlib
import json
import shutil

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from safetext.cli import main

UNSAFE = ["a nude person on a bed", "a naked body", "blood and gore", "a bloody knife", "a violent fight"]
SAFE = ["a photo of a cat", "a red house", "a dog in a park", "a blue sky", "a bowl of fruit"]


def run(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def prompt_files(tmp_path):
    unsafe, safe = tmp_path / "unsafe.txt", tmp_path / "safe.txt"
    unsafe.write_text("\n".join(UNSAFE) + "\n")
    safe.write_text("\n".join(SAFE) + "\n")
    return unsafe, safe


def align_args(model, unsafe, safe, out, *extra):
    return ["align", "--model", model, "--unsafe", unsafe, "--safe", safe, "--out", out, "--no-progress", *extra]


FAST = ["--max-train-steps", "2", "--train-batch-size", "2", "--heldout-fraction", "0.25"]


def test_align_writes_the_folder_and_prints_the_summary(capsys, tiny_pipeline_dir, prompt_files, tmp_path):
    unsafe, safe = prompt_files
    more = tmp_path / "more" / "unsafe.txt"  # same file name: the set is named unsafe-2
    more.parent.mkdir()
    more.write_text("a gory scene\na corpse in a river\n")
    out = tmp_path / "out"
    args = align_args(tiny_pipeline_dir, unsafe, safe, out, *FAST)
    args += [
        "--unsafe",
        more,
        "--learning-rate",
        "2e-3",
        "--effectiveness-weight",
        "0.5",
        "--effectiveness-positions",
        "prompt",
    ]
    args += ["--seed", "3", "--checkpointing-steps", "1", "--utility-distance", "squared_l2"]
    code, stdout, stderr = run(capsys, args)
    assert code == 0, stderr
    assert stderr == ""
    assert stdout.startswith(f"aligned encoder written to {out}; held-out unsafe cosine ")
    assert "; held-out safe drift " in stdout and stdout.count("\n") == 1

    record = json.loads((out / "safetext.json").read_text())
    config = record["config"]
    assert (config["learning_rate"], config["effectiveness_weight"], config["effectiveness_positions"]) == (
        2e-3,
        0.5,
        "prompt",
    )
    assert (config["seed"], config["max_train_steps"], config["train_batch_size"]) == (3, 2, 2)
    assert config["utility_distance"] == "squared_l2" and config["checkpointing_steps"] == 1
    held = record["metrics"]["heldout"]
    assert f"held-out unsafe cosine {held['unsafe_cosine']['after']:.3f}" in stdout
    assert set(record["data"]["unsafe"]) == {"unsafe", "unsafe-2"}
    assert set(record["data"]["safe"]) == {"safe"}
    source = record["data"]["unsafe"]["unsafe"]
    assert source["path"] == str(unsafe) and source["sha256"] == hashlib.sha256(unsafe.read_bytes()).hexdigest()
    assert (out / "text_encoder" / "model.safetensors").is_file() and (out / "tokenizer").is_dir()

    # the same command again is refused; with --resume and more steps it continues the run
    code, _, stderr = run(capsys, args)
    assert code == 2 and "already holds this run; pass --resume" in stderr
    code, stdout, stderr = run(capsys, [*args, "--resume", "--max-train-steps", "3"])
    assert code == 0, stderr
    record = json.loads((out / "safetext.json").read_text())
    assert record["training"]["resumed_from_step"] == 2 and record["training"]["steps"] == 3


def test_export_pipeline_flag(capsys, tiny_pipeline_dir, prompt_files, tmp_path):
    code, _, stderr = run(
        capsys, align_args(tiny_pipeline_dir, *prompt_files, tmp_path / "out", *FAST, "--export-pipeline")
    )
    assert code == 0, stderr
    assert (tmp_path / "out" / "pipeline" / "model_index.json").is_file()


def assert_one_line_error(code, stdout, stderr, *fragments):
    assert code == 2
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith(("safetext: error: ", "error: safetext align: "))
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_prompt_file(capsys, tiny_pipeline_dir, prompt_files, tmp_path):
    missing = tmp_path / "nowhere.txt"
    result = run(capsys, align_args(tiny_pipeline_dir, missing, prompt_files[1], tmp_path / "out", *FAST))
    assert_one_line_error(*result, str(missing), "no such prompt file")
    assert not (tmp_path / "out").exists()


def test_csv_without_prompt_column(capsys, tiny_pipeline_dir, prompt_files, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,categories\na nude person,sexual\n")
    result = run(capsys, align_args(tiny_pipeline_dir, bad, prompt_files[1], tmp_path / "out", *FAST))
    assert_one_line_error(*result, str(bad), "no 'prompt' column")


def test_undecodable_prompt_file(capsys, tiny_pipeline_dir, prompt_files, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("une photo de café\n".encode("latin-1"))
    result = run(capsys, align_args(tiny_pipeline_dir, prompt_files[0], bad, tmp_path / "out", *FAST))
    assert_one_line_error(*result, str(bad), "not UTF-8")


def test_category_without_matches_and_bad_max_prompts(capsys, tiny_pipeline_dir, tmp_path):
    i2p = tmp_path / "i2p.csv"
    i2p.write_text('prompt,categories\n"a nude person","sexual"\n')
    safe = tmp_path / "safe.csv"
    safe.write_text("prompt\na cat\na dog\n")
    result = run(capsys, align_args(tiny_pipeline_dir, i2p, safe, tmp_path / "out", "--unsafe-category", "violence"))
    assert_one_line_error(*result, "no prompts in category 'violence'")
    result = run(capsys, align_args(tiny_pipeline_dir, i2p, safe, tmp_path / "out", "--max-prompts", "0"))
    assert_one_line_error(*result, "max_prompts=0")


@pytest.mark.parametrize("missing", ["text_encoder", "tokenizer", "model_index.json"])
def test_model_folder_without_its_parts(capsys, tiny_pipeline_dir, prompt_files, tmp_path, missing):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model, ignore=shutil.ignore_patterns("unet", "vae"))
    for part in ("text_encoder", "tokenizer", "model_index.json") if missing == "model_index.json" else (missing,):
        path = model / part
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = run(capsys, align_args(model, *prompt_files, tmp_path / "out", *FAST))
    expected = {"text_encoder": "without a text_encoder/", "tokenizer": "without a tokenizer/"}.get(
        missing, "not a model folder"
    )
    assert_one_line_error(*result, str(model), expected)


def test_model_path_that_does_not_exist(capsys, prompt_files, tmp_path):
    result = run(capsys, align_args(tmp_path / "no" / "model", *prompt_files, tmp_path / "out", *FAST))
    assert_one_line_error(*result, "no such model folder")


def test_pickled_weights_only(capsys, tiny_pipeline_dir, prompt_files, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model, ignore=shutil.ignore_patterns("unet", "vae"))
    weights = model / "text_encoder" / "model.safetensors"
    state = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").state_dict()
    torch.save(state, model / "text_encoder" / "pytorch_model.bin")  # the legacy pickle layout
    weights.unlink()
    result = run(capsys, align_args(model, *prompt_files, tmp_path / "out", *FAST))
    assert_one_line_error(*result, "only pickled weights (pytorch_model.bin)", "safetensors")


def test_tokenizer_larger_than_the_encoders_vocabulary(capsys, tiny_pipeline_dir, prompt_files, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model, ignore=shutil.ignore_patterns("unet", "vae"))
    shutil.rmtree(model / "text_encoder")
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(model / "text_encoder", safe_serialization=True)
    result = run(capsys, align_args(model, *prompt_files, tmp_path / "out", *FAST))
    assert_one_line_error(*result, "49408 tokens", "only 1000")


def test_output_folder_holding_a_different_run(capsys, tiny_pipeline_dir, prompt_files, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = run(capsys, align_args(tiny_pipeline_dir, *prompt_files, out, *FAST))
    assert code == 0, stderr
    result = run(capsys, align_args(tiny_pipeline_dir, *prompt_files, out, *FAST, "--learning-rate", "3e-5"))
    assert_one_line_error(*result, str(out), "holds a different run", "--overwrite")
    code, _, stderr = run(
        capsys, align_args(tiny_pipeline_dir, *prompt_files, out, *FAST, "--learning-rate", "3e-5", "--overwrite")
    )
    assert code == 0, stderr


def test_output_folder_holding_other_files(capsys, tiny_pipeline_dir, prompt_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    result = run(capsys, align_args(tiny_pipeline_dir, *prompt_files, out, *FAST, "--overwrite"))
    assert_one_line_error(*result, "holds no safetext run")
    assert (out / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--utility-positions", "middle"], ["--utility-positions", "'middle'", "all", "no_bos", "prompt"]),
        (["--utility-distance", "l1"], ["--utility-distance", "'l1'"]),
        (["--learning-rate", "0"], ["learning_rate=0.0", "(0.0, 1.0]"]),
        (["--learning-rate", "-0.001"], ["learning_rate=-0.001", "(0.0, 1.0]"]),
        # argparse reads a bare -1e-3 as an option, so the value is attached
        (["--learning-rate=-1e-3"], ["learning_rate=-0.001", "(0.0, 1.0]"]),
        (["--learning-rate", "fast"], ["--learning-rate", "'fast'"]),
        (["--train-batch-size", "0"], ["train_batch_size=0"]),
        (["--heldout-fraction", "1"], ["heldout_fraction=1.0"]),
        (["--epochs", "0"], ["num_train_epochs=0"]),
        (["--checkpointing-steps", "-2"], ["checkpointing_steps=-2"]),
        (["--adversarial-epsilon=-0.1"], ["adversarial_epsilon=-0.1"]),
        # a layer the encoder lacks is known only once it loads, still before the output folder is made
        (["--adversarial-epsilon", "0.1", "--adversarial-layer", "9"], ["adversarial_layer=9", "text_encoder has"]),
    ],
)
def test_bad_flag_values(capsys, tiny_pipeline_dir, prompt_files, tmp_path, flags, fragments):
    result = run(capsys, align_args(tiny_pipeline_dir, *prompt_files, tmp_path / "out", *flags))
    assert_one_line_error(*result, *fragments)
    assert not (tmp_path / "out").exists()


def test_missing_required_flag(capsys):
    code, stdout, stderr = run(capsys, ["align", "--model", "x"])
    assert code == 2 and stdout == "" and len(stderr.splitlines()) == 1
    assert "required" in stderr


def test_help_exits_cleanly(capsys):
    code, stdout, _ = run(capsys, ["align", "--help"])
    assert code == 0 and "--unsafe-category" in stdout


def test_tiny_model_command(capsys, tmp_path):
    code, stdout, stderr = run(capsys, ["tiny-model", "--out", tmp_path / "tiny"])
    assert code == 0, stderr
    assert stdout == f"tiny sd pipeline written to {tmp_path / 'tiny'}\n"
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    code, stdout, stderr = run(capsys, ["tiny-model", "--out", tmp_path / "tiny"])
    assert_one_line_error(code, stdout, stderr, "not empty")


def test_align_on_real_prompt_sets(capsys, tiny_pipeline_dir, prompts_dir, tmp_path):
    i2p, coco = prompts_dir / "i2p.csv", prompts_dir / "coco_30k.csv"
    out = tmp_path / "out"
    args = align_args(tiny_pipeline_dir, i2p, coco, out, "--unsafe-category", "sexual", "--max-prompts", "40")
    code, stdout, stderr = run(capsys, [*args, "--max-train-steps", "2", "--train-batch-size", "4"])
    assert code == 0, stderr
    assert stdout.startswith(f"aligned encoder written to {out}")
    record = json.loads((out / "safetext.json").read_text())
    unsafe = record["data"]["unsafe"]["i2p"]
    assert unsafe["category"] == "sexual" and unsafe["prompts"] == 40 and unsafe["max_prompts"] == 40
    assert unsafe["sha256"] == hashlib.sha256(i2p.read_bytes()).hexdigest()
    assert unsafe["train"] + unsafe["heldout"] == 40 and unsafe["heldout"] == 4
    safe = record["data"]["safe"]["coco_30k"]
    assert safe["train"] + safe["heldout"] == 40
    assert record["metrics"]["heldout"]["unsafe_cosine"]["after"] < 1.0
