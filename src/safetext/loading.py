"""Loading the tokenizer and text encoder of a model (never its UNet or VAE), from safetensors only.

Three kinds of folder (or Hub repository) are understood:
- a diffusers pipeline (`model_index.json` with `tokenizer/` and `text_encoder/`);
- a folder written by `safetext align` (`text_encoder/` and `tokenizer/` without `model_index.json`);
- a bare `transformers` text encoder with its tokenizer (`config.json` at the top), aligned on embeddings only.
"""

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from safetext.errors import SafeTextError

logger = logging.getLogger(__name__)


MINIWORLD = "miniworld"
"""The model name every command accepts for MiniWorld, the text-to-image model shipped inside safetext."""


@dataclass
class LoadedEncoder:
    """A tokenizer and text encoder with where they came from.

    Attributes:
        tokenizer: the tokenizer.
        text_encoder: the encoder, in float32 on the CPU unless asked otherwise.
        bare: true for a stand-alone encoder (no diffusion pipeline involved).
        family: the pipeline family (`sd` for SD 1.x/2.x) or None for a bare encoder.
        source: provenance: the path or Hub id, revision, kind and a content hash of the encoder weights.
    """

    tokenizer: object
    text_encoder: object
    bare: bool
    family: str | None
    source: dict = field(default_factory=dict)


def _hash_files(paths) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve_model_name(pretrained_model_name_or_path):
    """The folder a model name built into safetext stands for, or the argument unchanged.

    `"miniworld"` names MiniWorld's pipeline, which ships inside the package; a local folder of that name wins.

    Raises:
        SafeTextError: `"miniworld"` is asked for but this install has no MiniWorld weights.
    """
    if str(pretrained_model_name_or_path) != MINIWORLD or Path(MINIWORLD).exists():
        return pretrained_model_name_or_path
    from safetext.miniworld.model import MODEL_DIR

    if not (MODEL_DIR / "model_index.json").is_file():
        raise SafeTextError(
            f"this install of safetext has no MiniWorld weights ({MODEL_DIR}); build them with "
            "`safetext miniworld build --out DIR` and pass DIR as the model"
        )
    return MODEL_DIR


def _resolve(pretrained_model_name_or_path, revision) -> tuple[Path, bool]:
    """Returns a local folder for a path or Hub id, and whether it was downloaded."""
    path = Path(resolve_model_name(pretrained_model_name_or_path))
    if path.exists():
        if not path.is_dir():
            raise SafeTextError(f"{path}: a model must be a folder, not a file")
        return path, False
    if str(pretrained_model_name_or_path).count("/") > 1 or str(pretrained_model_name_or_path).startswith("."):
        raise SafeTextError(f"{pretrained_model_name_or_path}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(pretrained_model_name_or_path),
            revision=revision,
            allow_patterns=[
                "model_index.json",
                "config.json",
                "*.json",
                "*.txt",
                "*.model",
                "text_encoder/*",
                "tokenizer/*",
                "*.safetensors",
            ],
            ignore_patterns=["unet/*", "vae/*", "*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5"],
        )
    except Exception as error:  # the Hub client raises many kinds; the user needs one line
        raise SafeTextError(
            f"{pretrained_model_name_or_path}: not a local folder and could not be fetched from the Hub "
            f"({type(error).__name__}); pass the path of a downloaded model"
        ) from None
    return Path(local), True


def load_text_encoder(pretrained_model_name_or_path, revision: str | None = None, torch_dtype=None) -> LoadedEncoder:
    """Loads the tokenizer and text encoder of a pipeline, an aligned folder or a bare encoder.

    Args:
        pretrained_model_name_or_path: a local folder or a Hub id.
        revision: the Hub revision (branch, tag or commit).
        torch_dtype: dtype to load the encoder in (default float32).

    Returns:
        A `LoadedEncoder`.

    Raises:
        SafeTextError: the folder has no text encoder or tokenizer, holds only pickled weights, or the tokenizer's
            vocabulary does not fit the encoder's embedding table.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    root, downloaded = _resolve(pretrained_model_name_or_path, revision)
    has_index = (root / "model_index.json").is_file()
    if has_index or (root / "text_encoder").is_dir():
        # an aligned folder keeps the kind of its base: a bare encoder stays bare (it takes an attention mask)
        bare = not has_index and _aligned_from_bare(root)
        encoder_dir, tokenizer_dir = root / "text_encoder", root / "tokenizer"
        if not encoder_dir.is_dir():
            raise SafeTextError(f"{root}: pipeline folder without a text_encoder/ folder")
        if not tokenizer_dir.is_dir():
            raise SafeTextError(f"{root}: pipeline folder without a tokenizer/ folder")
        kind = "pipeline" if has_index else "aligned_text_encoder"
        if bare:
            kind = "aligned_bare_text_encoder"
    elif (root / "config.json").is_file():
        bare = True
        encoder_dir = tokenizer_dir = root
        kind = "bare_text_encoder"
    else:
        raise SafeTextError(
            f"{root}: not a model folder (expected model_index.json with text_encoder/ and tokenizer/, "
            "or a transformers encoder with config.json)"
        )
    weights = sorted(encoder_dir.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in encoder_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickled:
            raise SafeTextError(
                f"{encoder_dir}: only pickled weights ({', '.join(pickled)}); safetext loads safetensors only "
                "(convert them with save_pretrained(..., safe_serialization=True))"
            )
        raise SafeTextError(f"{encoder_dir}: no model weights (*.safetensors)")

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except Exception as error:
        raise SafeTextError(f"{tokenizer_dir}: could not load the tokenizer ({_first_line(error)})") from None
    try:
        text_encoder = AutoModel.from_pretrained(
            # float32 unless asked: transformers would otherwise keep the stored dtype (fp16 weights train badly)
            encoder_dir,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=torch_dtype or torch.float32,
        )
    except Exception as error:
        raise SafeTextError(f"{encoder_dir}: could not load the text encoder ({_first_line(error)})") from None

    vocab_size = getattr(text_encoder.config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise SafeTextError(
            f"{root}: the tokenizer has {len(tokenizer)} tokens but the text encoder embeds only {vocab_size}; "
            "they do not belong together"
        )
    text_encoder.requires_grad_(False)
    text_encoder.eval()
    source = {
        "pretrained_model_name_or_path": str(pretrained_model_name_or_path),
        "revision": revision,
        "kind": kind,
        "resolved_path": str(root) if downloaded else None,
        "text_encoder_class": type(text_encoder).__name__,
        "text_encoder_sha256": _hash_files(weights),
        "parameters": sum(p.numel() for p in text_encoder.parameters()),
    }
    family = None if bare else _family(root)
    return LoadedEncoder(tokenizer=tokenizer, text_encoder=text_encoder, bare=bare, family=family, source=source)


def _aligned_from_bare(root: Path) -> bool:
    record = root / "safetext.json"
    if not record.is_file():
        return False
    return not json.loads(record.read_text()).get("model", {}).get("pipeline_involved", True)


def _family(root: Path) -> str:
    index_file = root / "model_index.json"
    if not index_file.is_file():
        record = root / "safetext.json"
        if record.is_file():
            return json.loads(record.read_text()).get("model", {}).get("family", "sd")
        return "sd"
    index = json.loads(index_file.read_text())
    pipeline_class = index.get("_class_name", "")
    if pipeline_class.startswith("StableDiffusion") and "XL" not in pipeline_class and "3" not in pipeline_class:
        return "sd"
    raise SafeTextError(f"{root}: pipeline class {pipeline_class!r} is not supported yet; supported: sd (SD 1.x/2.x)")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
