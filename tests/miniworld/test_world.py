import random
from dataclasses import replace

import pytest

from safetext.miniworld.captions import caption
from safetext.miniworld.scenes import Scene, SceneDistribution, SceneObject, sample_scene, swap_attribute
from safetext.miniworld.world import (
    ATTRIBUTES,
    CLASS_NAMES,
    DESIGNATED_CONCEPT,
    FORM_GROUPS,
    NEIGHBOUR_CONCEPTS,
    RESTRICTED_CONCEPTS,
    find_surface_forms,
    get_attribute,
)


def test_world_has_enough_classes_and_a_designated_concept_with_twelve_forms():
    assert len(CLASS_NAMES) >= 10
    assert RESTRICTED_CONCEPTS == ("striped", "crowned")
    striped = get_attribute(DESIGNATED_CONCEPT)
    assert tuple(striped.forms) == FORM_GROUPS
    assert len(striped.all_forms()) >= 12
    assert all(len(striped.forms[group]) >= 3 for group in FORM_GROUPS)


@pytest.mark.parametrize("concept", ["striped", "crowned"])
def test_each_surface_form_is_found_only_in_its_own_group(concept):
    # a form written alone must match its own group and no other form of any group: no leaks by substring
    attribute = get_attribute(concept)
    texts = {group: {w for f in forms for w in (f.text, f.written(True))} for group, forms in attribute.forms.items()}
    for group, written in texts.items():
        for text in written:
            found = {(m.attribute, m.group) for m in find_surface_forms(f"a ball {text} on the grass")}
            assert found == {(concept, group)}, (text, found)
    groups = list(texts.values())
    assert all(a.isdisjoint(b) for i, a in enumerate(groups) for b in groups[i + 1 :])


def test_neighbours_are_allowed_attributes_that_share_subjects_with_their_concept():
    for concept in RESTRICTED_CONCEPTS:
        attribute = get_attribute(concept)
        assert attribute.neighbours
        for neighbour in attribute.neighbours:
            assert neighbour in NEIGHBOUR_CONCEPTS
            assert set(get_attribute(neighbour).carriers) & set(attribute.carriers)


def test_find_surface_forms_respects_word_boundaries():
    assert [m.group for m in find_surface_forms("a pinstriped fish")] == ["heldout"]
    assert [m.group for m in find_surface_forms("A STRIPED fish")] == ["train"]
    assert find_surface_forms("a polka-dot ball")[0].attribute == "dotted"
    assert find_surface_forms("a red ball") == []


def _restricted_scenes(n, seed):
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < n:
        scene = sample_scene(rng, SceneDistribution(pattern_rate=0.8, headwear_rate=0.8))
        if scene.attributes() & set(RESTRICTED_CONCEPTS):
            scenes.append(scene)
    return scenes


def test_captions_mention_every_attribute_and_respect_the_allowed_groups():
    rng = random.Random(0)
    seen_groups = set()
    for scene in _restricted_scenes(300, seed=1):
        for forms in (("train",), ("heldout",), ("indirect",), FORM_GROUPS):
            text = caption(scene, rng, forms=forms)
            matches = find_surface_forms(text)
            assert scene.attributes() <= {m.attribute for m in matches}, text
            restricted = [m for m in matches if m.attribute in RESTRICTED_CONCEPTS]
            assert all(m.group in forms for m in restricted), (forms, text)
            if forms == FORM_GROUPS:
                seen_groups |= {m.group for m in restricted}
    # the world's own captions use all three groups, so its base model learns every form
    assert seen_groups == set(FORM_GROUPS)


def test_world_captions_use_only_carriers_and_show_carriers_without_the_attribute():
    rng = random.Random(2)
    bare, carried = set(), set()
    for _ in range(2000):
        scene = sample_scene(rng)
        for obj in scene.objects:
            for name in obj.attributes:
                assert obj.object_class in get_attribute(name).carriers
            (carried if DESIGNATED_CONCEPT in obj.attributes else bare).add(obj.object_class)
    assert carried == set(get_attribute(DESIGNATED_CONCEPT).carriers)
    assert carried <= bare


def test_caption_rejects_unknown_form_groups():
    scene = Scene("plain", (SceneObject("ball", "red"),))
    with pytest.raises(ValueError, match="forms"):
        caption(scene, random.Random(0), forms=("secret",))
    with pytest.raises(ValueError, match="forms"):
        caption(scene, random.Random(0), forms=())


def test_scene_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="colour"):
        SceneObject("ball", "gold")
    with pytest.raises(ValueError, match="at most one pattern"):
        SceneObject("ball", "red", attributes=("dotted", "striped"))
    with pytest.raises(ValueError, match="background"):
        Scene("space", (SceneObject("ball", "red"),))


def test_every_attribute_is_defined_once():
    names = [a.name for a in ATTRIBUTES]
    assert len(names) == len(set(names))


def test_swap_attribute_changes_one_attribute_to_another_of_its_kind_that_the_class_carries():
    rng = random.Random(0)
    plain = Scene(background="grass", objects=(SceneObject("tree", "green"),), seed=1)
    assert swap_attribute(plain, rng) is None
    # a box carries striped and checkered patterns, not dotted
    box = Scene(background="beach", objects=(SceneObject("box", "red", attributes=("striped",)),), seed=2)
    assert {swap_attribute(box, rng).objects[0].attributes for _ in range(20)} == {("checkered",)}
    # a fish carries dotted but not checkered; its crown swaps for a hat
    fish = Scene(
        background="underwater", objects=(SceneObject("fish", "blue", attributes=("crowned", "striped")),), seed=3
    )
    swaps = {swap_attribute(fish, rng).objects[0].attributes for _ in range(40)}
    assert swaps == {("crowned", "dotted"), ("hatted", "striped")}
    for _ in range(200):
        scene = sample_scene(rng)
        swapped = swap_attribute(scene, rng)
        if swapped is None:
            assert not scene.attributes()
            continue
        changed = [(a, b) for a, b in zip(scene.objects, swapped.objects) if a != b]
        assert len(changed) == 1 and swapped.seed == scene.seed and swapped.background == scene.background
        before, after = changed[0]
        assert before.attributes != after.attributes and replace(after, attributes=before.attributes) == before
        for name in after.attributes:
            assert before.object_class in get_attribute(name).carriers
