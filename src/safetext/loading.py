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
from safetext.families import BARE_FAMILY, FAMILIES, PipelineFamily, detect_family

logger = logging.getLogger(__name__)


MINIWORLD = "miniworld"
"""The model name every command accepts for MiniWorld, the text-to-image model shipped inside safetext."""


@dataclass
class LoadedEncoder:
    """The text encoders and tokenizers of a model with where they came from.

    Attributes:
        tokenizer: the first tokenizer (`tokenizer`).
        text_encoder: the first encoder (`text_encoder`), in float32 on the CPU unless asked otherwise.
        bare: true for a stand-alone encoder (no diffusion pipeline involved).
        family: the pipeline family's name (`sd`, `sdxl`, `sd3`, `flux`) or None for a bare encoder.
        source: provenance: the path or Hub id, revision, kind, and content hashes of the encoder weights
            (`text_encoder_sha256` over every encoder of the family, `text_encoders` per encoder).
        text_encoders: every text encoder of the family, by component name.
        tokenizers: every tokenizer of the family, by component name.
    """

    tokenizer: object
    text_encoder: object
    bare: bool
    family: str | None
    source: dict = field(default_factory=dict)
    text_encoders: dict = field(default_factory=dict)
    tokenizers: dict = field(default_factory=dict)

    @property
    def pipeline_family(self) -> PipelineFamily:
        """The family's description; `BARE_FAMILY` for a bare encoder."""
        return BARE_FAMILY if self.family is None else FAMILIES[self.family]


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
                "text_encoder*/*",
                "tokenizer*/*",
                "*.safetensors",
            ],
            ignore_patterns=[
                "unet/*",
                "vae/*",
                "transformer/*",
                "*.bin",
                "*.ckpt",
                "*.pt",
                "*.pth",
                "*.msgpack",
                "*.h5",
            ],
        )
    except Exception as error:  # the Hub client raises many kinds; the user needs one line
        raise SafeTextError(
            f"{pretrained_model_name_or_path}: not a local folder and could not be fetched from the Hub "
            f"({type(error).__name__}); pass the path of a downloaded model"
        ) from None
    return Path(local), True


def load_text_encoder(
    pretrained_model_name_or_path, revision: str | None = None, torch_dtype=None, family: str | None = None
) -> LoadedEncoder:
    """Loads every text encoder and tokenizer of a pipeline, an aligned folder or a bare encoder.

    A pipeline's family is read from its `model_index.json` (`families.detect_family`); an aligned folder's from its
    `safetext.json`, whose base model supplies the encoders the alignment left frozen. Encoders are loaded as the
    classes the pipeline names (a `CLIPTextModelWithProjection` keeps its projection), from safetensors only and
    without remote code.

    Args:
        pretrained_model_name_or_path: a local folder or a Hub id.
        revision: the Hub revision (branch, tag or commit).
        torch_dtype: dtype to load the encoders in (default float32).
        family: force the pipeline family (`sd`, `sdxl`, `sd3`, `flux`) instead of detecting it, for a pipeline
            whose class is a variant of a supported one.

    Returns:
        A `LoadedEncoder`.

    Raises:
        SafeTextError: an unsupported pipeline class or unknown family, a folder without a text encoder or tokenizer
            the family needs, only pickled weights, or a tokenizer whose vocabulary does not fit its encoder.
    """
    if family is not None and family not in FAMILIES:
        raise SafeTextError(f"unknown pipeline family {family!r}: choose one of {', '.join(FAMILIES)}")
    root, downloaded = _resolve(pretrained_model_name_or_path, revision)
    has_index = (root / "model_index.json").is_file()
    record = _aligned_record(root)
    # folders the frozen encoders of an aligned folder are read from (its base model), when it lacks them
    fallback_roots = []
    if has_index or (root / "text_encoder").is_dir():
        # an aligned folder keeps the kind of its base: a bare encoder stays bare (it takes an attention mask)
        bare = not has_index and not record.get("model", {}).get("pipeline_involved", True)
        if bare:
            pipeline_family, kind = BARE_FAMILY, "aligned_bare_text_encoder"
        elif has_index:
            index = json.loads((root / "model_index.json").read_text())
            pipeline_family = FAMILIES[family] if family else detect_family(index)
            kind = "pipeline"
        else:
            model = record.get("model", {})
            pipeline_family = FAMILIES[family or model.get("family") or "sd"]
            kind = "aligned_text_encoder"
            base = model.get("resolved_path") or model.get("pretrained_model_name_or_path")
            if base and any(not (root / name).is_dir() for name in pipeline_family.text_encoder_names):
                fallback_roots.append(_resolve(base, model.get("revision"))[0])
        encoder_dirs = {}
        for spec in pipeline_family.encoders:
            candidates = [root / spec.text_encoder] + [r / spec.text_encoder for r in fallback_roots]
            found = [path for path in candidates if path.is_dir()]
            if not found:
                raise SafeTextError(f"{root}: pipeline folder without a {spec.text_encoder}/ folder")
            if not (root / spec.tokenizer).is_dir():
                raise SafeTextError(f"{root}: pipeline folder without a {spec.tokenizer}/ folder")
            encoder_dirs[spec.text_encoder] = (found[0], root / spec.tokenizer)
    elif (root / "config.json").is_file():
        bare = True
        pipeline_family, kind = BARE_FAMILY, "bare_text_encoder"
        encoder_dirs = {"text_encoder": (root, root)}
    else:
        raise SafeTextError(
            f"{root}: not a model folder (expected model_index.json with text_encoder/ and tokenizer/, "
            "or a transformers encoder with config.json)"
        )

    text_encoders, tokenizers, per_encoder, all_weights = {}, {}, {}, []
    for spec in pipeline_family.encoders:
        encoder_dir, tokenizer_dir = encoder_dirs[spec.text_encoder]
        weights = _safetensors_of(encoder_dir)
        tokenizers[spec.tokenizer] = _load_tokenizer(tokenizer_dir)
        text_encoders[spec.text_encoder] = _load_encoder(encoder_dir, torch_dtype, bare)
        _check_vocabulary(root, tokenizers[spec.tokenizer], text_encoders[spec.text_encoder])
        all_weights += weights
        per_encoder[spec.text_encoder] = {
            "class": type(text_encoders[spec.text_encoder]).__name__,
            "sha256": _hash_files(weights),
            "parameters": sum(p.numel() for p in text_encoders[spec.text_encoder].parameters()),
        }
    first = pipeline_family.encoders[0]
    source = {
        "pretrained_model_name_or_path": str(pretrained_model_name_or_path),
        "revision": revision,
        "kind": kind,
        "resolved_path": str(root) if downloaded else None,
        "text_encoder_class": per_encoder[first.text_encoder]["class"],
        # over every encoder of the family: for SD, the hash of its one encoder
        "text_encoder_sha256": _hash_files(all_weights),
        "parameters": per_encoder[first.text_encoder]["parameters"],
    }
    if len(per_encoder) > 1:
        source["text_encoders"] = per_encoder
    return LoadedEncoder(
        tokenizer=tokenizers[first.tokenizer],
        text_encoder=text_encoders[first.text_encoder],
        bare=bare,
        family=None if bare else pipeline_family.name,
        source=source,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
    )


def _safetensors_of(encoder_dir: Path) -> list[Path]:
    weights = sorted(encoder_dir.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in encoder_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickled:
            raise SafeTextError(
                f"{encoder_dir}: only pickled weights ({', '.join(pickled)}); safetext loads safetensors only "
                "(convert them with save_pretrained(..., safe_serialization=True))"
            )
        raise SafeTextError(f"{encoder_dir}: no model weights (*.safetensors)")
    return weights


def _load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except Exception as error:
        raise SafeTextError(f"{tokenizer_dir}: could not load the tokenizer ({_first_line(error)})") from None


def _encoder_class(encoder_dir: Path, bare: bool):
    """The class the folder's config names (a pipeline's `CLIPTextModelWithProjection` must keep its projection);
    `AutoModel` for a bare encoder, whose config may name a task head the alignment does not use."""
    import transformers

    if not bare:
        architectures = json.loads((encoder_dir / "config.json").read_text()).get("architectures") or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _load_encoder(encoder_dir: Path, torch_dtype, bare: bool):
    import torch

    try:
        text_encoder = _encoder_class(encoder_dir, bare).from_pretrained(
            # float32 unless asked: transformers would otherwise keep the stored dtype (fp16 weights train badly)
            encoder_dir,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=torch_dtype or torch.float32,
        )
    except Exception as error:
        raise SafeTextError(f"{encoder_dir}: could not load the text encoder ({_first_line(error)})") from None
    text_encoder.requires_grad_(False)
    text_encoder.eval()
    return text_encoder


def _check_vocabulary(root: Path, tokenizer, text_encoder) -> None:
    vocab_size = getattr(text_encoder.config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise SafeTextError(
            f"{root}: the tokenizer has {len(tokenizer)} tokens but the text encoder embeds only {vocab_size}; "
            "they do not belong together"
        )


def _aligned_record(root: Path) -> dict:
    record = root / "safetext.json"
    if (root / "model_index.json").is_file() or not record.is_file():
        return {}
    return json.loads(record.read_text())


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
