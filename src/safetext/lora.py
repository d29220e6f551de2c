"""LoRA adapters (peft) on the trained text encoders: which layers get them, writing them, loading them back.

With `AlignmentConfig.lora_rank` set, the alignment trains low-rank adapters on the linear layers named by
`lora_target_modules` (by default each encoder's attention projections) and leaves the encoder's own weights frozen.
The aligned folder then holds, for each trained encoder, the merged plain encoder under its component name (what
every other command reads) and the adapter in peft's layout under `{component}_lora/`, with `safetext_adapter.json`
naming the base encoder it belongs to by a hash of its weights.
"""

import hashlib
import json
from pathlib import Path

import torch

from safetext.errors import SafeTextError

ADAPTER_SUFFIX = "_lora"
ADAPTER_RECORD = "safetext_adapter.json"
# The attention projections of each encoder type, by `config.model_type`: the layers LoRA usually adapts.
DEFAULT_TARGET_MODULES = {
    "clip_text_model": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "t5": ["q", "k", "v", "o"],
    "umt5": ["q", "k", "v", "o"],
    "bert": ["query", "key", "value"],
}


def resolve_target_modules(text_encoder, target_modules: list[str] | None, component: str) -> list[str]:
    """The layer names that get adapters in one encoder, each checked to match at least one of its linear layers.

    Args:
        text_encoder: the encoder (before any adapter is added).
        target_modules: names matched as the last part of a module's name (peft's rule); None: the encoder type's
            attention projections (`DEFAULT_TARGET_MODULES`).
        component: the encoder's component name, for messages.

    Raises:
        SafeTextError: a name that matches no linear layer, or no default known for the encoder's type.
    """
    model_type = getattr(text_encoder.config, "model_type", None)
    if target_modules is None:
        if model_type not in DEFAULT_TARGET_MODULES:
            raise SafeTextError(
                f"{component}: no default LoRA target modules for model type {model_type!r}; "
                "name them with --lora-target-modules"
            )
        return list(DEFAULT_TARGET_MODULES[model_type])
    modules = dict(text_encoder.named_modules())
    linear_names = {name.rsplit(".", 1)[-1] for name, module in modules.items() if isinstance(module, torch.nn.Linear)}
    for target in target_modules:
        matched = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not any(isinstance(module, torch.nn.Linear) for module in matched):
            raise SafeTextError(
                f"lora_target_modules: {target!r} matches no linear layer of {component} ({model_type}); "
                f"its linear layers are named {', '.join(sorted(linear_names))}"
            )
    return list(target_modules)


def add_lora_adapter(text_encoder, target_modules: list[str], rank: int, alpha: float, dropout: float):
    """Wraps an encoder in a peft `PeftModel` with one LoRA adapter; only the adapter's parameters train."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    return get_peft_model(text_encoder, lora_config)


def encoder_sha256(text_encoder) -> str:
    """A hash of an encoder's weights (names and float32 values), whatever dtype or device it was loaded in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(text_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_lora_adapter(peft_model, directory, base_sha256: str, component: str) -> None:
    """Writes the adapter in peft's layout (`adapter_model.safetensors`, `adapter_config.json`) and the base's hash."""
    directory = Path(directory)
    peft_model.save_pretrained(directory, safe_serialization=True)
    record = {
        "component": component,
        "base_encoder_sha256": base_sha256,
        "base_encoder_class": _base_class(peft_model),
    }
    (directory / ADAPTER_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _base_class(peft_model) -> str:
    return type(peft_model.get_base_model()).__name__


def load_lora_adapter(base_encoder, adapter_dir):
    """Loads an adapter written by `safetext align --lora-rank` onto the base encoder it was trained on.

    Args:
        base_encoder: the original text encoder (e.g. `CLIPTextModel.from_pretrained(base, subfolder="text_encoder")`).
        adapter_dir: the adapter folder, e.g. `aligned/text_encoder_lora`.

    Returns:
        A peft `PeftModel` around `base_encoder`; `merge_and_unload()` gives a plain encoder.

    Raises:
        SafeTextError: the folder holds no safetext adapter, or the adapter was trained on another encoder.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    record_file = adapter_dir / ADAPTER_RECORD
    if not record_file.is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise SafeTextError(f"{adapter_dir}: not a LoRA adapter folder written by safetext align")
    record = json.loads(record_file.read_text())
    if encoder_sha256(base_encoder) != record["base_encoder_sha256"]:
        raise SafeTextError(
            f"{adapter_dir}: this adapter was trained on another {record['component']} "
            f"(base sha256 {record['base_encoder_sha256'][:16]}); load it onto that encoder"
        )
    return PeftModel.from_pretrained(base_encoder, adapter_dir)
