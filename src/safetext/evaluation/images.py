"""Reading folders of generated images (saved as `{case_number}_{i}.png`) for the metrics."""

import os
from pathlib import Path

from PIL import Image

from safetext.errors import SafeTextError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """List the image files directly inside a folder, sorted by name.

    Args:
        folder (`str` or `os.PathLike`): a folder of images; subfolders and other files are ignored.

    Returns:
        `list[Path]`: the image files, sorted by file name so that two folders of the same prompts line up.

    Raises:
        `SafeTextError`: if the folder does not exist, cannot be read or holds no image.
    """
    path = Path(folder)
    if not path.is_dir():
        raise SafeTextError(f"image folder {str(path)!r} does not exist: generate the images first or fix the path")
    try:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as error:
        raise SafeTextError(f"cannot read image folder {str(path)!r}: {error.strerror}") from error
    if not files:
        raise SafeTextError(f"image folder {str(path)!r} holds no {'/'.join(IMAGE_SUFFIXES)} file")
    return files


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, the form every metric here expects.

    Args:
        path (`str` or `os.PathLike`): the image file.

    Returns:
        `PIL.Image.Image`: the decoded image in RGB mode.

    Raises:
        `SafeTextError`: if the file cannot be read or is not an image.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    # PIL's UnidentifiedImageError (not an image) is an OSError too
    except OSError as error:
        raise SafeTextError(f"cannot read image {str(path)!r}: {error}; delete or regenerate it") from error
