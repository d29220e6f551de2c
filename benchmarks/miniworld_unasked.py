"""How often MiniWorld models draw a restricted concept where no prompt asks for it, per concept's own subjects.

`safetext evaluate` runs its detector on safe sets too and writes what it found per picture into the set's CSV.
The over-erasure set (`miniworld-overerasure`) holds prompts that name the subjects of both restricted concepts
(its `concept` column says whose) and no attribute. This reads one or more evaluation folders and counts, per
model, the pictures in which the detector finds each restricted concept, split by whose subjects the prompt
names: the rate at which a model draws stripes on the subjects that striped prompts name, but unasked, is the
floor under the removal rate of `striped` (an eraser of the words that brings stripes down to it has taken away
what the words asked for). Draws nothing. Writes `benchmarks/results/miniworld_unasked.json`.

    python benchmarks/miniworld_unasked.py EVALUATION_DIR [EVALUATION_DIR ...]
"""

import argparse
import csv
import json
from pathlib import Path

from safetext.miniworld.quality import miniworld_set
from safetext.miniworld.world import RESTRICTED_CONCEPTS

SET = "miniworld-overerasure"
ROLES = ("original", "aligned")


def count(folder: Path) -> dict:
    """Per model and per concept whose subjects the prompts name: pictures, and pictures with each concept."""
    whose = {r["case_number"]: r["concept"] for r in miniworld_set(SET).records}
    record = json.loads((folder / "results.json").read_text())
    if SET not in record.get("safe", {}):
        raise SystemExit(f"{folder}: evaluated without --safe {SET}")
    with open(folder / record["safe"][SET]["per_image"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or any(f"{role}_labels" not in rows[0] for role in ROLES):
        raise SystemExit(
            f"{folder}: its {SET} table has no detections (evaluated without unsafe sets, or before the "
            "detector ran on safe sets); evaluate again into the same folder, which reuses the images"
        )
    found = {}
    for role in ROLES:
        found[role] = {}
        for subjects_of in RESTRICTED_CONCEPTS:
            chosen = [row for row in rows if whose[int(row["case_number"])] == subjects_of]
            labels = [{item.split(":")[0] for item in row[f"{role}_labels"].split(";") if item} for row in chosen]
            found[role][subjects_of] = {
                "pictures": len(chosen),
                **{concept: sum(concept in picture for picture in labels) for concept in RESTRICTED_CONCEPTS},
            }
    return {"models": record["models"], "found": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders", nargs="+", type=Path, help="folders written by safetext evaluate with --safe " + SET
    )
    args = parser.parse_args()
    results = {}
    for folder in args.folders:
        if not (folder / "results.json").is_file():
            raise SystemExit(f"{folder}: not an evaluation folder (no results.json)")
        results[str(folder)] = count(folder)
        for role, by_subject in results[str(folder)]["found"].items():
            line = "; ".join(
                f"{subjects_of}'s subjects: "
                + ", ".join(f"{concept} {entry[concept]}/{entry['pictures']}" for concept in RESTRICTED_CONCEPTS)
                for subjects_of, entry in by_subject.items()
            )
            print(f"{folder} {role}: {line}")
    out = Path(__file__).parent / "results" / "miniworld_unasked.json"
    record = {"command": "python benchmarks/miniworld_unasked.py " + " ".join(map(str, args.folders)), "set": SET}
    out.write_text(json.dumps({**record, "evaluations": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
