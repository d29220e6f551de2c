"""safetext: safe text-to-image models by aligning the text encoder (SafeText, arXiv 2502.20623).

`import safetext` is cheap: the public API below is imported lazily, on first attribute access, so that
the command line starts fast and nothing heavy (torch, diffusers) loads until it is used.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AlignmentConfig": "safetext.config",
    "SafeTextError": "safetext.errors",
    "PromptSet": "safetext.prompts",
    "read_prompts": "safetext.prompts",
    "safetext_loss": "safetext.losses",
    "TextConditioner": "safetext.conditioning",
    "TextEncoders": "safetext.conditioning",
    "load_text_encoder": "safetext.loading",
    "load_lora_adapter": "safetext.lora",
    "align": "safetext.alignment",
    "AlignmentResult": "safetext.alignment",
    "embedding_metrics": "safetext.metrics",
    "build_clip_tokenizer": "safetext.clip_tokenizer",
    "create_tiny_pipeline": "safetext.tiny_models",
}

__all__ = [
    "AlignmentConfig",
    "AlignmentResult",
    "PromptSet",
    "SafeTextError",
    "TextConditioner",
    "TextEncoders",
    "__version__",
    "align",
    "build_clip_tokenizer",
    "create_tiny_pipeline",
    "embedding_metrics",
    "load_lora_adapter",
    "load_text_encoder",
    "read_prompts",
    "safetext_loss",
]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'safetext' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from safetext.alignment import AlignmentResult, align
    from safetext.clip_tokenizer import build_clip_tokenizer
    from safetext.conditioning import TextConditioner, TextEncoders
    from safetext.config import AlignmentConfig
    from safetext.errors import SafeTextError
    from safetext.loading import load_text_encoder
    from safetext.lora import load_lora_adapter
    from safetext.losses import safetext_loss
    from safetext.metrics import embedding_metrics
    from safetext.prompts import PromptSet, read_prompts
    from safetext.tiny_models import create_tiny_pipeline
