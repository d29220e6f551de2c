import random
from dataclasses import replace

import numpy as np
import pytest

from safetext.miniworld.renderer import COLOUR_RGB, SHAPES, render, render_many
from safetext.miniworld.scenes import Scene, SceneDistribution, SceneObject, sample_scene
from safetext.miniworld.world import ATTRIBUTE_NAMES, BACKGROUNDS, CLASS_NAMES, COLOURS


def test_render_is_deterministic_and_64x64_rgb():
    scenes_a = [sample_scene(random.Random(3)) for _ in range(2)]
    assert scenes_a[0] == scenes_a[1]
    first, second = render(scenes_a[0]), render(scenes_a[1])
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_render_many_draws_the_same_pixels_in_workers_as_one_by_one():
    rng = random.Random(8)
    scenes = [sample_scene(rng) for _ in range(200)]
    one_by_one = np.stack([np.asarray(render(scene)) for scene in scenes])
    in_workers = render_many(scenes, num_workers=2)
    assert in_workers.dtype == np.uint8 and in_workers.shape == (200, 64, 64, 3)
    # the same pictures in the same order
    assert np.array_equal(in_workers, one_by_one)
    assert np.array_equal(render_many(scenes[:3], num_workers=4), one_by_one[:3])
    assert render_many([], num_workers=2).shape == (0, 64, 64, 3)


def test_the_seed_changes_the_details_but_not_the_scene():
    scene = Scene("grass", (SceneObject("ball", "red"),), seed=1)
    a, b = np.asarray(render(scene)), np.asarray(render(replace(scene, seed=2)))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("object_class", CLASS_NAMES)
def test_every_class_and_attribute_renders(object_class):
    for background in BACKGROUNDS:
        for attributes in [(), *[(name,) for name in ATTRIBUTE_NAMES], ("crowned", "striped")]:
            scene = Scene(background, (SceneObject(object_class, "blue", "small", "top", 1, attributes),), seed=5)
            assert np.asarray(render(scene)).std() > 5


@pytest.mark.parametrize("object_class", ["person", "fish", "ball", "box", "heart"])
def test_stripes_change_pixels_on_the_subject_only(object_class):
    plain = Scene("beach", (SceneObject(object_class, "yellow", "medium", "center"),), seed=11)
    striped = replace(plain, objects=(replace(plain.objects[0], attributes=("striped",)),))
    a = np.asarray(render(plain)).astype(int)
    b = np.asarray(render(striped)).astype(int)
    changed = np.abs(a - b).sum(axis=2) > 30
    ys, xs = np.nonzero(changed)
    # a clear change: many pixels, all inside the object's square (22 pixels, +-8% and +-2 pixels of jitter)
    # around its centre (32, 34)
    assert changed.sum() > 40
    assert xs.min() >= 32 - 15 and xs.max() <= 32 + 15 and ys.min() >= 34 - 15 and ys.max() <= 34 + 15


def test_the_crown_sits_above_the_subject():
    plain = Scene("plain", (SceneObject("person", "red", "medium", "center"),), seed=4)
    crowned = replace(plain, objects=(replace(plain.objects[0], attributes=("crowned",)),))
    changed = np.abs(np.asarray(render(plain)).astype(int) - np.asarray(render(crowned)).astype(int)).sum(axis=2) > 30
    ys, _ = np.nonzero(changed)
    assert changed.sum() > 20 and ys.mean() < 34


def test_rows_and_pairs_render_every_copy():
    rng = random.Random(9)
    for _ in range(50):
        scene = sample_scene(rng, SceneDistribution(single_rate=0.0, group_rate=0.5))
        assert np.asarray(render(scene)).shape == (64, 64, 3)


def test_every_word_of_the_world_has_a_look():
    assert set(SHAPES) == set(CLASS_NAMES)
    assert set(COLOUR_RGB) == set(COLOURS)
