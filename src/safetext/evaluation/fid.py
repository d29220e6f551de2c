"""Fréchet Inception Distance (Heusel et al., 2017) between two image sets, or from their precomputed features.

FID = |mu_1 - mu_2|^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^(1/2)) over the 2048-d pool_3 features of the 2015
TensorFlow Inception (`safetext.evaluation.inception`), with the covariances estimated with N - 1 as usual.
"""

import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from safetext.evaluation.inception import InceptionV3Features, images_to_inception_input


def compute_inception_features(
    images: Iterable[Image.Image], model: InceptionV3Features | None = None, batch_size: int = 32
) -> np.ndarray:
    """Inception pool_3 features of images, the input of FID.

    Args:
        images (`Iterable[PIL.Image.Image]`): images of any size (resized to 299x299); read lazily, batch by batch.
        model (`InceptionV3Features`, *optional*): defaults to `InceptionV3Features.from_pretrained()`.
        batch_size (`int`, *optional*, defaults to 32): images per forward pass.

    Returns:
        `np.ndarray`: `(N, 2048)` float64 features.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be at least 1")
    model = InceptionV3Features.from_pretrained() if model is None else model
    device = next(iter(model.buffers())).device
    features, batch = [], []

    def flush():
        with torch.no_grad():
            features.append(model(images_to_inception_input(batch).to(device)).double().cpu().numpy())
        batch.clear()

    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return np.concatenate(features) if features else np.zeros((0, 2048))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features, the Gaussian FID compares.

    Args:
        features (`np.ndarray`): `(N, D)` features, N >= 2.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: the `(D,)` mean and the `(D, D)` covariance (divided by N - 1), float64.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need an (N, D) array with N >= 2 to estimate a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu_1: np.ndarray, sigma_1: np.ndarray, mu_2: np.ndarray, sigma_2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu_1, sigma_1) and N(mu_2, sigma_2).

    `Tr((S_1 S_2)^(1/2))` is the sum of the square roots of the eigenvalues of `S_1^(1/2) S_2 S_1^(1/2)`, which
    has the same eigenvalues as `S_1 S_2` but is symmetric positive semi-definite: two symmetric eigendecompositions
    give it without a general matrix square root, complex round-off or scipy. Singular covariances (fewer samples
    than dimensions) are fine. Computed in float64.

    Args:
        mu_1 (`np.ndarray`): `(D,)` mean of the first set.
        sigma_1 (`np.ndarray`): `(D, D)` covariance of the first set.
        mu_2 (`np.ndarray`): `(D,)` mean of the second set.
        sigma_2 (`np.ndarray`): `(D, D)` covariance of the second set.

    Returns:
        `float`: the squared Fréchet distance (what papers report as FID), never negative.
    """
    mu_1, mu_2 = (torch.as_tensor(np.asarray(mu), dtype=torch.float64) for mu in (mu_1, mu_2))
    sigma_1, sigma_2 = (torch.as_tensor(np.asarray(sigma), dtype=torch.float64) for sigma in (sigma_1, sigma_2))
    dim = mu_1.shape[0]
    if mu_1.shape != (dim,) or mu_2.shape != (dim,) or sigma_1.shape != (dim, dim) or sigma_2.shape != (dim, dim):
        raise ValueError(
            f"shapes do not fit: mu_1 {tuple(mu_1.shape)}, sigma_1 {tuple(sigma_1.shape)}, "
            f"mu_2 {tuple(mu_2.shape)}, sigma_2 {tuple(sigma_2.shape)}"
        )
    # torch rather than numpy: its LAPACK build decomposes a 2048x2048 matrix several times faster here
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma_1)
    # clamp: round-off leaves tiny negative eigenvalues on a positive semi-definite matrix
    sqrt_sigma_1 = (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    middle = sqrt_sigma_1 @ sigma_2 @ sqrt_sigma_1
    trace_sqrt_product = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    difference = mu_1 - mu_2
    distance = difference @ difference + sigma_1.trace() + sigma_2.trace() - 2 * trace_sqrt_product
    return max(float(distance), 0.0)


def compute_fid_from_features(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """FID between two sets of precomputed Inception features.

    With fewer images than feature dimensions (common: 1,000 prompts against 2,048 features) the covariances have low
    rank, and with `S_1 = A^T A`, `S_2 = B^T B` for the centred features scaled by `1 / sqrt(N - 1)`,
    `Tr((S_1 S_2)^(1/2))` equals the nuclear norm of `B A^T`, an N_2 x N_1 matrix: the same value as
    `frechet_distance` on the statistics, at a fraction of the cost.

    Args:
        features_1 (`np.ndarray`): `(N_1, D)` features, e.g. of real images, computed once and stored; N_1 >= 2.
        features_2 (`np.ndarray`): `(N_2, D)` features of the generated images; N_2 >= 2.

    Returns:
        `float`: the FID.
    """
    mu_1, sigma_1 = feature_statistics(features_1)
    mu_2, sigma_2 = feature_statistics(features_2)
    if mu_1.shape != mu_2.shape:
        raise ValueError(f"features of {mu_1.shape[0]} and {mu_2.shape[0]} dimensions cannot be compared")
    count_1, count_2, dim = len(features_1), len(features_2), mu_1.shape[0]
    if min(count_1, count_2) >= dim:
        return frechet_distance(mu_1, sigma_1, mu_2, sigma_2)
    a = torch.from_numpy((np.asarray(features_1, dtype=np.float64) - mu_1) / np.sqrt(count_1 - 1))
    b = torch.from_numpy((np.asarray(features_2, dtype=np.float64) - mu_2) / np.sqrt(count_2 - 1))
    trace_sqrt_product = torch.linalg.matrix_norm(b @ a.T, ord="nuc")
    difference = mu_1 - mu_2
    distance = difference @ difference + a.pow(2).sum() + b.pow(2).sum() - 2 * trace_sqrt_product
    return max(float(distance), 0.0)


def compute_fid(
    images_1: Sequence[Image.Image],
    images_2: Sequence[Image.Image],
    model: InceptionV3Features | None = None,
    batch_size: int = 32,
) -> float:
    """FID between two sets of images.

    FID is biased upwards for small sets: compare values only at equal set sizes (papers use thousands of images).

    Args:
        images_1 (`Sequence[PIL.Image.Image]`): the reference set, at least 2 images.
        images_2 (`Sequence[PIL.Image.Image]`): the set to compare, at least 2 images.
        model (`InceptionV3Features`, *optional*): defaults to `InceptionV3Features.from_pretrained()`.
        batch_size (`int`, *optional*, defaults to 32): images per forward pass.

    Returns:
        `float`: the FID.
    """
    model = InceptionV3Features.from_pretrained() if model is None else model
    return compute_fid_from_features(
        compute_inception_features(images_1, model=model, batch_size=batch_size),
        compute_inception_features(images_2, model=model, batch_size=batch_size),
    )


def compute_fid_for_folders(
    folder_1: str | os.PathLike,
    folder_2: str | os.PathLike,
    model: InceptionV3Features | None = None,
    batch_size: int = 32,
) -> float:
    """FID between the images of two folders, read a batch at a time.

    Args:
        folder_1 (`str` or `os.PathLike`): the reference images, e.g. real COCO images the user supplies.
        folder_2 (`str` or `os.PathLike`): the generated images.
        model (`InceptionV3Features`, *optional*): defaults to `InceptionV3Features.from_pretrained()`.
        batch_size (`int`, *optional*, defaults to 32): images per forward pass.

    Returns:
        `float`: the FID.

    Raises:
        `SafeTextError`: if a folder is missing, unreadable, holds no image or an image cannot be read.
    """
    from safetext.evaluation.images import list_image_files, load_image

    files_1, files_2 = list_image_files(folder_1), list_image_files(folder_2)
    model = InceptionV3Features.from_pretrained() if model is None else model
    return compute_fid_from_features(
        compute_inception_features((load_image(path) for path in files_1), model=model, batch_size=batch_size),
        compute_inception_features((load_image(path) for path in files_2), model=model, batch_size=batch_size),
    )
