"""`safetext report`: the HTML page of an evaluation, its pixelation of flagged images, and a real headless browser.

The evaluation it reports on is a real one: two tiny pipelines through `evaluate`, with a deterministic detector
(red grid cells, as in test_evaluate.py) so that some images are flagged, and LPIPS/FID on a safe set.
"""

import base64
import csv
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from safetext.errors import SafeTextError
from safetext.evaluation.detectors import DETECTORS
from safetext.evaluation.evaluate import EvaluationConfig, evaluate
from safetext.evaluation.report import PIXELATION_CELLS, load_run, pixelate, render_report, write_report
from safetext.generation import GenerationConfig
from safetext.prompts import PromptSet

from .test_evaluate import FAST, RedCellDetector, assert_one_line_error, count_red_cells, run_cli

HOSTILE_PROMPT = 'a nude <script>alert("x")</script> & friends'


@pytest.fixture(scope="module")
def evaluation(tiny_pipeline_dir, prompt_lists, metric_weights, tmp_path_factory):
    from safetext.tiny_models import create_tiny_pipeline

    other = create_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-2"), seed=2)
    out = tmp_path_factory.mktemp("report") / "run-a"
    unsafe = {"nude": PromptSet([HOSTILE_PROMPT, *prompt_lists[0][:3]])}
    safe = {"everyday": PromptSet(prompt_lists[1][:3])}
    # a threshold at which some, not all, tiny-pipeline images have a red cell
    config = EvaluationConfig(GenerationConfig(**FAST), detector="red-cells", threshold=0.5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DETECTORS, "red-cells", RedCellDetector)
        record = evaluate(tiny_pipeline_dir, other, unsafe, safe, out, config, show_progress=False)
    return out, record


def data_uri_images(page: str) -> list[Image.Image]:
    uris = re.findall(r'<img class="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    return [(css, Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")) for css, data in uris]


def flagged_files(folder) -> list[tuple[str, str, str]]:
    """(set, role, file) of every image the detector flagged, from the evaluation's per-image CSVs, in page order:
    the detector runs on the safe set's images too."""
    flagged = []
    for name, table in (("nude", "nude_detections.csv"), ("everyday", "everyday_lpips.csv")):
        with open(folder / table, newline="") as handle:
            rows = list(csv.DictReader(handle))
        flagged += [
            (name, role, row["file"]) for row in rows for role in ("original", "aligned") if row[f"{role}_labels"]
        ]
    return flagged


def test_pixelate_keeps_the_size_and_leaves_a_mosaic():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mosaic = np.asarray(pixelate(image))
    assert mosaic.shape == (64, 64, 3)
    blocks = mosaic.reshape(PIXELATION_CELLS, 8, PIXELATION_CELLS, 8, 3)
    # every 8x8 block is one colour: its mean
    assert (blocks == blocks[:, :1, :, :1]).all()
    assert abs(blocks[0, 0, 0, 0].astype(float) - np.asarray(image)[:8, :8].mean(axis=(0, 1))).max() <= 1


def test_page_has_tables_plots_and_every_set(evaluation):
    out, record = evaluation
    page = render_report([load_run(out)])
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    for text in ("Headline", "Unsafe prompts", "Safe prompts", "nude", "everyday", "Settings", "red-cells"):
        assert text in page
    # the figures in the tables are the record's
    assert f"{100 * record['unsafe']['nude']['asr']['original']:.1f}%" in page
    assert f"{record['safe']['everyday']['lpips']:.3f}" in page
    # the NRR with its interval
    nrr, interval = record["unsafe"]["nude"]["nrr"], record["unsafe"]["nude"]["nrr_interval"]
    assert f"{100 * nrr:.1f}% [{100 * interval[0]:.1f}% to {100 * interval[1]:.1f}%]" in page
    # what the detector found on safe images, drawn unasked
    found = record["safe"]["everyday"]["images_with_detection"]
    assert f">{found['original']} → {found['aligned']}</td>" in page
    assert page.count("Safety against utility") >= 1 and "Attack success rate per unsafe set" in page


def test_the_detector_counts_the_safe_pictures_too(evaluation):
    out, record = evaluation
    with open(out / "everyday_lpips.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    safe = record["safe"]["everyday"]
    for role in ("original", "aligned"):
        counts = [count_red_cells(out / "images" / role / "everyday" / row["file"], 0.5) for row in rows]
        assert safe["images_with_detection"][role] == sum(1 for count in counts if count)
        assert safe["detections_by_class"][role] == ({"RED_CELL": sum(counts)} if sum(counts) else {})
    assert sum(safe["images_with_detection"].values()) > 0, "the fixture's threshold should flag a safe picture"


def test_prompts_are_escaped(evaluation):
    page = render_report([load_run(evaluation[0])])
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; friends" in page


def test_flagged_images_are_pixelated_unless_no_blur(evaluation):
    out, record = evaluation
    flagged = flagged_files(out)
    assert 0 < len(flagged), "the fixture's threshold should flag some images"
    # a safe prompt's picture in which the detector finds something is pixelated too
    assert {prompt_set for prompt_set, _, _ in flagged} == {"nude", "everyday"}
    blurred = [image for css, image in data_uri_images(render_report([load_run(out)])) if css == "flagged"]
    clear = [image for css, image in data_uri_images(render_report([load_run(out)], blur=False)) if css == "flagged"]
    assert len(blurred) == len(clear) == len(flagged)
    for mosaic, image in zip(blurred, clear):
        cell = mosaic.width // PIXELATION_CELLS
        blocks = np.asarray(mosaic).reshape(PIXELATION_CELLS, cell, PIXELATION_CELLS, cell, 3)
        assert (blocks == blocks[:, :1, :, :1]).all()
        # the clear picture is the generated image itself, enlarged without smoothing
        assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > PIXELATION_CELLS**2
    prompt_set, role, name = flagged[0]
    original = Image.open(out / "images" / role / prompt_set / name).convert("RGB")
    enlarged = original.resize(clear[0].size, Image.NEAREST)
    assert np.array_equal(np.asarray(enlarged), np.asarray(clear[0]))


def test_several_runs_are_compared(evaluation, tmp_path):
    out, _ = evaluation
    twin = tmp_path / "run-b"
    shutil.copytree(out, twin)
    page_path = write_report([out, twin], tmp_path / "both.html", images_per_set=1)
    page = page_path.read_text()
    assert "<h2>Runs</h2>" in page and "run-a" in page and "run-b" in page


def test_cli_writes_the_page_into_the_folder(evaluation):
    out, _ = evaluation
    code, stdout, stderr = run_cli(["report", out, "--images-per-set", "2"])
    assert code == 0, stderr
    assert (out / "report.html").is_file() and str(out / "report.html") in stdout
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize(
    "make_args, fragment",
    [
        (lambda d, t: [t / "nowhere"], "no results.json"),
        (lambda d, t: [d, d], "--out"),
        (lambda d, t: [d, "--images-per-set", "-1"], "images per set"),
    ],
)
def test_cli_bad_input_is_one_line(evaluation, tmp_path, make_args, fragment):
    assert_one_line_error(run_cli(["report", *make_args(evaluation[0], tmp_path)]), fragment)


def test_a_record_that_is_not_an_evaluation(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(SafeTextError, match="not a safetext evaluation record"):
        load_run(tmp_path)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium; make install does it)")
def test_page_renders_in_headless_chromium(evaluation, tmp_path):
    out, _ = evaluation
    page = write_report([out], tmp_path / "page.html", images_per_set=4)
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,1800",
            f"--screenshot={shot}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (1800, 1200, 3)
    # the page drew text and images, not a blank or error page: many colours, and the flagged images' red outline
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
    outline = np.all(np.abs(pixels.astype(int) - (0xD9, 0x53, 0x4F)) <= 6, axis=-1)
    assert outline.sum() > 100
