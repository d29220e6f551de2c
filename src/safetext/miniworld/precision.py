"""The numeric precision MiniWorld's training stages run their networks in: float32, or bfloat16 autocast."""

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MIXED_PRECISIONS = ("no", "bf16")
CPU_INFO = Path("/proc/cpuinfo")


def check_mixed_precision(value: str) -> None:
    """Raises ValueError unless `value` is one of `MIXED_PRECISIONS`."""
    if value not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {value!r}")


def cpu_flags(cpu_info: str) -> set[str]:
    """The feature flags of the first processor in a Linux `/proc/cpuinfo` text (`flags` on x86, `Features` on Arm)."""
    for line in cpu_info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware: AVX512-BF16 or AMX on x86, the BF16 extension on Arm.

    Without it PyTorch still runs bfloat16 autocast, but its convolutions fall back to slow reference code: a
    MiniWorld UNet step that took 0.64 s under bf16 on two AMD EPYC cores with AVX512-BF16 took about 18 s on two
    with AVX2 only. On macOS and other systems without `/proc/cpuinfo`, only PyTorch's own x86 checks answer.
    """
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, check, None)
        if probe is not None and probe():
            return True
    try:
        flags = cpu_flags(CPU_INFO.read_text())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def bf16_is_native(device: str) -> bool:
    """Whether bfloat16 autocast on `device` runs on hardware made for it (a CUDA GPU that supports it, or a CPU
    with native bfloat16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return True


def training_autocast(device: str, mixed_precision: str) -> torch.autocast:
    """bfloat16 autocast on `device` for `mixed_precision="bf16"`, a context that changes nothing for `"no"`.

    Logs a warning when bf16 is asked for on a device without native bfloat16, where it is many times slower.
    """
    if mixed_precision == "bf16" and not bf16_is_native(device):
        logger.warning(
            "bf16 autocast asked for on %s, which has no native bfloat16: expect it to be many times slower than "
            "float32 (mixed_precision='no')",
            device,
        )
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
