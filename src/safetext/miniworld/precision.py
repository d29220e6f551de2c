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


def torch_cpu_capabilities() -> dict:
    """PyTorch's report of this CPU's features (`torch.cpu.get_capabilities`, on every OS), or an empty dict where
    this PyTorch has none or it fails: a probe that fails must not stop a build."""
    report = getattr(torch.cpu, "get_capabilities", None)
    if report is None:
        return {}
    try:
        return dict(report())
    except Exception:
        return {}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware: AVX512-BF16 or AMX-BF16 on x86, the BF16 extension on Arm.

    PyTorch's own report answers first; where it says no or has nothing to say, the flags in Linux's
    `/proc/cpuinfo`. Elsewhere (macOS, Windows) only PyTorch's report counts, so a CPU it does not describe is taken
    to have none. Without it PyTorch still runs bfloat16 autocast, but slowly: a MiniWorld UNet step that took
    0.64 s under bf16 on two AMD EPYC cores with AVX512-BF16 took about 18 s on two with AVX2 only.
    """
    capabilities = torch_cpu_capabilities()
    if any(capabilities.get(name) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")):
        return True
    try:
        flags = cpu_flags(CPU_INFO.read_text())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def bf16_is_native(device: str) -> bool:
    """Whether bfloat16 autocast on `device` runs on hardware made for it: a CPU with native bfloat16, an NVIDIA
    GPU of compute capability 8.0 or later (Ampere on; older ones emulate it) or an AMD GPU. Other device types
    (mps, xpu, ...) are taken to have it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
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
