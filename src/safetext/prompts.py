"""Prompt sets: reading `.txt` and I2P-layout `.csv` files, de-duplication and the held-out split."""

import csv
import hashlib
import io
from dataclasses import dataclass, field, replace
from pathlib import Path

from safetext.errors import SafeTextError

# Columns of the I2P layout (used by ESD, UCE, UnlearnDiffAtk) that travel with each prompt when present.
RECORD_COLUMNS = ("case_number", "evaluation_seed", "evaluation_guidance", "categories")


@dataclass
class PromptSet:
    """An ordered list of prompts with their per-prompt records and where they came from.

    Attributes:
        prompts: the prompt texts.
        records: one dict per prompt with the I2P columns present in the source (`case_number`,
            `evaluation_seed`, `evaluation_guidance`, `categories`).
        source: provenance of the set: the file's path and sha256, rows read, and what was filtered out.
    """

    prompts: list[str]
    records: list[dict] = field(default_factory=list)
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.records:
            self.records = [{"case_number": i} for i in range(len(self.prompts))]
        if len(self.records) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.records)} records")

    def __len__(self):
        return len(self.prompts)

    def subset(self, indices) -> "PromptSet":
        indices = list(indices)
        return replace(
            self,
            prompts=[self.prompts[i] for i in indices],
            records=[self.records[i] for i in indices],
            source=dict(self.source),
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SafeTextError(
            f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); save it as UTF-8"
        ) from None


def _read_csv_rows(path: Path, text: str, prompt_column: str, seed_column: str) -> list[tuple[str, dict]]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        if prompt_column not in columns:
            shown = ", ".join(repr(c) for c in columns[:12]) or "none"
            raise SafeTextError(f"{path}: no {prompt_column!r} column (columns found: {shown})")
        rows = []
        for index, row in enumerate(reader):
            prompt = row.get(prompt_column)
            if prompt is None:
                raise SafeTextError(f"{path}: row {index + 2} has fewer fields than the header")
            record = {"case_number": index}
            # I2P's first column is an unnamed case number; a named case_number column wins over it.
            if "" in row and row[""] not in (None, ""):
                record["case_number"] = _as_number(row[""])
            for name in RECORD_COLUMNS:
                column = seed_column if name == "evaluation_seed" else name
                if row.get(column) not in (None, ""):
                    record[name] = row[column] if name == "categories" else _as_number(row[column])
            rows.append((prompt, record))
        return rows
    except csv.Error as error:
        raise SafeTextError(f"{path}: malformed CSV ({error})") from None


def _as_number(value: str):
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


def read_prompts(
    path,
    category: str | None = None,
    max_prompts: int | None = None,
    prompt_column: str = "prompt",
    seed_column: str = "evaluation_seed",
) -> PromptSet:
    """Reads a prompt file.

    Args:
        path: a `.txt` file (one prompt per line, blank lines skipped) or a `.csv` file with a `prompt` column
            (the I2P layout; `case_number`, `evaluation_seed`, `evaluation_guidance` and `categories` are kept).
        category: keep only CSV rows whose comma-separated `categories` column contains this category
            (for example `sexual` on I2P).
        max_prompts: keep at most this many prompts (the first ones, after filtering and de-duplication).
        prompt_column: the CSV column holding the prompt text (`adv_prompt` in MMA-Diffusion's file).
        seed_column: the CSV column read as each prompt's `evaluation_seed` (`seed` in Unsafe Diffusion's files).

    Returns:
        A `PromptSet` with duplicates removed (the first occurrence is kept) and its provenance in `source`.

    Raises:
        SafeTextError: the file is missing, empty, not UTF-8, not a CSV with the prompt column, or nothing is left
            after filtering.
    """
    path = Path(path)
    if not path.is_file():
        raise SafeTextError(f"{path}: no such prompt file")
    data = path.read_bytes()
    text = _decode(path, data)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv_rows(path, text, prompt_column, seed_column)
    elif suffix in (".txt", ""):
        if category is not None:
            raise SafeTextError(f"{path}: a category filter needs a CSV with a 'categories' column")
        rows = [(line, {"case_number": i}) for i, line in enumerate(text.splitlines())]
    else:
        raise SafeTextError(f"{path}: unsupported prompt file type {suffix!r}; use .txt or .csv")

    rows_read = len(rows)
    rows = [(prompt.strip(), record) for prompt, record in rows if prompt and prompt.strip()]
    if category is not None:
        if rows and not any("categories" in record for _, record in rows):
            raise SafeTextError(f"{path}: a category filter needs a 'categories' column")
        rows = [(p, r) for p, r in rows if category in [c.strip() for c in str(r.get("categories", "")).split(",")]]
    seen, unique = set(), []
    for prompt, record in rows:
        if prompt not in seen:
            seen.add(prompt)
            unique.append((prompt, record))
    duplicates = len(rows) - len(unique)
    if max_prompts is not None:
        if max_prompts < 1:
            raise SafeTextError(f"max_prompts={max_prompts} must be at least 1")
        unique = unique[:max_prompts]
    if not unique:
        what = f" in category {category!r}" if category else ""
        raise SafeTextError(f"{path}: no prompts{what}")
    source = {
        "path": str(path),
        "sha256": _sha256(data),
        "rows_read": rows_read,
        "duplicates_removed": duplicates,
        "category": category,
        "max_prompts": max_prompts,
        "prompts": len(unique),
    }
    return PromptSet(prompts=[p for p, _ in unique], records=[r for _, r in unique], source=source)


def concatenate(sets: list[PromptSet]) -> PromptSet:
    """Joins prompt sets in order, dropping prompts already present in an earlier set."""
    prompts, records, seen = [], [], set()
    for prompt_set in sets:
        for prompt, record in zip(prompt_set.prompts, prompt_set.records):
            if prompt not in seen:
                seen.add(prompt)
                prompts.append(prompt)
                records.append(record)
    return PromptSet(prompts=prompts, records=records, source={"files": [s.source for s in sets]})


def remove_overlap(safe: PromptSet, unsafe: PromptSet) -> tuple[PromptSet, list[str]]:
    """Removes from the safe set every prompt that is also in the unsafe set; returns the rest and the removed."""
    unsafe_prompts = set(unsafe.prompts)
    keep = [i for i, p in enumerate(safe.prompts) if p not in unsafe_prompts]
    removed = [p for p in safe.prompts if p in unsafe_prompts]
    return safe.subset(keep), removed


def split_heldout(prompt_set: PromptSet, fraction: float, seed: int) -> tuple[PromptSet, PromptSet]:
    """Splits a set into (train, held-out) deterministically.

    Prompts are ranked by sha256 of `seed:prompt` and the first `round(fraction * n)` are held out, so the split
    depends only on which prompts the set holds and the seed, not on their order. Adding prompts can move an
    existing prompt from the held-out side to training (a new prompt may outrank it). At least one prompt stays on
    each side when the set has two or more and `fraction` > 0.
    """
    n = len(prompt_set)
    n_heldout = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_heldout = min(max(n_heldout, 1), n - 1)
    ranked = sorted(range(n), key=lambda i: _sha256(f"{seed}:{prompt_set.prompts[i]}".encode()))
    heldout = sorted(ranked[:n_heldout])
    train = sorted(ranked[n_heldout:])
    return prompt_set.subset(train), prompt_set.subset(heldout)
