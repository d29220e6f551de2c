"""The paired bootstrap intervals beside the evaluation's rates, checked by hand on sets small enough to count
every resample's possible value, and by their coverage on simulated pairs of models."""

import numpy as np
import pytest

from safetext.evaluation.metrics import (
    INTERVAL_SETTINGS,
    nudity_removal_rate,
    paired_changes,
    rate_change_interval,
    removal_rate_interval,
)


def test_models_that_agree_on_every_image_get_the_exact_zero_event_bounds():
    # no resample can move when the two models agree, so both ends are the exact bound on a share of 6 prompts
    # of which none changed: 1 - 0.025 ** (1 / 6)
    hits = [1, 0, 1, 1, 0, 1]
    bound = 1 - 0.025 ** (1 / 6)
    assert rate_change_interval(hits, hits) == pytest.approx((-bound, bound))
    assert bound == pytest.approx(0.459, abs=1e-3)


def test_paired_changes_count_the_images_the_models_disagree_on():
    assert paired_changes([1, 1, 0, 0, 1], [0, 1, 1, 0, 0]) == {"lost": 2, "gained": 1}
    with pytest.raises(ValueError):
        paired_changes([1, 0], [1])


def test_two_images_by_hand():
    # a resample holds image 1 twice (change 0), image 2 twice (change -1) or one of each (-0.5), each of the
    # extremes a quarter of the time, so the low end is -1; no image gained, so the high end is the zero-event bound
    assert rate_change_interval([1, 1], [1, 0]) == pytest.approx((-1.0, 1 - 0.025**0.5))
    # nothing left: every resample removes everything, and the low end is the Poisson bound on 6 detections
    assert removal_rate_interval([2, 1, 3], [0, 0, 0]) == pytest.approx((1 + np.log(0.025) / 6, 1.0))


def test_the_images_of_one_prompt_are_drawn_together():
    original, aligned = [1] * 4 + [0] * 4, [0] * 8
    # two prompts of four images: a resample holding the first prompt twice (a quarter of them) loses every image
    assert rate_change_interval(original, aligned, ["a"] * 4 + ["b"] * 4)[0] == -1.0
    # eight images drawn one by one: all eight from the first four happens in 1 of 256 resamples
    assert rate_change_interval(original, aligned)[0] > -1.0


def test_the_interval_is_seeded_and_widens_with_its_confidence():
    original, aligned = [1, 1, 0, 1, 1, 0, 1, 1, 1, 0], [1, 0, 0, 1, 1, 1, 0, 1, 0, 0]
    assert rate_change_interval(original, aligned) == rate_change_interval(original, aligned)
    narrow = rate_change_interval(original, aligned, confidence=0.5)
    wide = rate_change_interval(original, aligned, confidence=0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    assert INTERVAL_SETTINGS["confidence"] == 0.95 and INTERVAL_SETTINGS["resamples"] == 2000


def test_the_removal_interval_is_undefined_where_the_rate_is():
    assert nudity_removal_rate([0, 0], [1, 0]) is None
    assert removal_rate_interval([0, 0], [1, 0]) is None


def test_the_intervals_cover_the_true_change_about_as_often_as_they_claim():
    # 60 images of two models: the original finds the object with probability 0.9, the aligned one flips each
    # finding with probability 0.1, so the true change is 0.9 * 0.9 + 0.1 * 0.1 - 0.9 = -0.08; and removal where
    # the original shows the concept with probability 0.7 and the aligned one keeps each finding with probability
    # 0.2, a true removal rate of 0.8. The percentile bootstrap runs a little narrow on sets this small.
    rng = np.random.default_rng(1)
    change_covered = removal_covered = 0
    trials = 200
    for trial in range(trials):
        original = (rng.random(60) < 0.9).astype(int)
        flips = rng.random(60) < 0.1
        aligned = np.where(flips, 1 - original, original)
        low, high = rate_change_interval(original.tolist(), aligned.tolist(), resamples=1000, seed=trial)
        change_covered += low <= -0.08 <= high
        shown = (rng.random(60) < 0.7).astype(int)
        kept = shown * (rng.random(60) < 0.2)
        low, high = removal_rate_interval(shown.tolist(), kept.tolist(), resamples=1000, seed=trial)
        removal_covered += low <= 0.8 <= high
    assert 0.85 <= change_covered / trials <= 0.99
    assert 0.85 <= removal_covered / trials <= 0.99


def test_the_intervals_still_cover_where_most_sets_show_no_event():
    # 30 images, an eraser that leaves the concept on 3% of what the original showed (true removal 0.97) and an
    # aligned model that flips 2% of the original's findings (true change 0.02 * 0.1 - 0.02 * 0.9 = -0.016): most
    # draws leave nothing, or lose or gain nothing, which a plain bootstrap would call certain
    rng = np.random.default_rng(2)
    removal_covered = change_covered = 0
    trials = 300
    for trial in range(trials):
        shown = (rng.random(30) < 0.7).astype(int)
        left = shown * (rng.random(30) < 0.03)
        if shown.sum():
            low, high = removal_rate_interval(shown.tolist(), left.tolist(), resamples=500, seed=trial)
            removal_covered += low <= 0.97 <= high
        else:
            removal_covered += 1
        original = (rng.random(30) < 0.9).astype(int)
        aligned = np.where(rng.random(30) < 0.02, 1 - original, original)
        low, high = rate_change_interval(original.tolist(), aligned.tolist(), resamples=500, seed=trial)
        change_covered += low <= -0.016 <= high
    assert removal_covered / trials >= 0.93
    assert change_covered / trials >= 0.93


@pytest.mark.parametrize(
    ("original", "aligned", "groups", "fragment"),
    [
        ([1, 0], [1], None, "one pair per image"),
        ([1, 2], [1, 0], None, "0 or 1"),
        ([1, 0], [1, 0], ["a"], "one group per image"),
        ([], [], None, "empty"),
    ],
)
def test_bad_input_is_refused(original, aligned, groups, fragment):
    with pytest.raises(ValueError, match=fragment):
        rate_change_interval(original, aligned, groups)


def test_removal_resamples_prompts_whole_too():
    # two prompts of three images; the first shows the concept on all three and keeps it on one, the second shows
    # nothing: a resample holding the first twice or once removes 2/3 (the second adds no detection), one holding
    # the second twice has nothing to remove and is left out, so the interval is exactly the rate
    original, aligned = [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]
    assert removal_rate_interval(original, aligned, ["a"] * 3 + ["b"] * 3) == pytest.approx((2 / 3, 2 / 3))
    # drawn image by image, the kept detection's image can be drawn twice or not at all
    low, high = removal_rate_interval(original, aligned)
    assert low < 2 / 3 < high


def test_groups_are_told_apart_by_equality_and_numpy_integers_count():
    original, aligned = np.array([1, 1, 0, 1]), np.array([0, 1, 0, 0])
    assert rate_change_interval(original.tolist(), aligned.tolist()) == rate_change_interval(
        list(original), list(aligned)
    )
    # 1 and "1" are two prompts: four groups here, so this equals the ungrouped interval
    assert rate_change_interval([1, 1, 0, 1], [0, 1, 0, 0], [1, "1", 2, "2"]) == rate_change_interval(
        [1, 1, 0, 1], [0, 1, 0, 0]
    )


def test_too_few_resamples_to_hold_a_detection_say_nothing():
    # one detection in ten images: with a single resample that misses it, no resample defines the rate
    seeds = [
        seed for seed in range(50) if removal_rate_interval([1] + [0] * 9, [0] * 10, resamples=1, seed=seed) is None
    ]
    assert seeds, "some seed draws a resample without the one detection"


def test_bools_are_refused_by_name():
    with pytest.raises(ValueError, match=r"0 or 1 per image, got \[True"):
        rate_change_interval([True, False], [1, 0])
