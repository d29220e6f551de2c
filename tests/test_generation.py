"""Generation: seeded per image, so batch size, interruption and resumption never change an image."""

import json

import pytest

from safetext.errors import SafeTextError
from safetext.generation import GenerationConfig, generate, plan_images
from safetext.prompts import PromptSet
from safetext.tiny_models import create_tiny_pipeline

PROMPTS = PromptSet(
    ["a photo of a cat", "a red car on a street", "a bowl of fruit"],
    [{"case_number": 7}, {"case_number": 8, "evaluation_seed": 1234}, {"case_number": 9, "evaluation_guidance": 3.0}],
)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return create_tiny_pipeline(tmp_path_factory.mktemp("gen") / "tiny-sd")


def _config(**overrides):
    values = {"images_per_prompt": 2, "num_inference_steps": 2, "batch_size": 4, "seed": 5}
    values.update(overrides)
    return GenerationConfig(**values)


def test_plan_seeds_and_guidance():
    jobs = plan_images(PROMPTS, _config())
    assert [j.filename for j in jobs] == ["7_0.png", "7_1.png", "8_0.png", "8_1.png", "9_0.png", "9_1.png"]
    # evaluation_seed wins; otherwise disjoint ranges from the base seed, so no two images share noise
    assert [j.seed for j in jobs] == [5, 6, 1234, 1235, 9, 10]
    assert [j.guidance_scale for j in jobs] == [7.5, 7.5, 7.5, 7.5, 3.0, 3.0]


def test_colliding_case_numbers_refused():
    prompts = PromptSet(["a", "b"], [{"case_number": 1}, {"case_number": 1}])
    with pytest.raises(SafeTextError, match="case_number"):
        plan_images(prompts, _config())


@pytest.mark.parametrize("bad", [{"images_per_prompt": 0}, {"guidance_scale": -1.0}, {"height": 30}])
def test_bad_settings(bad):
    with pytest.raises(ValueError):
        _config(**bad)


def test_resume_gives_byte_identical_images(tiny_sd, tmp_path):
    out = tmp_path / "out"
    record = generate(tiny_sd, PROMPTS, out, _config(batch_size=4), show_progress=False)
    assert record["images"] == 6 and record["cost"]["images_drawn_now"] == 6
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["file"] for m in manifest] == [j.filename for j in plan_images(PROMPTS, _config())]
    original = {p.name: p.read_bytes() for p in out.glob("*.png")}

    # An interrupted run: the second batch never finished and left a temporary file; one image of the first batch
    # is gone too. The rerun redraws exactly those, in the same batches, and skips the rest.
    for name in ("9_0.png", "9_1.png", "7_1.png"):
        (out / name).unlink()
    (out / "9_0.png.tmp").write_bytes(b"half an image")
    kept = (out / "7_0.png").stat().st_mtime_ns
    record = generate(tiny_sd, PROMPTS, out, _config(batch_size=4), show_progress=False)
    assert record["cost"]["images_drawn_now"] == 3
    assert (out / "7_0.png").stat().st_mtime_ns == kept
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == original


def test_batch_size_changes_images_only_by_rounding(tiny_sd, tmp_path):
    import numpy as np
    from PIL import Image

    generate(tiny_sd, PROMPTS, tmp_path / "a", _config(batch_size=4), show_progress=False)
    generate(tiny_sd, PROMPTS, tmp_path / "b", _config(batch_size=1), show_progress=False)
    for job in plan_images(PROMPTS, _config()):
        a = np.asarray(Image.open(tmp_path / "a" / job.filename), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / job.filename), dtype=np.int16)
        assert np.abs(a - b).max() <= 2, job.filename


def test_other_settings_in_same_folder_refused(tiny_sd, tmp_path):
    generate(tiny_sd, PROMPTS, tmp_path / "out", _config(), show_progress=False)
    with pytest.raises(SafeTextError, match="other settings"):
        generate(tiny_sd, PROMPTS, tmp_path / "out", _config(num_inference_steps=3), show_progress=False)


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafeTextError, match="model_index.json"):
        generate(tmp_path / "empty", PROMPTS, tmp_path / "out", _config(), show_progress=False)


def test_two_processes_write_the_same_images_as_one(tiny_sd, tmp_path, run_cli):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS.prompts) + "\n")
    flags = [
        "--prompts",
        str(prompts_file),
        "--images-per-prompt",
        "2",
        "--num-inference-steps",
        "2",
        "--batch-size",
        "2",
        "--seed",
        "5",
        "--no-progress",
    ]
    for out, processes in (("one", 1), ("two", 2)):
        run_cli(["generate", "--model", tiny_sd, "--out", tmp_path / out, *flags], processes=processes)

    record = json.loads((tmp_path / "two" / "generation.json").read_text())
    assert record["cost"]["num_processes"] == 2
    # one merged manifest, in plan order, and byte-identical images
    assert (tmp_path / "two" / "manifest.jsonl").read_text() == (tmp_path / "one" / "manifest.jsonl").read_text()
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.png")) and len(names) == 6
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_a_new_alignment_in_the_same_folder_does_not_reuse_old_images(aligned_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    aligned = tmp_path / "aligned"
    shutil.copytree(aligned_run.output_dir, aligned)
    out = tmp_path / "images"
    generate(aligned, PROMPTS, out, _config(), show_progress=False)
    # a second alignment writes other encoder weights into the same folder
    (weights,) = (aligned / "text_encoder").glob("*.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(weights).items()}, weights)
    with pytest.raises(SafeTextError, match="other settings"):
        generate(aligned, PROMPTS, out, _config(), show_progress=False)
