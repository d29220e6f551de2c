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
