"""The user cache where metric weights, converted once from the files that packages ship, are kept as safetensors."""

import hashlib
import os
from pathlib import Path

CACHE_ENV_VAR = "SAFETEXT_CACHE"


def get_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder that holds safetext's converted weights, creating it if needed.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Folder to use. Defaults to `$SAFETEXT_CACHE`, or `~/.cache/safetext` when that is unset.

    Returns:
        `Path`: the folder, which exists on return.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "safetext"
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of_file(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 digest of a file.

    Args:
        path (`str` or `os.PathLike`): the file, read in chunks so that large weight files need little memory.

    Returns:
        `str`: the digest as 64 hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_safetensors_atomically(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """Write tensors to a safetensors file through a temporary file in the same folder.

    A crash or a concurrent run then never leaves a half-written file where a later run would load it.

    Args:
        tensors (`dict[str, torch.Tensor]`): contiguous tensors by name.
        path (`Path`): the file to write; its folder is created if needed.
        metadata (`dict[str, str]`): stored in the file's header (provenance of the weights).
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of our own (not mkstemp) so that the file gets the usual permissions, not 0600
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp_path, metadata=metadata)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
