"""MiniWorld as a model name, its quality gates and the demo, on a quick build (tiny models, a few steps).

The quick build draws noise, so these tests check the plumbing and the bookkeeping; the figures of the shipped
model are measured by `python -m safetext.miniworld.quality` and `safetext demo`, and recorded in its model card.
"""

import csv
import json
from dataclasses import replace

import pytest

from safetext.cli import main
from safetext.config import AlignmentConfig
from safetext.errors import SafeTextError
from safetext.evaluation.detectors import get_detector
from safetext.loading import load_text_encoder, resolve_model_name
from safetext.miniworld import model as miniworld_model
from safetext.miniworld.build import main as build_main
from safetext.miniworld.demo import DemoConfig, run_demo
from safetext.miniworld.quality import main as quality_main
from safetext.miniworld.quality import measure_quality, miniworld_set, single_object_prompts
from safetext.miniworld.world import CLASS_NAMES, RESTRICTED_CONCEPTS, find_surface_forms
from safetext.recipes import MINIWORLD_SAFE_HELDOUT


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("miniworld") / "pipeline"
    assert build_main(["--out", str(output_dir), "--quick"]) == 0
    return output_dir


@pytest.fixture
def shipped_at(monkeypatch):
    """Points the name `miniworld` at another folder, as if that folder were the shipped one."""

    def point(folder):
        monkeypatch.setattr(miniworld_model, "MODEL_DIR", folder)

    return point


def test_the_name_miniworld_stands_for_the_shipped_folder(quick, shipped_at):
    shipped_at(quick)
    assert resolve_model_name("miniworld") == quick
    assert resolve_model_name("some/other-model") == "some/other-model"
    encoder = load_text_encoder("miniworld")
    assert encoder.family == "sd" and encoder.source["pretrained_model_name_or_path"] == "miniworld"


def test_without_shipped_weights_the_name_says_how_to_build_them(tmp_path, shipped_at):
    shipped_at(tmp_path / "absent")
    with pytest.raises(SafeTextError, match="safetext miniworld build"):
        resolve_model_name("miniworld")


def test_the_registry_builds_the_miniworld_detector_on_the_restricted_concepts():
    detector = get_detector("miniworld")
    assert detector.settings()["classes"] == list(RESTRICTED_CONCEPTS)
    assert get_detector("miniworld", threshold=0.7).settings()["threshold"] == 0.7


def test_single_object_prompts_name_one_class_and_no_attribute():
    prompts = single_object_prompts(per_class=3)
    assert len(prompts) == 3 * len(CLASS_NAMES)
    assert sorted({r["subject"] for r in prompts.records}) == sorted(CLASS_NAMES)
    assert not any(find_surface_forms(prompt) for prompt in prompts.prompts)
    assert single_object_prompts(per_class=3).prompts == prompts.prompts


def test_quality_gates_are_measured_and_written_into_the_model_card(quick, capsys):
    record = measure_quality(quick, num_inference_steps=1, per_class=1, detector_images=24)
    assert record["command"] == f"safetext miniworld quality --model {quick} --steps 1 --per-class 1"
    names = [gate["name"] for gate in record["gates"]]
    assert sum(name.startswith("detector accuracy") for name in names) == len(
        record["detector_evaluation"]["per_label"]
    )
    assert "prompt following, single-object prompts" in names
    assert sum(name.startswith("striped present") for name in names) == 3
    for gate in record["gates"]:
        assert 0 <= gate["value"] <= 1 and gate["passed"] == (gate["value"] >= gate["required"])
    assert record["all_passed"] == all(gate["passed"] for gate in record["gates"])
    ceiling = record["autoencoder_ceiling"]
    # clean renders are the detector's home ground; reconstructions by an untrained VAE are not
    assert set(ceiling["recall_clean"]) == set(ceiling["recall_reconstructed"]) and ceiling["l1"] > 0
    assert min(ceiling["recall_clean"].values()) > 0.9
    # each restricted concept is looked for on the over-erasure prompts of its own subjects, which name none
    unasked = record["restricted_unasked"]["by_concept"]
    assert set(unasked) == {"striped", "crowned"}
    assert sum(entry["prompts"] for entry in unasked.values()) == len(miniworld_set("miniworld-overerasure"))
    assert all(0 <= entry["concept_present"] <= 1 for entry in unasked.values())

    # through the command line, which passes its options on to the gates' own
    code = main(["miniworld", "quality", "--model", str(quick), "--steps", "1", "--per-class", "1"])
    assert code in (0, 1)
    card = (quick / "README.md").read_text()
    assert "## Quality gates" in card and "prompt following" in card
    # the text encoder's reading of the pattern words is recorded and written into the card
    assert all(pair in card for pair in record["attribute_separation"]["pairs"])
    assert "found unasked" in card
    assert json.loads((quick / "quality.json").read_text())["settings"]["num_inference_steps"] == 1


def test_the_quality_record_names_the_shipped_model_by_its_name_not_its_folder(quick, shipped_at):
    from safetext.miniworld.quality import _command

    shipped_at(quick)
    # the command a reader can run anywhere, not the folder the package happened to be installed in
    assert _command(quick, 50, 20, "cpu") == "safetext miniworld quality --model miniworld"
    assert _command(quick, 50, 20, "cuda") == "safetext miniworld quality --model miniworld --device cuda"
    assert (
        _command(quick.parent / "other", 50, 20, "cpu")
        == f"safetext miniworld quality --model {quick.parent / 'other'}"
    )


def test_quality_refuses_a_folder_that_is_not_miniworld(tmp_path, capsys):
    assert quality_main(["--model", str(tmp_path)]) == 2
    assert "not a MiniWorld pipeline folder" in capsys.readouterr().err


def test_demo_writes_the_figures_the_issue_asks_for_and_a_page(quick, tmp_path):
    config = DemoConfig(
        alignment=replace(AlignmentConfig(), learning_rate=1e-3, num_train_epochs=1, checkpointing_steps=0),
        num_inference_steps=1,
        max_prompts=2,
        safe_prompts=3,
    )
    record = run_demo(tmp_path / "demo", config, model=quick, show_progress=False)
    on_disk = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert on_disk["removal_rate"] == record["removal_rate"]
    assert set(record["removal_rate"]) == {"train", "heldout", "indirect"}
    for key in ("prompt_following", "subject_kept", "neighbour_kept", "unprompted_rate"):
        assert set(record[key]) == {"original", "aligned"}
        assert all(0 <= value <= 1 for value in record[key].values())
    for value in record["removal_rate"].values():
        assert value is None or value <= 1
    # the evaluation's detector found the same unasked stripes on the over-erasure pictures
    over_erasure = record["safe"]["miniworld-overerasure"]
    for role, rate in record["unprompted_rate"].items():
        assert over_erasure["detections_by_class"][role].get("striped", 0) == round(rate * over_erasure["images"])
    # the mark is read against the unasked rate of the over-erasure pictures
    for group, value in record["removal_at_unprompted_rate"].items():
        present = record["concept_rate"][group]["original"]
        assert value == (None if present == 0 else pytest.approx(1 - record["unprompted_rate"]["original"] / present))
    assert record["seconds"] > 0 and len(record["demo"]["gates"]) == 3
    # the generic evaluation record is there too, with the MiniWorld detector
    assert record["settings"]["detector"]["name"] == "miniworld-detector"
    assert set(record["safe"]) == {"miniworld-safe-heldout", "miniworld-overerasure", "miniworld-neighbour"}
    assert record["safe"]["miniworld-overerasure"]["images"] == 2
    # prompt following is judged on safe prompts the alignment never trained on, as many as asked
    assert record["safe"]["miniworld-safe-heldout"]["images"] == 3
    with open(tmp_path / "demo" / "miniworld-safe-heldout_lpips.csv", newline="") as f:
        judged_on = [row["prompt"] for row in csv.DictReader(f)]
    assert judged_on == miniworld_set("miniworld-safe").prompts[:3]
    # image by image, which prompts kept their subject; the rates are these rows' means
    for key, name in record["demo"]["per_image"].items():
        with open(tmp_path / "demo" / name, newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == record["safe"][name.removesuffix("_subjects.csv")]["images"]
        for role in ("original", "aligned"):
            assert sum(int(row[role]) for row in rows) / len(rows) == pytest.approx(record[key][role])
        # the images lost and gained are these rows, and the change's interval holds the change itself
        lost = sum(row["original"] == "1" and row["aligned"] == "0" for row in rows)
        gained = sum(row["original"] == "0" and row["aligned"] == "1" for row in rows)
        assert record["changes"][key] == {"lost": lost, "gained": gained}
        low, high = record["intervals"][key]
        assert low - 1e-9 <= record[key]["aligned"] - record[key]["original"] <= high + 1e-9
        # a side with no image lost (gained) ends at the exact zero-event bound over the prompts
        bound = 1 - 0.025 ** (1 / len({row["prompt"] for row in rows}))
        if lost == 0:
            assert low == pytest.approx(-bound)
        if gained == 0:
            assert high == pytest.approx(bound)
    for group, value in record["removal_rate"].items():
        interval = record["intervals"]["removal_rate"][group]
        assert (interval is None) == (value is None)
        assert interval is None or interval[0] - 1e-9 <= value <= interval[1] + 1e-9
    assert record["intervals"]["settings"]["confidence"] == 0.95
    with open(tmp_path / "demo" / record["demo"]["per_image"]["subject_kept"], newline="") as f:
        asked = [(row["prompt"], row["label"]) for row in csv.DictReader(f)]
    subjects = [
        (r["prompt"], r["subject"])
        for r in miniworld_set("miniworld-overerasure").records
        if r["concept"] == "striped"
    ]
    assert asked == subjects[:2]
    aligned = json.loads((tmp_path / "demo" / "aligned" / "safetext.json").read_text())
    assert aligned["data"]["safe"]["miniworld-safe"]["start"] == MINIWORLD_SAFE_HELDOUT
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "removal rate, heldout forms" in page and "miniworld-overerasure" in page
    low, high = record["intervals"]["prompt_following"]
    assert f"[{100 * low:+.1f} to {100 * high:+.1f} points]" in page
    assert "Prompts whose subject one model drew and the other did not" in page
    assert page.count("miniworld-safe-heldout_subjects.csv") == 1


def test_demo_cli_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_index.json" in err[0]


def test_demo_judges_prompt_following_only_on_prompts_the_alignment_never_trains_on(tmp_path, capsys):
    with pytest.raises(ValueError, match=f"safe_prompts must be at most {MINIWORLD_SAFE_HELDOUT}"):
        DemoConfig(safe_prompts=MINIWORLD_SAFE_HELDOUT + 1)
    with pytest.raises(ValueError, match="safe_prompts must be at least 2"):
        DemoConfig(safe_prompts=1)
    code = main(["demo", "--safe-prompts", "61", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "safe_prompts must be at most" in err[0]
