"""`safetext miniworld build` through the command line: a quick build opens as an SD pipeline."""

from diffusers import StableDiffusionPipeline

from safetext.cli import main


def test_quick_build_through_the_cli(tmp_path, capsys):
    assert main(["miniworld", "build", "--quick", "--out", str(tmp_path / "mw")]) == 0
    assert "MiniWorld pipeline written to" in capsys.readouterr().out
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "mw")
    assert pipeline.text_encoder.config.vocab_size == 49408


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
