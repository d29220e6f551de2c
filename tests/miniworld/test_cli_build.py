"""`safetext miniworld build` through the command line: a quick build opens as an SD pipeline."""

import json

from diffusers import StableDiffusionPipeline

from safetext.cli import main


def test_quick_build_through_the_cli(tmp_path, capsys):
    assert main(["miniworld", "build", "--quick", "--out", str(tmp_path / "mw")]) == 0
    assert "MiniWorld pipeline written to" in capsys.readouterr().out
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "mw")
    assert pipeline.text_encoder.config.vocab_size == 49408


def test_keep_bf16_trains_under_bf16_whatever_the_device(tmp_path):
    assert main(["miniworld", "build", "--quick", "--keep-bf16", "--out", str(tmp_path / "mw")]) == 0
    record = json.loads((tmp_path / "mw" / "build.json").read_text())
    assert record["config"]["float32_without_native_bf16"] is False and record["precision_fallback"] == []
    assert {record["stages"][name]["config"]["mixed_precision"] for name in ("clip", "autoencoder", "unet")} == {
        "bf16"
    }


def test_non_empty_output_folder_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "mw").mkdir()
    (tmp_path / "mw" / "notes.txt").write_text("mine")
    assert main(["miniworld", "build", "--quick", "--out", str(tmp_path / "mw")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err
    assert (tmp_path / "mw" / "notes.txt").read_text() == "mine"


def test_bad_device_is_refused_in_one_line(tmp_path, capsys):
    assert main(["miniworld", "build", "--quick", "--device", "tpu9", "--out", str(tmp_path / "mw")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
