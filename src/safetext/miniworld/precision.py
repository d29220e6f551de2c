"""The numeric precision MiniWorld's training stages run their networks in: float32, or bfloat16 autocast."""

import torch

MIXED_PRECISIONS = ("no", "bf16")


def check_mixed_precision(value: str) -> None:
    """Raises ValueError unless `value` is one of `MIXED_PRECISIONS`."""
    if value not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {value!r}")


def training_autocast(device: str, mixed_precision: str) -> torch.autocast:
    """bfloat16 autocast on `device` for `mixed_precision="bf16"`, a context that changes nothing for `"no"`."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
