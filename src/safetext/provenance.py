"""What a result record says about where it came from: package versions, git commit, device, cost."""

import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("safetext", "torch", "transformers", "diffusers", "accelerate", "safetensors", "peft", "numpy")


def package_versions(names=PACKAGES) -> dict:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the safetext source tree when it runs from a git checkout, else None."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# the CPU features that decide how fast bfloat16 runs: native bf16 dot products (AVX512-BF16) and Intel's AMX tiles
BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def _cpuinfo(text: str | None = None) -> dict:
    """The first processor's fields in Linux's /proc/cpuinfo (or in `text`, laid out so); empty elsewhere."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_description(cpuinfo: str | None = None) -> dict:
    """The CPU as a record names it, read once from Linux's /proc/cpuinfo (or from `cpuinfo` text laid out so):

    - `cpu_model`: its model name, else what the platform says, or None. A virtual machine may name only the family
      ("Intel(R) Xeon(R) Processor"), so:
    - `cpu_bf16_features`: which of `BF16_FEATURES` it lists, or None where nothing lists its flags.
    """
    fields = _cpuinfo(cpuinfo)
    flags = fields.get("flags")
    return {
        "cpu_model": fields.get("model name") or platform.processor() or None,
        "cpu_bf16_features": None if flags is None else [name for name in BF16_FEATURES if name in flags.split()],
    }


def device_description(device: torch.device) -> dict:
    """What a result was computed on: the device, the platform, the CPU's model, its threads, and the widest vector
    instructions PyTorch uses on it (`"AVX2"`, `"AVX512"`, ...), since the same float32 code rounds differently
    across them and bfloat16 is fast only on some (two CPUs of the same capability can still differ: AMX)."""
    info = {
        "type": device.type,
        "platform": platform.platform(),
        **cpu_description(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["count"] = torch.cuda.device_count()
    return info


def peak_memory_bytes(device: torch.device) -> dict:
    """Peak resident memory of this process and, on CUDA, the peak memory allocated by torch."""
    # ru_maxrss is in kilobytes on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    peak = {"cpu_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    if device.type == "cuda":
        peak["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return peak


class Stopwatch:
    """Wall time since creation, in seconds."""

    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
