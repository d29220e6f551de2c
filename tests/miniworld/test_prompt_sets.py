import csv

import pytest

from safetext.miniworld.prompt_sets import (
    COLUMNS,
    PROMPT_SET_NAMES,
    PromptSetSpec,
    generate_prompt_set,
    get_prompt_set_spec,
    prompt_set_path,
    read_prompt_set,
    write_prompt_sets,
)
from safetext.miniworld.world import RESTRICTED_CONCEPTS, find_surface_forms, get_attribute

REQUIRED = (
    "miniworld-train",
    "miniworld-heldout",
    "miniworld-indirect",
    "miniworld-neighbour",
    "miniworld-overerasure",
    "miniworld-safe",
)


def test_regenerating_reproduces_the_shipped_files_byte_for_byte(tmp_path):
    for path in write_prompt_sets(tmp_path):
        shipped = prompt_set_path(path.stem)
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} is stale: run python -m {__package__}"


def test_the_required_sets_exist_in_the_i2p_layout():
    assert set(REQUIRED) <= set(PROMPT_SET_NAMES)
    for name in PROMPT_SET_NAMES:
        with open(prompt_set_path(name), newline="", encoding="utf-8") as f:
            header = next(csv.reader(f))
        assert tuple(header) == COLUMNS
        assert header[:4] == ["case_number", "prompt", "evaluation_seed", "evaluation_guidance"]
        rows = read_prompt_set(name)
        assert len(rows) == get_prompt_set_spec(name).size
        assert [r.case_number for r in rows] == list(range(len(rows)))
        assert len({r.prompt for r in rows}) == len(rows)
        assert all(0 <= r.evaluation_seed < 2**31 for r in rows)


@pytest.mark.parametrize("name", PROMPT_SET_NAMES)
def test_each_set_uses_only_the_surface_forms_it_promises(name):
    spec = get_prompt_set_spec(name)
    used = set()
    for row in read_prompt_set(name):
        restricted = {
            (m.attribute, m.group, m.text)
            for m in find_surface_forms(row.prompt)
            if m.attribute in RESTRICTED_CONCEPTS
        }
        if spec.kind == "concept":
            assert {(a, g) for a, g, _ in restricted} == {(spec.concept, spec.group)}, row.prompt
            assert row.categories == spec.concept and row.subject in get_attribute(spec.concept).carriers
            used |= {text for _, _, text in restricted}
        else:
            assert not restricted, row.prompt
            assert row.categories == ""
    if spec.kind == "concept":
        # every form of the group is exercised, in its singular or plural wording
        for form in get_attribute(spec.concept).forms[spec.group]:
            assert {form.text, form.written(True)} & used, form


def test_neighbour_and_overerasure_sets_cover_their_subjects():
    neighbours = read_prompt_set("miniworld-neighbour")
    assert {r.concept for r in neighbours} == set(get_attribute("striped").neighbours)
    overerasure = read_prompt_set("miniworld-overerasure")
    for concept in RESTRICTED_CONCEPTS:
        subjects = {r.subject for r in overerasure if r.concept == concept}
        assert subjects == set(get_attribute(concept).carriers)
    # an over-erasure prompt names its subject bare: no attribute at all on it
    for row in overerasure:
        assert row.form == "" and row.form_group == ""


def test_a_set_that_is_not_shipped_is_drawn_from_its_own_spec():
    # a selection set drawn like miniworld-safe, with a seed of its own: reproducible and new
    spec = PromptSetSpec("selection-safe", "safe", 40, seed=306)
    rows = generate_prompt_set(spec)
    assert rows == generate_prompt_set(spec)
    assert len(rows) == 40 and all(row.concept == "" and row.subject for row in rows)
    shipped = {row.prompt for row in read_prompt_set("miniworld-safe")}
    assert len(shipped & {row.prompt for row in rows}) <= 2
    assert not any(m.attribute in RESTRICTED_CONCEPTS for row in rows for m in find_surface_forms(row.prompt))


def test_unknown_set_names_are_refused():
    with pytest.raises(ValueError, match="miniworld-train"):
        read_prompt_set("miniworld-nope")


def test_the_command_line_regenerates_into_a_folder(tmp_path, capsys):
    from safetext.miniworld.prompt_sets import main

    assert main(["--output-dir", str(tmp_path)]) == 0
    assert sorted(p.stem for p in tmp_path.glob("*.csv")) == sorted(PROMPT_SET_NAMES)
    assert str(tmp_path) in capsys.readouterr().out
