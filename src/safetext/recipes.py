"""Named data recipes: which prompt files make the unsafe and safe sides of an alignment.

The safe side of a recipe deliberately includes benign prompts in the style of the unsafe ones. Trained against
photo captions alone, an encoder learns "art prompt vs caption" instead of "unsafe vs safe" and drags benign
art-style prompts along with the unsafe ones (see docs/defaults.md); benign art prompts on the safe side hold
that style in place, so only the unsafe content is left to move.

Recipes read the public prompt files from a local folder: `--data-dir`, else `$SAFETEXT_DATA_DIR`.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from safetext.errors import SafeTextError
from safetext.prompts import PromptSet, read_prompts

DATA_DIR_VARIABLE = "SAFETEXT_DATA_DIR"


@dataclass(frozen=True)
class PromptSource:
    """One prompt file of a recipe and how to read it.

    Attributes:
        filename: the file's name inside the data folder.
        origin: where the public file comes from (repository @ commit, path), for users who fetch it themselves.
        category: keep only rows whose `categories` column contains this.
        max_prompts: keep at most this many (the first ones).
    """

    filename: str
    origin: str
    category: str | None = None
    max_prompts: int | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    unsafe: dict[str, PromptSource] = field(default_factory=dict)
    safe: dict[str, PromptSource] = field(default_factory=dict)


I2P = "rohitgandikota/erasing@25613d2 data/unsafe-prompts4703.csv (I2P, Schramowski et al., CVPR 2023; MIT)"
COCO = "rohitgandikota/erasing@25613d2 data/coco_30k.csv (COCO-30k captions; CC-BY-4.0)"
SIXCD = "Artanisax/Six-CD@a30fe9e Datasets/benign.csv (Six-CD benign prompts; MIT)"

RECIPES = {
    "nudity": Recipe(
        name="nudity",
        description="I2P prompts of the 'sexual' category against COCO captions and benign art-style prompts",
        unsafe={"i2p-sexual": PromptSource("i2p.csv", I2P, category="sexual")},
        safe={
            "coco": PromptSource("coco_30k.csv", COCO, max_prompts=1000),
            "sixcd-benign": PromptSource("sixcd_benign.csv", SIXCD),
        },
    ),
}


def resolve_data_dir(data_dir=None) -> Path:
    """The folder holding the public prompt files: the argument, else `$SAFETEXT_DATA_DIR`."""
    value = data_dir or os.environ.get(DATA_DIR_VARIABLE)
    if not value:
        raise SafeTextError(f"a recipe needs the prompt files: pass --data-dir or set {DATA_DIR_VARIABLE}")
    path = Path(value)
    if not path.is_dir():
        raise SafeTextError(f"{path}: no such data folder")
    return path


def load_recipe(name: str, data_dir=None) -> tuple[dict[str, PromptSet], dict[str, PromptSet]]:
    """Reads the unsafe and safe prompt sets of a named recipe.

    Raises:
        SafeTextError: unknown recipe, no data folder, or a file of the recipe missing from it.
    """
    if name not in RECIPES:
        raise SafeTextError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    recipe, folder = RECIPES[name], resolve_data_dir(data_dir)

    def read(sources):
        sets = {}
        for set_name, source in sources.items():
            path = folder / source.filename
            if not path.is_file():
                raise SafeTextError(f"{path}: missing; recipe {name!r} needs it (source: {source.origin})")
            sets[set_name] = read_prompts(path, source.category, source.max_prompts)
            sets[set_name].source["origin"] = source.origin
        return sets

    return read(recipe.unsafe), read(recipe.safe)
