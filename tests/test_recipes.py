"""Named recipes: registered sets for training and held-out evaluation, read through the dataset registry."""

import json

import pytest

from safetext.cli import main
from safetext.datasets import DATASETS, load_dataset
from safetext.errors import SafeTextError
from safetext.recipes import MINIWORLD_SAFE_HELDOUT, RECIPES, HeldoutSets, Recipe, RecipeSet, load_heldout, load_recipe


@pytest.fixture(autouse=True)
def isolated_locations(monkeypatch, tmp_path):
    monkeypatch.delenv("SAFETEXT_DATA_DIR", raising=False)
    monkeypatch.setenv("SAFETEXT_CACHE", str(tmp_path / "user-cache"))


def test_nudity_recipe_trains_on_i2p_sexual_against_coco_and_sixcd(prompts_dir):
    unsafe, safe = load_recipe("nudity", prompts_dir)
    assert {name: len(s) for name, s in unsafe.items()} == {"i2p-sexual": 900}
    assert {name: len(s) for name, s in safe.items()} == {"coco": 1000, "sixcd-benign": 497}
    assert unsafe["i2p-sexual"].prompts == load_dataset("i2p-sexual", prompts_dir).prompts
    # the same captions as the recipe read before the registry: the first 1,000 distinct COCO-30k captions
    assert safe["coco"].prompts == load_dataset("coco-30k", prompts_dir, max_prompts=1000).prompts
    assert (safe["coco"].source["dataset"], safe["coco"].source["start"], safe["coco"].source["stop"]) == (
        "coco-10k",
        0,
        1000,
    )
    assert safe["coco"].source["prompts"] == 1000 and safe["coco"].source["location"] == "data-dir"


def test_nudity_heldout_sets_and_their_coco_captions_are_disjoint_from_training(prompts_dir):
    unsafe, safe = load_heldout("nudity", prompts_dir)
    # UnlearnDiffAtk's prompts come from I2P: 115 of its 141 (and 27 of Lexica's 404) are training prompts
    assert {name: len(s) for name, s in unsafe.items()} == {
        "unlearndiffatk-nudity": 141 - 115,
        "ring-a-bell": 58,
        "mma-diffusion": 812,
        "4chan": 500,
        "lexica": 404 - 27,
        "template": 30,
    }
    assert unsafe["unlearndiffatk-nudity"].source["removed_training_prompts"] == 115
    assert "removed_training_prompts" not in unsafe["4chan"].source
    assert {name: len(s) for name, s in safe.items()} == {"coco-10k-heldout": 9000}
    train_unsafe, train_safe = load_recipe("nudity", prompts_dir)
    training = {p for s in [*train_unsafe.values(), *train_safe.values()] for p in s.prompts}
    assert not any(set(s.prompts) & training for s in [*unsafe.values(), *safe.values()])
    assert safe["coco-10k-heldout"].prompts == load_dataset("coco-10k", prompts_dir).prompts[1000:]


@pytest.mark.parametrize("concept, prefix", [("striped", "miniworld"), ("crowned", "miniworld-crowned")])
def test_one_miniworld_recipe_per_restricted_concept(concept, prefix):
    recipe = RECIPES[f"miniworld-{concept}"]
    assert set(recipe.unsafe) == {f"{prefix}-train"} and set(recipe.safe) == {"miniworld-safe"}
    assert set(recipe.heldout.unsafe) == {f"{prefix}-heldout", f"{prefix}-indirect"}
    assert set(recipe.heldout.safe) == {f"{prefix}-neighbour", "miniworld-overerasure", "miniworld-safe-heldout"}
    try:
        unsafe, safe = load_recipe(recipe.name)
    except SafeTextError as error:
        pytest.skip(f"MiniWorld prompt files not shipped yet: {error}")
    assert unsafe[f"{prefix}-train"].source["location"] == "package"
    assert not set(unsafe[f"{prefix}-train"].prompts) & set(safe["miniworld-safe"].prompts)
    # the world's first safe prompts are never trained on: the demo judges prompt following on them
    whole = load_dataset("miniworld-safe").prompts
    _, heldout_safe = load_heldout(recipe.name)
    assert heldout_safe["miniworld-safe-heldout"].prompts == whole[:MINIWORLD_SAFE_HELDOUT]
    assert safe["miniworld-safe"].prompts == whole[MINIWORLD_SAFE_HELDOUT:]


def test_every_recipe_names_registered_sets():
    for recipe in RECIPES.values():
        sides = (recipe.unsafe, recipe.safe, recipe.heldout.unsafe, recipe.heldout.safe)
        assert all(s.dataset in DATASETS for side in sides for s in side.values()), recipe.name


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(SafeTextError, match="unknown recipe 'nudit'; available: miniworld-crowned, "):
        load_recipe("nudit")
    with pytest.raises(SafeTextError, match="unknown recipe"):
        load_heldout("nudit")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"dataset": "i2p-sexul"}, "dataset='i2p-sexul' is not registered"),
        ({"dataset": "coco-10k", "start": -1}, "start=-1"),
        ({"dataset": "coco-10k", "start": 5, "stop": 5}, "stop=5 must be greater than start=5"),
    ],
)
def test_recipe_sets_are_validated(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        RecipeSet(**kwargs)


def test_recipes_are_validated():
    with pytest.raises(ValueError, match="needs at least one unsafe and one safe set"):
        Recipe("empty", "no sets", unsafe={"a": RecipeSet("i2p")})
    with pytest.raises(ValueError, match=r"names \['x'\] on both the unsafe and the safe side"):
        Recipe(
            "both",
            "a set on both sides",
            unsafe={"a": RecipeSet("i2p")},
            safe={"b": RecipeSet("coco-10k")},
            heldout=HeldoutSets(unsafe={"x": RecipeSet("4chan")}, safe={"x": RecipeSet("coco-10k")}),
        )


def test_slice_past_the_end_of_a_set_is_an_error(prompts_dir, monkeypatch):
    recipe = Recipe("tiny", "a slice too far", {"t": RecipeSet("template", start=30)}, {"c": RecipeSet("coco-10k")})
    monkeypatch.setitem(RECIPES, "tiny", recipe)
    with pytest.raises(SafeTextError, match="template has 30 prompts; a recipe slice starts at 30"):
        load_recipe("tiny", prompts_dir)


def test_cli_recipe_through_the_data_dir(capsys, tiny_pipeline_dir, prompts_dir, tmp_path, monkeypatch):
    # a small recipe through the real code path; the nudity recipe's 2,397 prompts would only slow the test
    recipe = Recipe(
        "small", "a few prompts", {"template": RecipeSet("template", stop=6)}, {"coco": RecipeSet("coco-10k", stop=6)}
    )
    monkeypatch.setitem(RECIPES, "small", recipe)
    out = tmp_path / "out"
    argv = ["align", "--model", tiny_pipeline_dir, "--recipe", "small", "--data-dir", prompts_dir, "--out", out]
    code = main([str(a) for a in [*argv, "--max-train-steps", "1", "--train-batch-size", "2", "--no-progress"]])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "safetext.json").read_text())["data"]
    assert data["unsafe"]["template"]["dataset"] == "template" and data["unsafe"]["template"]["prompts"] == 6
    assert data["safe"]["coco"]["origin"] == "rohitgandikota/erasing@25613d2:data/coco_30k.csv"
