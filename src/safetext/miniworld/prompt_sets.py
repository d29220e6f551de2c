"""The MiniWorld prompt sets: generated deterministically, shipped as CSV files in the I2P column layout.

| name | rows ask for |
| --- | --- |
| `miniworld-train` | `striped` subjects, in `train` forms only: the prompts alignment trains on |
| `miniworld-heldout` | `striped` subjects, in held-out forms only |
| `miniworld-indirect` | `striped` subjects, described indirectly only |
| `miniworld-neighbour` | subjects carrying a neighbour of `striped` (`dotted`, `checkered`), which must survive |
| `miniworld-overerasure` | the subjects that carry a restricted concept, carrying nothing: they must still be drawn |
| `miniworld-safe` | the world at large, without any restricted concept |
| `miniworld-crowned-{train,heldout,indirect,neighbour}` | the same four for the second restricted concept |

Columns: `case_number, prompt, evaluation_seed, evaluation_guidance` as in I2P, then `categories` (the
restricted concept the prompt asks for, empty when it asks for none, as I2P's column), `concept` (the attribute a
row probes; on an over-erasure row, the restricted concept whose subject it shows), `form` and `form_group` (the
surface form of `concept` the prompt uses, and its group), and `subject` (the object class carrying `concept`).

Regenerate the shipped files with `python -m safetext.miniworld.prompt_sets`; a test checks that doing so
reproduces them byte for byte.
"""

import argparse
import csv
import dataclasses
import random
from dataclasses import dataclass, replace
from pathlib import Path

from safetext.miniworld.captions import caption
from safetext.miniworld.scenes import Scene, SceneDistribution, sample_scene
from safetext.miniworld.world import (
    FORM_GROUPS,
    NEIGHBOUR_CONCEPTS,
    RESTRICTED_CONCEPTS,
    find_surface_forms,
    get_attribute,
)

PROMPTS_DIR = Path(__file__).with_name("prompts")
EVALUATION_GUIDANCE = 7.5
"""The guidance scale written into every row, Stable Diffusion's default."""


@dataclass(frozen=True)
class PromptSetSpec:
    """How one prompt set is generated.

    Args:
        name: the name it is addressed by, e.g. `"miniworld-train"`.
        kind: `"concept"` (subjects carrying a restricted concept), `"neighbour"` (subjects carrying one of its
            neighbours), `"overerasure"` (the restricted concepts' subjects, carrying nothing) or `"safe"`.
        size: number of rows.
        seed: seed of the generator; each set has its own, so that sets do not share draws.
        concept: the restricted concept, for `"concept"` and `"neighbour"` sets.
        group: the surface-form group the prompts use, for `"concept"` sets.
    """

    name: str
    kind: str
    size: int
    seed: int
    concept: str = ""
    group: str = ""

    def __post_init__(self):
        kinds = ("concept", "neighbour", "overerasure", "safe")
        if self.kind not in kinds:
            raise ValueError(f"kind must be one of {kinds}, got {self.kind!r}")
        if self.kind in ("concept", "neighbour") and self.concept not in RESTRICTED_CONCEPTS:
            raise ValueError(f"concept must be one of {RESTRICTED_CONCEPTS}, got {self.concept!r}")
        if (self.kind == "concept") != (self.group in FORM_GROUPS):
            raise ValueError(f"a concept set needs a group from {FORM_GROUPS} and other sets none, got {self.group!r}")


PROMPT_SETS = (
    PromptSetSpec("miniworld-train", "concept", 240, seed=101, concept="striped", group="train"),
    PromptSetSpec("miniworld-heldout", "concept", 120, seed=102, concept="striped", group="heldout"),
    PromptSetSpec("miniworld-indirect", "concept", 120, seed=103, concept="striped", group="indirect"),
    PromptSetSpec("miniworld-neighbour", "neighbour", 120, seed=104, concept="striped"),
    PromptSetSpec("miniworld-overerasure", "overerasure", 180, seed=105),
    PromptSetSpec("miniworld-safe", "safe", 200, seed=106),
    PromptSetSpec("miniworld-crowned-train", "concept", 160, seed=201, concept="crowned", group="train"),
    PromptSetSpec("miniworld-crowned-heldout", "concept", 90, seed=202, concept="crowned", group="heldout"),
    PromptSetSpec("miniworld-crowned-indirect", "concept", 90, seed=203, concept="crowned", group="indirect"),
    PromptSetSpec("miniworld-crowned-neighbour", "neighbour", 90, seed=204, concept="crowned"),
)
PROMPT_SET_NAMES = tuple(spec.name for spec in PROMPT_SETS)
SELECTION_SAFE = PromptSetSpec("selection-safe", "safe", 180, seed=306)
"""Not shipped: the fresh safe prompts the demo's alignment settings were chosen on
(`benchmarks/miniworld_form_transfer.py --safe-prompts world`), which a measure of those settings leaves out."""


@dataclass(frozen=True)
class PromptRow:
    """One row of a prompt set file (see the module docstring for the columns)."""

    case_number: int
    prompt: str
    evaluation_seed: int
    evaluation_guidance: float
    categories: str
    concept: str
    form: str
    form_group: str
    subject: str


COLUMNS = tuple(f.name for f in dataclasses.fields(PromptRow))


def get_prompt_set_spec(name: str) -> PromptSetSpec:
    """The spec of the prompt set called `name`.

    Raises:
        ValueError: if there is no such set.
    """
    for spec in PROMPT_SETS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown MiniWorld prompt set {name!r}; expected one of {PROMPT_SET_NAMES}")


# no scene in a prompt set shows a restricted concept unless the row asks for it
_BENIGN = SceneDistribution(attributes=NEIGHBOUR_CONCEPTS)


def _with_subject(rng: random.Random, subject: str, attribute: str | None) -> Scene:
    """A benign scene in which one object is of class `subject` and carries `attribute` (nothing when None)."""
    while True:
        scene = sample_scene(rng, _BENIGN)
        k = rng.randrange(len(scene.objects))
        if any(obj.object_class == subject for i, obj in enumerate(scene.objects) if i != k):
            continue
        obj = scene.objects[k]
        if attribute is None:
            attributes = ()
        else:
            kind = get_attribute(attribute).kind
            # keep an attribute of the other kind ("a striped fish wearing a hat") where the subject carries it
            kept = [
                a for a in obj.attributes if get_attribute(a).kind != kind and subject in get_attribute(a).carriers
            ]
            attributes = tuple(sorted(kept + [attribute]))
        objects = list(scene.objects)
        objects[k] = replace(obj, object_class=subject, attributes=attributes)
        return replace(scene, objects=tuple(objects))


def _draw_row(spec: PromptSetSpec, rng: random.Random, index: int) -> tuple[str, str, str, str, str]:
    """One prompt of a set: (prompt, categories, concept, subject, form group) before the form is read back."""
    if spec.kind == "concept":
        carriers = get_attribute(spec.concept).carriers
        subject = carriers[index % len(carriers)]
        scene = _with_subject(rng, subject, spec.concept)
        return caption(scene, rng, forms=(spec.group,)), spec.concept, spec.concept, subject, spec.group
    if spec.kind == "neighbour":
        neighbours = get_attribute(spec.concept).neighbours
        neighbour = neighbours[index % len(neighbours)]
        carriers = get_attribute(neighbour).carriers
        subject = carriers[(index // len(neighbours)) % len(carriers)]
        return caption(_with_subject(rng, subject, neighbour), rng), "", neighbour, subject, "allowed"
    if spec.kind == "overerasure":
        pairs = [(c, s) for c in RESTRICTED_CONCEPTS for s in get_attribute(c).carriers]
        concept, subject = pairs[index % len(pairs)]
        return caption(_with_subject(rng, subject, None), rng), "", concept, subject, ""
    scene = sample_scene(rng, _BENIGN)
    return caption(scene, rng), "", "", scene.objects[0].object_class, ""


def generate_prompt_set(name: str | PromptSetSpec) -> list[PromptRow]:
    """Generates a prompt set from its spec; the same name always gives the same rows.

    Args:
        name: one of `PROMPT_SET_NAMES`, or a spec of a set that is not shipped (a selection set drawn like a
            shipped one with a seed of its own: `PromptSetSpec("selection", "safe", 120, seed=306)`).

    Returns:
        The rows, numbered from 0, with distinct prompts.

    Raises:
        ValueError: if `name` is unknown.
        RuntimeError: if a generated prompt breaks the set's promise about surface forms (a bug in the world).
    """
    spec = name if isinstance(name, PromptSetSpec) else get_prompt_set_spec(name)
    rng = random.Random(spec.seed)
    rows: list[PromptRow] = []
    seen: set[str] = set()
    while len(rows) < spec.size:
        prompt, categories, concept, subject, group = _draw_row(spec, rng, len(rows))
        if prompt in seen:
            continue
        matches = find_surface_forms(prompt)
        restricted = [m for m in matches if m.attribute in RESTRICTED_CONCEPTS]
        if spec.kind == "concept":
            wrong = [m for m in restricted if (m.attribute, m.group) != (spec.concept, spec.group)]
        else:
            wrong = restricted
        own = [m.text for m in matches if m.attribute == concept]
        if wrong or (spec.kind in ("concept", "neighbour") and not own):
            raise RuntimeError(
                f"prompt {prompt!r} of {spec.name} breaks its surface-form promise: {wrong or 'no form'}"
            )
        seen.add(prompt)
        rows.append(
            PromptRow(
                case_number=len(rows),
                prompt=prompt,
                evaluation_seed=rng.randrange(2**31),
                evaluation_guidance=EVALUATION_GUIDANCE,
                categories=categories,
                concept=concept,
                form=own[0] if own else "",
                form_group=group,
                subject=subject,
            )
        )
    return rows


def write_prompt_set(rows: list[PromptRow], path: str | Path) -> Path:
    """Writes rows as a CSV file with a header, `\\n` line endings and UTF-8, so that output is byte-stable."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(dataclasses.astuple(row))
    return path


def prompt_set_path(name: str) -> Path:
    """The shipped CSV file of the prompt set called `name`.

    Raises:
        ValueError: if `name` is unknown.
    """
    get_prompt_set_spec(name)
    return PROMPTS_DIR / f"{name}.csv"


def read_prompt_set(name_or_path: str | Path) -> list[PromptRow]:
    """Reads a MiniWorld prompt set, by name (`"miniworld-heldout"`) or from a CSV file written by this module.

    Raises:
        ValueError: if the name is unknown or the file lacks a column.
    """
    is_file = isinstance(name_or_path, Path) or str(name_or_path).endswith(".csv")
    path = Path(name_or_path) if is_file else prompt_set_path(str(name_or_path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the columns {sorted(missing)} of a MiniWorld prompt set")
        return [
            PromptRow(
                case_number=int(r["case_number"]),
                prompt=r["prompt"],
                evaluation_seed=int(r["evaluation_seed"]),
                evaluation_guidance=float(r["evaluation_guidance"]),
                categories=r["categories"],
                concept=r["concept"],
                form=r["form"],
                form_group=r["form_group"],
                subject=r["subject"],
            )
            for r in reader
        ]


def shipped_prompts() -> set[str]:
    """Every prompt of every shipped set, which a set of fresh prompts keeps out."""
    return {row.prompt for name in PROMPT_SET_NAMES for row in read_prompt_set(name)}


def write_prompt_sets(output_dir: str | Path = PROMPTS_DIR) -> list[Path]:
    """Generates every prompt set and writes it as `<output_dir>/<name>.csv`.

    Returns:
        The paths written, in the order of `PROMPT_SET_NAMES`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return [write_prompt_set(generate_prompt_set(name), output_dir / f"{name}.csv") for name in PROMPT_SET_NAMES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the MiniWorld prompt set files.")
    parser.add_argument("--output-dir", default=str(PROMPTS_DIR), help="where to write the CSV files")
    args = parser.parse_args(argv)
    for path in write_prompt_sets(args.output_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
