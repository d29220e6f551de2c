"""Named data recipes: which registered prompt sets make the unsafe and safe sides of an alignment, and which
held-out sets measure it.

The safe side of a recipe deliberately includes benign prompts in the style of the unsafe ones. Trained against
photo captions alone, an encoder learns "art prompt vs caption" instead of "unsafe vs safe" and drags benign
art-style prompts along with the unsafe ones (see docs/defaults.md); benign art prompts on the safe side hold
that style in place, so only the unsafe content is left to move.

Recipes name sets of the dataset registry (`safetext.datasets`), so their files are found the same way: the data
folder (`--data-dir`, else `$SAFETEXT_DATA_DIR`), then the cache, then a verified download.
"""

from dataclasses import dataclass, field

from safetext.datasets import DATA_DIR_VARIABLE, DATASETS, load_dataset, resolve_data_dir
from safetext.errors import SafeTextError
from safetext.prompts import PromptSet

__all__ = [
    "DATA_DIR_VARIABLE",
    "MINIWORLD_SAFE_HELDOUT",
    "RECIPES",
    "HeldoutSets",
    "Recipe",
    "RecipeSet",
    "load_heldout",
    "load_recipe",
    "read_sets",
    "resolve_data_dir",
]


@dataclass(frozen=True)
class RecipeSet:
    """One prompt set of a recipe: a registered set, or the slice `[start:stop]` of its prompts.

    Slices keep a recipe's training and held-out prompts of one set apart (COCO captions 0-999 train, the rest of
    COCO-10k is held out).

    Attributes:
        dataset: a name in the dataset registry, e.g. `"i2p-sexual"`.
        start: index of the first prompt kept.
        stop: index after the last prompt kept; None keeps the rest.
    """

    dataset: str
    start: int = 0
    stop: int | None = None

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r} is not registered; expected one of {sorted(DATASETS)}")
        if self.start < 0:
            raise ValueError(f"start={self.start!r} must be >= 0")
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"stop={self.stop!r} must be greater than start={self.start!r}")


@dataclass(frozen=True)
class HeldoutSets:
    """The sets a recipe is evaluated on and never trained on as such (by name, as `evaluate` reports them).

    Attributes:
        unsafe: prompts the aligned model must refuse, including attacks and other phrasings of the concept.
        safe: prompts it must still draw as before.
    """

    unsafe: dict[str, RecipeSet] = field(default_factory=dict)
    safe: dict[str, RecipeSet] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A named choice of training and evaluation data.

    Attributes:
        name: the name given to `--recipe`.
        description: what the sides hold.
        unsafe: the unsafe training sets, by the name the run records them under.
        safe: the safe training sets, by name.
        heldout: the evaluation sets.
    """

    name: str
    description: str
    unsafe: dict[str, RecipeSet] = field(default_factory=dict)
    safe: dict[str, RecipeSet] = field(default_factory=dict)
    heldout: HeldoutSets = field(default_factory=HeldoutSets)

    def __post_init__(self):
        if not self.unsafe or not self.safe:
            raise ValueError(f"recipe {self.name!r} needs at least one unsafe and one safe set")
        for sides in ((self.unsafe, self.safe), (self.heldout.unsafe, self.heldout.safe)):
            shared = set(sides[0]) & set(sides[1])
            if shared:
                raise ValueError(f"recipe {self.name!r} names {sorted(shared)} on both the unsafe and the safe side")


def _same(*names: str) -> dict[str, RecipeSet]:
    return {name: RecipeSet(name) for name in names}


MINIWORLD_SAFE_HELDOUT = 60
"""The first prompts of `miniworld-safe`, which MiniWorld's recipes never train on: the demo measures prompt
following on them, so the figure is of prompts the alignment did not hold in place."""


def _miniworld(concept: str, prefix: str) -> Recipe:
    return Recipe(
        name=f"miniworld-{concept}",
        description=(
            f"MiniWorld prompts asking for {concept!r} in the training surface forms against prompts of the world "
            f"without restricted concepts (all but the first {MINIWORLD_SAFE_HELDOUT}); evaluated on held-out and "
            f"indirect forms, those first safe prompts, neighbours and over-erasure"
        ),
        unsafe=_same(f"{prefix}-train"),
        safe={"miniworld-safe": RecipeSet("miniworld-safe", start=MINIWORLD_SAFE_HELDOUT)},
        heldout=HeldoutSets(
            unsafe=_same(f"{prefix}-heldout", f"{prefix}-indirect"),
            # miniworld-overerasure covers the subjects of both restricted concepts (its `concept` column says whose)
            safe={
                "miniworld-safe-heldout": RecipeSet("miniworld-safe", stop=MINIWORLD_SAFE_HELDOUT),
                **_same(f"{prefix}-neighbour", "miniworld-overerasure"),
            },
        ),
    )


RECIPES = {
    "nudity": Recipe(
        name="nudity",
        description="I2P prompts of the 'sexual' category against COCO captions and benign art-style prompts",
        unsafe=_same("i2p-sexual"),
        safe={"coco": RecipeSet("coco-10k", stop=1000), "sixcd-benign": RecipeSet("sixcd-benign")},
        heldout=HeldoutSets(
            # UnlearnDiffAtk's prompts are I2P prompts (115 of its 141 are in i2p-sexual) and 27 of Lexica's 404
            # are too: load_heldout drops them, so these figures are on prompts the encoder never trained on.
            unsafe=_same("unlearndiffatk-nudity", "ring-a-bell", "mma-diffusion", "4chan", "lexica", "template"),
            # sixcd-benign is a training set, so it is not here; the COCO captions after the first 1,000 are.
            safe={"coco-10k-heldout": RecipeSet("coco-10k", start=1000)},
        ),
    ),
    "miniworld-striped": _miniworld("striped", "miniworld"),
    "miniworld-crowned": _miniworld("crowned", "miniworld-crowned"),
}


def _get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise SafeTextError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def read_sets(sets: dict[str, RecipeSet], data_dir=None) -> dict[str, PromptSet]:
    """Reads recipe sets (a dataset, or a slice of it) by the name a run records them under.

    Raises:
        SafeTextError: a set that cannot be found, downloaded or verified, or a slice past a set's end.
    """
    read = {}
    for set_name, recipe_set in sets.items():
        prompt_set = load_dataset(recipe_set.dataset, data_dir)
        if recipe_set.start or recipe_set.stop is not None:
            if recipe_set.start >= len(prompt_set):
                raise SafeTextError(
                    f"{recipe_set.dataset} has {len(prompt_set)} prompts; a recipe slice starts at {recipe_set.start}"
                )
            prompt_set = prompt_set.subset(range(len(prompt_set))[recipe_set.start : recipe_set.stop])
            prompt_set.source.update(start=recipe_set.start, stop=recipe_set.stop, prompts=len(prompt_set))
        read[set_name] = prompt_set
    return read


def load_recipe(name: str, data_dir=None) -> tuple[dict[str, PromptSet], dict[str, PromptSet]]:
    """Reads the unsafe and safe training sets of a named recipe.

    Args:
        name: a key of `RECIPES`, e.g. `"nudity"`.
        data_dir: the local folder of prompt files; defaults to `$SAFETEXT_DATA_DIR`. Sets not found there are
            taken from the cache or downloaded (see `safetext.datasets.load_dataset`).

    Returns:
        The unsafe and the safe sets, each a dict from the recipe's set name to its `PromptSet`.

    Raises:
        SafeTextError: unknown recipe, or a set that cannot be found, downloaded or verified.
    """
    recipe = _get_recipe(name)
    return read_sets(recipe.unsafe, data_dir), read_sets(recipe.safe, data_dir)


def load_heldout(name: str, data_dir=None) -> tuple[dict[str, PromptSet], dict[str, PromptSet]]:
    """Reads the held-out unsafe and safe evaluation sets of a named recipe (the arguments of `load_recipe`).

    A held-out set never holds a prompt of the recipe's training sets: such prompts are dropped, and the set's
    `source` records how many (`removed_training_prompts`).

    Raises:
        SafeTextError: unknown recipe, or a set that cannot be found, downloaded or verified.
    """
    recipe = _get_recipe(name)
    training = set()
    for prompt_set in [*read_sets(recipe.unsafe, data_dir).values(), *read_sets(recipe.safe, data_dir).values()]:
        training.update(prompt_set.prompts)
    sides = []
    for sets in (recipe.heldout.unsafe, recipe.heldout.safe):
        side = {}
        for set_name, prompt_set in read_sets(sets, data_dir).items():
            kept = [i for i, prompt in enumerate(prompt_set.prompts) if prompt not in training]
            removed = len(prompt_set) - len(kept)
            if not kept:
                raise SafeTextError(f"recipe {name!r}: every prompt of held-out set {set_name!r} is a training prompt")
            if removed:
                prompt_set = prompt_set.subset(kept)
                prompt_set.source.update(prompts=len(kept), removed_training_prompts=removed)
            side[set_name] = prompt_set
        sides.append(side)
    return sides[0], sides[1]
